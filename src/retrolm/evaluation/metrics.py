"""Evaluation metrics: QA (EM/F1), degeneration, chunk overlap, bits-per-byte.

Pure numpy/python so every stage (eval, generate, qa, demo) can share one definition.

Conventions (see docs/metrics.md):
- QA answers are normalised the SQuAD way: lowercase, punctuation removed, articles
  (a, an, the) removed, whitespace collapsed. EM and F1 take the max over gold answers.
- Repetition (docs/reference.md §2): a generation "repeats" when its LAST ``min_count * L`` tokens are
  one phrase of ``L >= min_len`` tokens written ``min_count`` times back to back. A loop
  cut off mid-phrase still counts, because the last ``min_count * L`` tokens are then a
  rotation of the phrase repeated; a phrase repeated only twice, or loops that stopped
  before the end, do not count.
- Overlap (docs/reference.md §1): r(C) = longest common contiguous token run between chunk C and any of
  its neighbours, divided by m.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

from retrolm.errors import RetrolmError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)

DEFAULT_ALPHAS: tuple[float, ...] = (0.0, 0.125, 0.25, 0.5, 1.0)


# --------------------------------------------------------------------------- QA


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse spaces."""
    s = s.lower().translate(_PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    if not answers:
        raise RetrolmError("exact_match needs at least one gold answer; fix the QA item")
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        # SQuAD: both empty -> 1, one empty -> 0
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """Token-level F1 of normalised prediction vs gold, max over gold answers."""
    if not answers:
        raise RetrolmError("f1_score needs at least one gold answer; fix the QA item")
    pred = normalize_answer(prediction).split()
    return max(_token_f1(pred, normalize_answer(a).split()) for a in answers)


# ------------------------------------------------------------------ degeneration


def has_repetition(tokens: Sequence[int], min_len: int = 2, min_count: int = 3) -> bool:
    """True if the generation ends with a phrase of >= min_len tokens repeated >= min_count times.

    Precisely: there is a period L >= min_len such that the last min_count*L tokens
    satisfy t[i] == t[i+L] (i.e. they are one L-token phrase written min_count times).
    """
    if min_len < 1 or min_count < 2:
        raise RetrolmError("has_repetition needs min_len >= 1 and min_count >= 2")
    t = np.asarray(tokens, dtype=np.int64)
    n = t.shape[0]
    for period in range(min_len, n // min_count + 1):
        tail = t[n - min_count * period :]
        if np.array_equal(tail[period:], tail[:-period]):
            return True
    return False


def repetition_rate(
    generations: Sequence[Sequence[int]], min_len: int = 2, min_count: int = 3
) -> float:
    """Repetition % (docs/reference.md §2): percent of generations for which has_repetition is True."""
    if len(generations) == 0:
        raise RetrolmError("repetition_rate needs at least one generation")
    hits = sum(has_repetition(g, min_len, min_count) for g in generations)
    return 100.0 * hits / len(generations)


def distinct_n(generations: Sequence[Sequence[int]], n: int) -> float:
    """Corpus-level distinct-n (Li et al. 2016): unique n-grams / all n-grams, over all generations.

    Returns 0.0 when no generation is at least n tokens long.
    """
    if n < 1:
        raise RetrolmError("distinct_n needs n >= 1")
    seen: set[tuple[int, ...]] = set()
    total = 0
    for g in generations:
        g = list(g)
        for i in range(len(g) - n + 1):
            seen.add(tuple(g[i : i + n]))
            total += 1
    return len(seen) / total if total else 0.0


def mean_length(generations: Sequence[Sequence[int]]) -> float:
    """Mean number of tokens per generation (stops and EOS shorten generations)."""
    if len(generations) == 0:
        raise RetrolmError("mean_length needs at least one generation")
    return float(np.mean([len(g) for g in generations]))


# ---------------------------------------------------------------------- overlap


def longest_common_substring(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest contiguous token run that occurs in both a and b."""
    a_arr = np.asarray(a, dtype=np.int64)
    b_arr = np.asarray(b, dtype=np.int64)
    if a_arr.size == 0 or b_arr.size == 0:
        return 0
    out = batch_longest_common_substring(a_arr[None, :], b_arr[None, None, :])
    return int(out[0, 0])


def batch_longest_common_substring(
    chunks: np.ndarray,
    neighbours: np.ndarray,
    chunk_mask: np.ndarray | None = None,
    neighbour_mask: np.ndarray | None = None,
    block: int = 1024,
) -> np.ndarray:
    """LCS length of every chunk against each of its neighbours.

    chunks (N, m), neighbours (N, k, r); masks True = real token (padding never matches).
    Returns int64 (N, k). One DP row per chunk position, vectorised over N, k and r;
    processed in blocks of `block` chunks to bound memory.
    """
    chunks = np.asarray(chunks)
    neighbours = np.asarray(neighbours)
    if chunks.ndim != 2 or neighbours.ndim != 3 or neighbours.shape[0] != chunks.shape[0]:
        raise RetrolmError(
            f"expected chunks (N, m) and neighbours (N, k, r); got {chunks.shape} and "
            f"{neighbours.shape}"
        )
    n, m = chunks.shape
    _, k, r = neighbours.shape
    out = np.zeros((n, k), dtype=np.int64)
    for s in range(0, n, block):
        c = chunks[s : s + block]  # (b, m)
        nb = neighbours[s : s + block]  # (b, k, r)
        eq = c[:, None, :, None] == nb[:, :, None, :]  # (b, k, m, r)
        if chunk_mask is not None:
            eq &= np.asarray(chunk_mask, dtype=bool)[s : s + block, None, :, None]
        if neighbour_mask is not None:
            eq &= np.asarray(neighbour_mask, dtype=bool)[s : s + block, :, None, :]
        b = c.shape[0]
        run = np.zeros((b, k, r + 1), dtype=np.int32)  # run[..., j+1]: run ending at (i, j)
        best = np.zeros((b, k), dtype=np.int32)
        for i in range(m):
            new = np.zeros_like(run)
            new[..., 1:] = (run[..., :-1] + 1) * eq[:, :, i, :]
            run = new
            np.maximum(best, run.max(axis=-1), out=best)
        out[s : s + b] = best
    return out


def chunk_overlap_ratio(
    chunk: Sequence[int], neighbours: Sequence[Sequence[int]], m: int
) -> float:
    """r(C) of docs/reference.md §1: max over neighbours of LCS(chunk, neighbour) / m."""
    if m <= 0:
        raise RetrolmError("chunk_overlap_ratio needs chunk size m > 0")
    best = max((longest_common_substring(chunk, nb) for nb in neighbours), default=0)
    return best / m


def overlap_buckets(
    ratios: Sequence[float],
    chunk_nll_nats: Sequence[float],
    chunk_bytes: Sequence[int],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
) -> list[dict]:
    """Per alpha: share of chunks with r(C) <= alpha and bits-per-byte over those chunks.

    Inputs are per evaluation chunk: overlap ratio, total NLL in nats, UTF-8 byte count.
    Each row: {"alpha", "n_chunks", "share", "bpb"}; bpb is NaN for an empty bucket.
    """
    r = np.asarray(ratios, dtype=np.float64)
    nll = np.asarray(chunk_nll_nats, dtype=np.float64)
    nbytes = np.asarray(chunk_bytes, dtype=np.float64)
    if not (r.shape == nll.shape == nbytes.shape) or r.ndim != 1:
        raise RetrolmError(
            "overlap_buckets needs ratios, NLLs and byte counts as 1-D arrays of one length"
        )
    rows = []
    for alpha in alphas:
        sel = r <= alpha + 1e-12
        count = int(sel.sum())
        total_bytes = float(nbytes[sel].sum())
        bpb = bits_per_byte(float(nll[sel].sum()), total_bytes) if total_bytes > 0 else math.nan
        rows.append(
            {
                "alpha": float(alpha),
                "n_chunks": count,
                "share": count / r.size if r.size else math.nan,
                "bpb": bpb,
            }
        )
    return rows


# ------------------------------------------------------------- bpb / perplexity


def bits_per_byte(total_nll_nats: float, total_bytes: float) -> float:
    """Tokenizer-independent loss: total NLL converted to bits, divided by UTF-8 bytes."""
    if total_bytes <= 0:
        raise RetrolmError("bits_per_byte needs a positive byte count")
    return float(total_nll_nats) / (math.log(2) * float(total_bytes))


def perplexity(total_nll_nats: float, total_tokens: float) -> float:
    """exp(mean NLL per token)."""
    if total_tokens <= 0:
        raise RetrolmError("perplexity needs a positive token count")
    return math.exp(float(total_nll_nats) / float(total_tokens))

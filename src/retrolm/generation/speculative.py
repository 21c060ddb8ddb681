"""Retrieval-draft speculative decoding (SPEC §4): propose, verify in one step, roll back.

Drafts come first from the real tokens of the newest neighbours (a retrieved chunk and its
continuation: where the text just generated also occurs there, what follows it is a good
guess), then from n-gram matches in the prompt and the text generated so far. The model
checks the whole draft in ONE cached `step`; the longest prefix that agrees with its own
greedy choice is kept, plus the model's token after it, and the cache is rolled back over
the rest. Only greedy decoding is supported, so the output is exactly plain greedy output.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _continuations(source: np.ndarray, suffix: np.ndarray, max_len: int, latest: bool) -> np.ndarray:
    """Tokens following an occurrence of `suffix` in `source` (longest; ties: first or latest)."""
    n = len(suffix)
    if len(source) <= n:
        return source[:0]
    windows = np.lib.stride_tricks.sliding_window_view(source[:-1], n)  # (len-n, n): a token must follow
    hits = np.flatnonzero((windows == suffix).all(axis=1))
    if len(hits) == 0:
        return source[:0]
    ends = hits + n
    avail = np.minimum(len(source) - ends, max_len)
    best = np.flatnonzero(avail == avail.max())
    i = best[-1] if latest else best[0]
    return source[ends[i] : ends[i] + avail[i]]


def propose_draft(
    context: Sequence[int],
    neighbours: Sequence[np.ndarray],
    max_len: int,
    max_ngram: int = 4,
    min_ngram: int = 1,
    history_min_ngram: int = 2,
) -> tuple[list[int], str]:
    """Draft up to `max_len` tokens to follow `context`; return (draft, where from).

    Longer suffix matches are tried first. For each suffix length n, the neighbours are
    searched (newest first), then `context` itself (n >= `history_min_ngram`, most
    recent occurrence). "where from" is "neighbours", "history" or "" (no draft).
    """
    if max_len <= 0 or len(context) == 0:
        return [], ""
    ctx = np.asarray(context, dtype=np.int64)
    for n in range(min(max_ngram, len(ctx)), min_ngram - 1, -1):
        suffix = ctx[-n:]
        for nb in neighbours:
            got = _continuations(np.asarray(nb, dtype=np.int64), suffix, max_len, latest=False)
            if len(got):
                return [int(t) for t in got], "neighbours"
        if n >= history_min_ngram and len(ctx) > n:
            got = _continuations(ctx, suffix, max_len, latest=True)  # the suffix itself is excluded
            if len(got):
                return [int(t) for t in got], "history"
    return [], ""

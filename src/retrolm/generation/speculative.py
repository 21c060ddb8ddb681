"""Retrieval-draft speculative decoding: propose, verify in one step, roll back.

Drafts come first from the real tokens of the newest neighbours (a retrieved chunk and its
continuation: where the text just generated also occurs there, what follows it is a good
guess), then from n-gram matches in the prompt and the text generated so far. The model
checks the whole draft in ONE cached `step`; an accepted prefix is kept, plus one token
of the model's own after it, and the cache is rolled back over the rest.

Acceptance is lossless for both decoding modes:
- greedy: a draft token is kept while it equals the model's argmax, so the output is
  exactly plain greedy output;
- sampling (Leviathan et al. 2023; Chen et al. 2023): a draft token x is kept with
  probability min(1, p(x)/q(x)), where p is the model's (penalised, tempered, top-k/top-p
  filtered) distribution and q the drafter's. Drafts here are deterministic (q is a point
  mass on x), so x is kept with probability p(x); on rejection the token is drawn from
  norm(max(p - q, 0)), i.e. p without x, renormalised. Each emitted token is therefore
  distributed exactly as in plain sampling (not the same tokens for the same seed: the
  random numbers are consumed differently).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from retrolm.generation.sampling import SamplingParams, apply_repetition_penalty, sampling_probs

if TYPE_CHECKING:
    from retrolm.generation.decode import StopChecker, _Row
    from retrolm.generation.retrieval import OnlineRetriever
    from retrolm.model.retro import Retro


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
    min_ngram: int = 2,
    history_min_ngram: int = 2,
    use_history: bool = True,
) -> tuple[list[int], str]:
    """Draft up to `max_len` tokens to follow `context`; return (draft, where from).

    Longer suffix matches are tried first. For each suffix length n, the neighbours are
    searched (newest first), then `context` itself (n >= `history_min_ngram`, most
    recent occurrence; skipped without `use_history`). "where from" is "neighbours",
    "history" or "" (no draft).
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
        if use_history and n >= history_min_ngram and len(ctx) > n:
            got = _continuations(ctx, suffix, max_len, latest=True)  # the suffix itself is excluded
            if len(got):
                return [int(t) for t in got], "history"
    return [], ""


class DraftBudget:
    """Adaptive draft length per source: long drafts while they are accepted, short when not.

    Verifying d drafted tokens costs a step over 1 + d tokens; when a source's drafts keep
    failing, its drafts shrink towards 1 token so a rejection costs little. Keeps an
    exponential moving average of the accepted length per source; the next draft from that
    source may have ceil(average) + 1 tokens (at most `max_len`). A source whose average
    fell below `starved` drafts nothing, except one probe every `probe_every` proposals
    (so it can recover). Output is unaffected: this only changes what is verified.
    """

    def __init__(self, max_len: int, decay: float = 0.7, starved: float = 0.2,
                 probe_every: int = 8) -> None:
        self.max_len = max_len
        self.decay = decay
        self.starved = starved
        self.probe_every = probe_every
        self.mean: dict[str, float] = {}
        self.skipped: dict[str, int] = {}

    def limit(self, source: str) -> int:
        mean = self.mean.get(source, float(self.max_len))
        if mean < self.starved:
            self.skipped[source] = self.skipped.get(source, 0) + 1
            if self.skipped[source] % self.probe_every:
                return 0
        return max(1, min(self.max_len, int(np.ceil(mean)) + 1))

    def update(self, source: str, accepted: int) -> None:
        mean = self.mean.get(source, float(self.max_len))
        self.mean[source] = self.decay * mean + (1 - self.decay) * accepted


def _accept_sampled(
    probs: Tensor, draft_token: int, generator: torch.Generator
) -> tuple[bool, int]:
    """probs (V,) target distribution; keep `draft_token` with probability p(x), else draw
    from p with x removed and renormalised. Returns (kept, token)."""
    p_x = float(probs[draft_token])
    if float(torch.rand((), generator=generator)) < p_x:
        return True, draft_token
    residual = probs.clone()
    residual[draft_token] = 0.0
    if float(residual.sum()) <= 0.0:  # p(x) == 1 up to rounding: nothing else can be drawn
        return True, draft_token
    return False, int(torch.multinomial(residual, 1, generator=generator))


def verify_draft(
    logits: Tensor,  # (1, 1 + d, V): the model's outputs after `pending` and each draft token
    history: Tensor,  # (1, start + 1 + d): all tokens fed so far (for the repetition penalty)
    start: int,  # position of `pending`
    draft: list[int],  # d drafted tokens
    params: SamplingParams,
    generator: torch.Generator | None,  # required when sampling
) -> tuple[int, int]:
    """(number of draft tokens accepted, the model's own token after them)."""
    for i in range(len(draft) + 1):
        context = history[:, : start + i + 1]
        if params.is_greedy:
            pick = int(apply_repetition_penalty(logits[:, i].float(), context,
                                                params.repetition_penalty).argmax(-1)[0])  # fmt: skip
            if i < len(draft) and pick == draft[i]:
                continue
            return i, pick
        assert generator is not None
        probs = sampling_probs(logits[:, i], context, params)[0]  # (V,)
        if i == len(draft):  # every draft token kept: one more from the model itself
            return i, int(torch.multinomial(probs, 1, generator=generator))
        kept, token = _accept_sampled(probs, draft[i], generator)
        if not kept:
            return i, token
    raise AssertionError("unreachable")


def decode_speculative(
    model: Retro,
    row: _Row,
    cache: Any,  # RetroCache holding the prompt
    pending: int,  # the model's certain next token (not yet fed)
    params: SamplingParams,
    checker: StopChecker,
    retriever: OnlineRetriever | None,
    generator: torch.Generator | None,
    draft_len: int,
    draft_history: bool,
    stats: dict[str, Any],
) -> Iterator[None]:
    """Decode one row: draft, verify in one step, keep the accepted part; yield after each step.

    Returns when the row is done. `stats` gains drafted / accepted / accepted_from counts.
    """
    m = model.config.chunk_size
    device = next(model.parameters()).device
    budget = DraftBudget(draft_len)
    while True:
        if checker.push(row, pending):
            yield
            return
        start = len(cache)  # position of `pending`
        room = checker.max_new_tokens - len(row.generated)
        if retriever is not None:
            # end the draft before the next chunk-completing position, so the only token
            # that ever triggers a search is the certain `pending` one (no wasted searches)
            boundary = start + (m - 1 - start % m) if start % m != m - 1 else start + m
            room = min(room, boundary - start - 1)
        context = row.prompt_ids + row.generated
        # neighbours of the newest chunks complete before `pending` (the drafts continue them)
        limits = {"neighbours": budget.limit("neighbours") if retriever else 0,
                  "history": budget.limit("history") if draft_history else 0}  # fmt: skip
        sources = retriever.neighbour_tokens(0, start // m - 1) if retriever and limits["neighbours"] else []
        draft, origin = propose_draft(context, sources, min(draft_len, room),
                                      use_history=limits["history"] > 0)  # fmt: skip
        draft = draft[: limits[origin]] if draft else draft
        feed = torch.tensor([[pending, *draft]], device=device)  # (1, 1 + d)
        logits, cache = model.step(feed, cache, retriever)
        stats["model_steps"] += 1
        accepted, pending = verify_draft(logits, cache.token_history(), start, draft, params, generator)
        if draft:
            stats["drafted"] += len(draft)
            stats["accepted"].append(accepted)
            stats["accepted_from"][origin] += accepted
            budget.update(origin, accepted)
        cache.rollback(start + 1 + accepted)
        for t in draft[:accepted]:
            if checker.push(row, t):
                yield
                return
        yield

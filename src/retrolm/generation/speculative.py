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

"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p.

Greedy decoding is argmax after the repetition penalty (so `--repetition-penalty` also
applies to greedy and to speculative verification, which must pick the same tokens).
Temperature 0 means greedy: the rule lives here (`SamplingParams.is_greedy`) so the CLI,
the Python API and the server agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from retrolm.errors import RetrolmError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token. Greedy (`greedy=True` or `temperature == 0`) ignores
    temperature/top-k/top-p."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off (CTRL-style, on prompt + generated tokens)

    @property
    def is_greedy(self) -> bool:
        """Argmax decoding: asked for, or temperature 0 (the limit of sampling as T -> 0)."""
        return self.greedy or self.temperature == 0

    def validate(self) -> None:
        if not self.temperature >= 0:
            raise RetrolmError(f"temperature {self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise RetrolmError(f"top_k {self.top_k} must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise RetrolmError(f"top_p {self.top_p} must be in (0, 1]")
        if not self.repetition_penalty > 0:
            raise RetrolmError(f"repetition_penalty {self.repetition_penalty} must be > 0 (1 = off)")


def apply_repetition_penalty(logits: Tensor, history: Tensor, penalty: float) -> Tensor:
    """logits (B, V), history (B, n) token ids -> logits with seen tokens made less likely.

    Seen tokens: positive logits are divided by `penalty`, negative ones multiplied (CTRL).
    """
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = torch.gather(logits, 1, history)  # (B, n)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, history, seen)


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """logits (B, V) -> logits with everything outside top-k / the top-p nucleus at -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each token
        drop = before >= top_p  # keeps the smallest prefix whose mass reaches top_p
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits


def sampling_probs(logits: Tensor, history: Tensor, params: SamplingParams) -> Tensor:
    """logits (B, V), history (B, n) -> the distribution sampling draws from (B, V) float32 on CPU.

    Penalty, temperature, top-k, top-p: what plain sampling and speculative verification share.
    """
    logits = apply_repetition_penalty(logits.float(), history, params.repetition_penalty)
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    return torch.softmax(logits, dim=-1).cpu()


def choose_next(
    logits: Tensor,  # (B, V) float
    history: Tensor,  # (B, n) int64: tokens so far (prompt + generated), for the penalty
    params: SamplingParams,
    generators: list[torch.Generator] | None,
) -> Tensor:
    """The next token of each row (B,) int64; one torch.Generator per row when sampling."""
    if params.is_greedy:
        return apply_repetition_penalty(logits.float(), history, params.repetition_penalty).argmax(-1)
    probs = sampling_probs(logits, history, params)  # (B, V)
    assert generators is not None and len(generators) == probs.shape[0]
    picks = [torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)]
    return torch.cat(picks).to(logits.device)

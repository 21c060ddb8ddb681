"""Token log-probabilities for `logprobs` and `echo` (OpenAI's legacy completions shape).

A `TokenLogprobs` scores one sequence (prompt, then completion) through the model's step
API with a KV cache, fed in pieces as they arrive, with the same online retrieval as
generation: each completed chunk of the sequence itself is the query, and chunk u's
neighbours only affect the tokens after chunk u ends (the CCA shift), so every log-prob
is causal. The values are the model's own distribution (log-softmax of its output, or
its copy-head mixture) before temperature, top-k/top-p and repetition penalty.

The first token of a sequence has no log-prob (None): nothing precedes it.
`text_offset` counts characters from the start of the prompt's text, also without echo.
"""

from __future__ import annotations

from typing import Any

import torch

from retrolm.generation.retrieval import OnlineRetriever


class TokenLogprobs:
    """Log-probs, top-n alternatives and text offsets of one growing token sequence."""

    def __init__(self, engine: Any, top_n: int) -> None:
        self.engine, self.top_n = engine, top_n
        self.device = next(engine.model.parameters()).device
        self.ids: list[int] = []
        self.logprobs: list[float | None] = []
        self.top: list[list[tuple[int, float]]] = []
        self.offsets: list[int] = []  # start character of each token in decode(ids)
        self._cache: Any = None
        self._next: torch.Tensor | None = None  # (V,) log-probs of the token after `ids`
        self._retriever = None
        if engine.kind == "retro":
            k = int(engine.model.config.n_neighbors)
            self._retriever = OnlineRetriever(engine.db, k, 1, self.device)

    def feed(self, ids: list[int]) -> None:
        """Score `ids`, the next tokens of the sequence (one model step)."""
        if not ids:
            return
        feed = torch.tensor([ids], device=self.device)  # (1, t)
        out, self._cache = self.engine.model.step(feed, self._cache, self._retriever)
        lp = torch.log_softmax(out[0].float(), dim=-1)  # (t, V)
        dists = lp[:-1] if self._next is None else torch.cat([self._next[None], lp[:-1]])
        targets = torch.tensor(ids[len(ids) - dists.shape[0] :], device=lp.device)
        picked = dists.gather(1, targets[:, None])[:, 0].tolist()  # (t or t-1,)
        values, idx = dists.topk(min(self.top_n, dists.shape[-1]), dim=-1)  # (t', n)
        if self._next is None:
            self.logprobs.append(None)
            self.top.append([])
        self.logprobs += picked
        self.top += [list(zip(i, v, strict=True)) for i, v in zip(idx.tolist(), values.tolist(), strict=True)]
        self._next = lp[-1]
        for token in ids:  # each offset is the length of the text of the tokens before it
            self.offsets.append(len(self._decode(self.ids).rstrip("\ufffd")))
            self.ids.append(token)

    def _decode(self, ids: list[int]) -> str:
        return self.engine.tokenizer.decode(ids)

    def token_text(self, token: int) -> str:
        """A token's own text; EOS (which decoding skips) by its name."""
        tok = self.engine.tokenizer
        if token == tok.eos_id:
            inner = getattr(tok, "inner", None)
            return inner.id_to_token(token) if inner is not None else "<eos>"
        return tok.decode([token])

    def count_before(self, end_char: int, lo: int) -> int:
        """Index past the last token from `lo` on that starts before character `end_char`."""
        hi = lo
        while hi < len(self.ids) and self.offsets[hi] < end_char:
            hi += 1
        return hi

    def block(self, lo: int, hi: int) -> dict[str, Any]:
        """OpenAI's logprobs object for tokens [lo, hi): the token strings join to the text."""
        text = self._decode(self.ids)
        eos = self.engine.tokenizer.eos_id
        tokens = []
        for i in range(lo, hi):  # a token's text ends where the next token's starts
            end = self.offsets[i + 1] if i + 1 < len(self.ids) else len(text)
            piece = text[self.offsets[i] : end]
            tokens.append(self.token_text(eos) if self.ids[i] == eos and not piece else piece)
        top = []
        for i in range(lo, hi):
            if self.logprobs[i] is None:
                top.append(None)
                continue
            alternatives: dict[str, float] = {}
            for token, value in self.top[i]:
                name = self.token_text(token)
                alternatives[name] = max(value, alternatives.get(name, float("-inf")))
            top.append(alternatives)
        return {
            "tokens": tokens,
            "token_logprobs": self.logprobs[lo:hi],
            "top_logprobs": top,
            "text_offset": [min(self.offsets[i], len(text)) for i in range(lo, hi)],
        }

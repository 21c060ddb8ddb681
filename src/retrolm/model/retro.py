"""The RETRO model: causal decoder + neighbour encoder + chunked cross-attention (CCA).

With `cca_layers == []`, `retrieval=False` or no neighbours, the CCA residual branches are
skipped, so the output is exactly the same weights run as a plain GPT.

CCA causality (docs/reference.md §1): with chunk size m, position s >= m-1 attends to the encoded
neighbours of chunk u = (s+1)//m - 1, i.e. the last token of chunk u and the first m-1
tokens of chunk u+1 see chunk u's neighbours; positions 0..m-2 get a zero update. The
neighbours of chunk u are encoded conditioned on the decoder hidden states of chunk u at
the input of the first CCA (after that block's self-attention).

One code path serves training (`forward`) and incremental decoding (`step` with a
`RetroCache`); docs/model.md has the step API with a worked example.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrolm.errors import RetrolmError
from retrolm.model.config import RetroConfig
from retrolm.model.copy_head import (
    NO_TOKEN,
    NeighbourCopyHead,
    mix,
    mixture_log_likelihood,
    neighbour_features,
    query_features,
    successor_mass,
)
from retrolm.model.layers import MLP, CrossAttention, LayerKV, RMSNorm, Rotary, SelfAttention

RETRIEVAL_MODULES = ("encoder.", "copy_head.")  # top-level retrieval modules
RETRIEVAL_PARTS = (".cca.", ".norm_cca.")  # retrieval sublayers inside decoder blocks


def is_retrieval_parameter(name: str) -> bool:
    """True for parameters of the encoder, the CCA layers and the copy head (what RETRO adds)."""
    return name.startswith(RETRIEVAL_MODULES) or any(part in name for part in RETRIEVAL_PARTS)


# CCA context for the query groups of a step: encoded neighbours (B, G, S, E), their mask
# (B, G, S), their tokens (B, G, S) with NO_TOKEN padding, and the first group's chunk index.
Context = tuple[Tensor, Tensor, Tensor, int]
# Per-chunk encoding: (states (B, S, E), mask (B, S), tokens (B, S)).
Encoded = tuple[Tensor, Tensor, Tensor]
# The copy head's mixture per position (copy_head.py): log-weights of the neighbour slots
# (B, t, S), log-weight of the sentinel (B, t), the slots' successor tokens (B, t, S), and
# the copy mass per distinct successor (B, t, S).
Mixture = tuple[Tensor, Tensor, Tensor, Tensor]


# retrieve(chunk_index, chunk_tokens (B, m)) -> (neighbours (B, k, r), mask (B, k, r) | None) | None
Retriever = Callable[[int, Tensor], "tuple[Tensor, Tensor | None] | None"]


@dataclass
class RetroCache:
    """Decoding state: tokens so far, per-layer KV, first-CCA inputs, encoded neighbours.

    `rollback(n)` returns to the state after the first n tokens (speculative decoding).
    """

    batch_size: int
    chunk_size: int
    length: int = 0
    tokens: Tensor | None = None  # (B, capacity) int64
    kv: list[LayerKV] = field(default_factory=list)
    hidden: Tensor | None = None  # (B, capacity, C): decoder states at the first CCA input
    encoded: dict[int, Encoded | None] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.length

    def rollback(self, length: int) -> None:
        """Forget everything after the first `length` tokens (neighbours of incomplete chunks too)."""
        if not 0 <= length <= self.length:
            raise RetrolmError(
                f"cannot roll the cache back to {length}; it holds {self.length} tokens"
            )
        self.length = length
        for layer in self.kv:
            layer.length = min(layer.length, length)
        complete = length // self.chunk_size  # chunks 0..complete-1 are complete at `length`
        self.encoded = {u: e for u, e in self.encoded.items() if u < complete}

    def token_history(self) -> Tensor:
        """All tokens fed so far (B, length)."""
        assert self.tokens is not None
        return self.tokens[:, : self.length]

    def _write(self, name: str, start: int, values: Tensor) -> Tensor:
        """Write values (B, t, ...) at [start, start+t) into a growable buffer; return [0, end)."""
        buf = getattr(self, name)
        end = start + values.shape[1]
        if buf is None or end > buf.shape[1]:
            capacity = max(end, 2 * (buf.shape[1] if buf is not None else 0), 64)
            new = values.new_zeros(values.shape[0], capacity, *values.shape[2:])
            if buf is not None:
                new[:, :start] = buf[:, :start]
            buf = new
            setattr(self, name, buf)
        buf[:, start:end] = values
        return buf[:, :end]


class DecoderBlock(nn.Module):
    """Pre-norm block: self-attention, (CCA), MLP — each a residual branch."""

    def __init__(self, config: RetroConfig, has_cca: bool):
        super().__init__()
        c = config
        self.norm_attn = RMSNorm(c.d_model, eps=c.norm_eps)
        self.attn = SelfAttention(c.d_model, c.n_heads, c.dropout)
        self.norm_cca = RMSNorm(c.d_model, eps=c.norm_eps) if has_cca else None
        self.cca = (
            CrossAttention(c.d_model, c.enc_d_model, c.n_heads, c.dropout) if has_cca else None
        )
        self.norm_mlp = RMSNorm(c.d_model, eps=c.norm_eps)
        self.mlp = MLP(c.d_model, c.d_ff, c.mlp)
        self.drop = nn.Dropout(c.dropout)


class EncoderBlock(nn.Module):
    """Bidirectional block over one neighbour; the first also cross-attends to its chunk."""

    def __init__(self, config: RetroConfig, cross: bool):
        super().__init__()
        c, e = config, config.enc_d_model
        self.norm_attn = RMSNorm(e, eps=c.norm_eps)
        self.attn = SelfAttention(e, c.enc_heads, c.dropout)
        self.norm_cross = RMSNorm(e, eps=c.norm_eps) if cross else None
        self.norm_ctx = RMSNorm(c.d_model, eps=c.norm_eps) if cross else None
        self.cross = CrossAttention(e, c.d_model, c.enc_heads, c.dropout) if cross else None
        self.norm_mlp = RMSNorm(e, eps=c.norm_eps)
        self.mlp = MLP(e, c.enc_d_ff, c.mlp)


class NeighbourEncoder(nn.Module):
    """Encodes each neighbour (r tokens) separately, conditioned on its chunk's decoder states."""

    def __init__(self, config: RetroConfig):
        super().__init__()
        c = config
        self.proj_in = (
            nn.Linear(c.d_model, c.enc_d_model, bias=False)
            if c.enc_d_model != c.d_model
            else nn.Identity()
        )
        self.blocks = nn.ModuleList(EncoderBlock(c, cross=(j == 0)) for j in range(c.enc_layers))
        self.norm = RMSNorm(c.enc_d_model, eps=c.norm_eps)
        self.rotary = Rotary(c.enc_d_model // c.enc_heads, c.rope_base)

    def forward(self, emb: Tensor, mask: Tensor, chunk_states: Tensor) -> Tensor:
        """emb (N, k, r, C) neighbour embeddings, mask (N, k, r), chunk_states (N, m, C) -> (N, k*r, E)."""
        N, k, r, _ = emb.shape
        x = self.proj_in(emb).reshape(N * k, r, -1)  # (N*k, r, E)
        key_mask = mask.reshape(N * k, r)
        cos, sin = self.rotary.span(0, r, x.dtype)
        for block in self.blocks:
            x = x + block.attn(block.norm_attn(x), cos, sin, causal=False, key_mask=key_mask)
            if block.cross is not None:  # every neighbour token attends to all m chunk states
                q = block.norm_cross(x).reshape(N, k * r, -1)
                ctx = block.norm_ctx(chunk_states)
                x = x + block.cross(q, ctx).reshape(N * k, r, -1)
            x = x + block.mlp(block.norm_mlp(x))
        return self.norm(x).reshape(N, k * r, -1)


class Retro(nn.Module):
    """RETRO decoder (a GPT when `config.cca_layers` is empty). See the module docstring."""

    def __init__(self, config: RetroConfig):
        super().__init__()
        config.validate()
        # One draw before any module exists: a GPT and a RETRO built after the same seed get
        # bit-identical decoder weights (see _init_weights), so comparisons are paired.
        init_seed = int(torch.randint(0, 2**62, (), device="cpu").item())
        self.config = c = config
        cca = {i - 1 for i in c.cca_layers}  # 0-based
        self.first_cca = min(cca) if cca else -1
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(DecoderBlock(c, i in cca) for i in range(c.n_layers))
        self.encoder = NeighbourEncoder(c) if cca else None
        self.copy_head = NeighbourCopyHead(c) if cca and c.copy_head else None
        self.norm = RMSNorm(c.d_model, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.rotary = Rotary(c.d_model // c.n_heads, c.rope_base)
        self._init_weights(init_seed)

    def _init_weights(self, seed: int) -> None:
        """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers).

        The decoder's weights come from one generator and the retrieval parts (encoder,
        CCA) from another, so adding CCA layers does not change the decoder's start.
        """
        decoder = torch.Generator().manual_seed(seed)
        retrieval = torch.Generator().manual_seed(seed + 1)
        scaled = 0.02 / math.sqrt(2 * self.config.n_layers)
        matrices = {
            id(module.weight)
            for module in self.modules()
            if isinstance(module, (nn.Linear, nn.Embedding))
        }
        for name, param in self.named_parameters():  # a tied weight appears once
            if id(param) not in matrices or param.is_meta:
                continue  # norm gains keep their ones; meta tensors (size counting) hold no data
            std = scaled if name.endswith(("out.weight", "down.weight")) else 0.02
            generator = retrieval if is_retrieval_parameter(name) else decoder
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            with torch.no_grad():
                param.copy_(noise.to(param.device, param.dtype) * std)

    # -- public API ---------------------------------------------------------------------

    def forward(
        self,
        tokens: Tensor,  # (B, T) int64
        neighbours: Tensor | None = None,  # (B, l, k, r) int64, l = ceil(T/m)
        neighbour_mask: Tensor | None = None,  # (B, l, k, r) bool, True = real token
        targets: Tensor | None = None,  # (B, T), -100 = ignore
        retrieval: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, V) and the mean cross-entropy over targets != -100 (or None)."""
        if tokens.dim() != 2:
            raise RetrolmError(f"tokens must be (batch, length), got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        source = None
        if retrieval and neighbours is not None and self.encoder is not None:
            source = self._tensor_source(neighbours, neighbour_mask, B, T)
        logits, log_probs, mixture = self._run(tokens, 0, None, source)
        loss = None
        if targets is not None:
            if log_probs is None:  # no copy head at work: the logits are the decoder's
                loss = _cross_entropy(logits, targets)
            else:
                loss = _copy_loss(log_probs, mixture, targets, self.config.copy_decoder_loss)
        return logits, loss

    def new_cache(self, batch_size: int) -> RetroCache:
        """An empty decoding cache."""
        return RetroCache(batch_size, self.config.chunk_size, kv=[LayerKV() for _ in self.blocks])

    @torch.no_grad()
    def step(
        self,
        tokens: Tensor,  # (B, t) int64: the next t tokens (a prompt, one token, or a draft)
        cache: RetroCache | None = None,
        retrieve: Retriever | None = None,
    ) -> tuple[Tensor, RetroCache]:
        """Feed t new tokens after the cached ones; return their logits (B, t, V) and the cache.

        Whenever a chunk u becomes complete inside these t tokens, the model calls
        `retrieve(u, chunk_tokens (B, m))` BEFORE the completing token goes through CCA and
        caches the encoded result; returning None (or retrieve=None) means no neighbours
        for that chunk (zero CCA update, as a GPT). Roll back with `cache.rollback(n)`.
        """
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise RetrolmError(
                f"step needs tokens of shape (batch, t>=1), got {tuple(tokens.shape)}"
            )
        if cache is None:
            cache = self.new_cache(tokens.shape[0])
        if tokens.shape[0] != cache.batch_size:
            raise RetrolmError(
                f"batch size {tokens.shape[0]} differs from the cache's {cache.batch_size}"
            )
        start = cache.length
        cache._write("tokens", start, tokens)
        source = (
            self._callback_source(retrieve, cache)
            if self.encoder is not None and retrieve is not None
            else None
        )
        try:
            logits, _, _ = self._run(tokens, start, cache, source)
        except BaseException:
            cache.rollback(start)  # a failed step (e.g. in retrieve) leaves the cache as it was
            raise
        cache.length = start + tokens.shape[1]
        return logits, cache

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (tied weights once); optionally without the token embedding."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward); see retrolm.model.flops."""
        from retrolm.model.flops import flops_per_token

        return flops_per_token(self.config, seq_len)["train"]

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Save as a model directory (retrolm.checkpoints: config.json + model.safetensors)."""
        from retrolm.checkpoints import save_model  # imported here: it imports this module

        save_model(self, path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], map_location: str = "cpu") -> Retro:
        """Load a model directory or a run directory, whichever decoder it was built with
        (the same `retrolm.checkpoints.load_checkpoint` every stage uses)."""
        from retrolm.checkpoints import load_checkpoint  # imported here: it imports this module

        return load_checkpoint(path, map_location=map_location)

    # -- neighbour sources ----------------------------------------------------------------

    def _tensor_source(
        self, neighbours: Tensor, mask: Tensor | None, B: int, T: int
    ) -> Callable[[int, int, Tensor], Encoded]:
        """Neighbours given for all chunks up front (training / evaluation)."""
        m, r = self.config.chunk_size, self.config.neighbor_len
        if neighbours.dim() != 4 or neighbours.shape[0] != B or neighbours.shape[3] != r:
            raise RetrolmError(
                f"neighbours must be (batch={B}, chunks, k, r={r}), got {tuple(neighbours.shape)}"
            )
        if neighbours.shape[1] < T // m:
            raise RetrolmError(
                f"neighbours cover {neighbours.shape[1]} chunks but {T} tokens need {-(-T // m)}"
            )
        if mask is not None and mask.shape != neighbours.shape:
            raise RetrolmError(
                f"neighbour_mask shape {tuple(mask.shape)} differs from neighbours {tuple(neighbours.shape)}"
            )
        if mask is None:
            mask = torch.ones_like(neighbours, dtype=torch.bool)

        def source(first: int, last: int, hidden: Tensor) -> Encoded:
            return self._encode(
                neighbours[:, first : last + 1], mask[:, first : last + 1].bool(), hidden
            )

        return source

    def _callback_source(
        self, retrieve: Retriever | None, cache: RetroCache
    ) -> Callable[[int, int, Tensor], Encoded]:
        """Neighbours fetched per completed chunk through the caller's `retrieve` (decoding)."""
        m, r = self.config.chunk_size, self.config.neighbor_len

        def source(first: int, last: int, hidden: Tensor) -> Encoded:
            history = cache.tokens
            assert history is not None
            entries: list[Encoded | None] = []
            for u in range(first, last + 1):
                got = retrieve(u, history[:, u * m : (u + 1) * m]) if retrieve is not None else None
                if got is None:
                    cache.encoded[u] = None
                    entries.append(None)
                    continue
                nb, nb_mask = got
                if nb.dim() != 3 or nb.shape[0] != cache.batch_size or nb.shape[2] != r:
                    raise RetrolmError(
                        f"retrieve() must return neighbours (batch, k, r={r}), got {tuple(nb.shape)}"
                    )
                nb_mask = (
                    torch.ones_like(nb, dtype=torch.bool) if nb_mask is None else nb_mask.bool()
                )
                enc, enc_mask, enc_tokens = self._encode(
                    nb[:, None], nb_mask[:, None], hidden[:, u - first, None]
                )
                cache.encoded[u] = (enc[:, 0], enc_mask[:, 0], enc_tokens[:, 0])
                entries.append(cache.encoded[u])
            return _stack_encoded(entries, hidden, self.config.enc_d_model)

        return source

    def _encode(self, nb: Tensor, mask: Tensor, hidden: Tensor) -> Encoded:
        """nb (B, n, k, r), mask (B, n, k, r), hidden (B, n, m, C) -> states (B, n, k*r, E),
        mask (B, n, k*r), tokens (B, n, k*r) with NO_TOKEN where the mask is False."""
        assert self.encoder is not None
        B, n, k, r = nb.shape
        emb = self.tok_emb(nb.long())  # (B, n, k, r, C): the decoder's embedding, shared
        out = self.encoder(
            emb.reshape(B * n, k, r, -1),
            mask.reshape(B * n, k, r),
            hidden.reshape(B * n, *hidden.shape[2:]),
        )
        tokens = nb.long().masked_fill(~mask, NO_TOKEN).reshape(B, n, k * r)
        return out.reshape(B, n, k * r, -1), mask.reshape(B, n, k * r), tokens

    # -- the one forward path ---------------------------------------------------------------

    def _run(
        self,
        tokens: Tensor,  # (B, t) new tokens at positions [start, start + t)
        start: int,
        cache: RetroCache | None,
        source: Callable[[int, int, Tensor], Encoded] | None,
    ) -> tuple[Tensor, Tensor | None, Mixture | None]:
        """Output (B, t, V), and for the copy head the decoder's log-probs and mixture (`_head`)."""
        B, t = tokens.shape
        x = self.drop(self.tok_emb(tokens))  # (B, t, C)
        cos, sin = self.rotary.span(start, start + t, x.dtype)
        context = None
        for i, block in enumerate(self.blocks):
            kv = cache.kv[i] if cache is not None else None
            x = x + block.drop(block.attn(block.norm_attn(x), cos, sin, causal=True, cache=kv))
            if i == self.first_cca and source is not None:
                context = self._context(x, start, cache, source)
            if block.cca is not None and context is not None:
                x = x + block.drop(self._cca(block, x, start, context))
            x = x + block.drop(block.mlp(block.norm_mlp(x)))
        return self._head(x, tokens, start, cache, source is not None, context)

    def _head(
        self,
        x: Tensor,  # (B, t, C) last hidden states of positions [start, start+t)
        tokens: Tensor,  # (B, t) the new tokens
        start: int,
        cache: RetroCache | None,
        retrieval: bool,
        context: Context | None,
    ) -> tuple[Tensor, Tensor | None, Mixture | None]:
        """Output (B, t, V), the decoder's log-probs (B, t, V) and the copy mixture.

        Without a copy head (or with retrieval off) the output is the decoder's logits and
        the other two are None. With it, the output holds log-probabilities of the mixture
        (the decoder's log-softmax where no neighbour is readable), so that the values do not
        depend on where a chunk boundary or a missing neighbour falls; the mixture's parts
        let `_copy_loss` score targets without the vocabulary-sized output.
        """
        logits = self.lm_head(self.norm(x))  # (B, t, V)
        if self.copy_head is None or not retrieval:
            return logits, None, None
        dtype = torch.promote_types(logits.dtype, torch.float32)
        log_probs = torch.log_softmax(logits.to(dtype), dim=-1)  # (B, t, V)
        mixture = self._mixture(x, tokens, start, cache, context)
        if mixture is None:
            return log_probs, log_probs, None
        _, log_sentinel, successors, mass = mixture
        # The logits are dead once normalised (log-softmax keeps its output, not its input),
        # so the output takes their memory instead of a fresh vocabulary-sized tensor.
        spare = logits if logits.dtype == dtype else None
        return mix(log_probs, log_sentinel, successors, mass, out=spare), log_probs, mixture

    def _mixture(
        self,
        x: Tensor,  # (B, t, C) last hidden states of positions [start, start+t)
        tokens: Tensor,  # (B, t)
        start: int,
        cache: RetroCache | None,
        context: Context | None,
    ) -> Mixture | None:
        """The copy head's weights for positions [start, start+t), or None if none reads a neighbour.

        Positions before m-1 get the sentinel alone (log weight 0, no copy weight).
        """
        assert self.copy_head is not None
        if context is None:
            return None
        m, r, L = self.config.chunk_size, self.config.neighbor_len, max(self.config.copy_match, 1)
        states, mask, nb_tokens, group_lo = context  # (B, G, S, E), (B, G, S), (B, G, S)
        B, G, S = mask.shape
        t = x.shape[1]
        first_pos = max(start, m - 1)
        n_new = start + t - first_pos  # positions that read neighbours
        if n_new <= 0:
            return None
        history = tokens if cache is None else cache.tokens[:, : start + t]  # (B, start+t)
        offset, grouped = self._group(x[:, first_pos - start :], start, group_lo, G)
        positions = torch.arange(G * m, device=x.device) + group_lo * m + m - 1  # (G*m,)
        q_tokens = query_features(history, positions.reshape(G, m), L)  # (B, G, m, L)
        key_tokens, successors, has_succ = neighbour_features(nb_tokens, r, L)  # (B, G, S, ...)
        log_copy, log_sentinel = self.copy_head(
            grouped,
            q_tokens.reshape(B * G, m, L),
            states.reshape(B * G, S, -1),
            key_tokens.reshape(B * G, S, L),
            (has_succ & mask).reshape(B * G, S),
        )  # (B*G, m, S), (B*G, m)
        mass = successor_mass(log_copy, successors.reshape(B * G, S))  # (B*G, m, S)
        succ = successors[:, :, None, :].expand(B, G, m, S)

        def ungroup(values: Tensor, fill: float) -> Tensor:
            """(B*G, m, ...) group slots -> (B, t, ...) positions, `fill` before m-1."""
            kept = values.reshape(B, G * m, *values.shape[2:])[:, offset : offset + n_new]
            if first_pos == start:
                return kept
            head = kept.new_full((B, first_pos - start, *kept.shape[2:]), fill)
            return torch.cat([head, kept], dim=1)

        return (
            ungroup(log_copy, float("-inf")),
            ungroup(log_sentinel, 0.0),
            ungroup(succ.reshape(B * G, m, S), 0),
            ungroup(mass, 0.0),
        )

    def _context(
        self,
        x: Tensor,  # (B, t, C) decoder states at the first CCA input, positions [start, start+t)
        start: int,
        cache: RetroCache | None,
        source: Callable[[int, int, Tensor], Encoded] | None,
    ) -> Context | None:
        """Encode chunks completed by these tokens; return CCA context for the groups they query.

        Returns (states (B, G, S, E), mask (B, G, S), tokens (B, G, S), first group) or None when no new
        position reaches a neighbour (all positions < m-1, or no neighbours anywhere).
        """
        m, t = self.config.chunk_size, x.shape[1]
        end = start + t
        hidden = cache._write("hidden", start, x) if cache is not None else x  # (B, end, C)
        first, last = start // m, end // m - 1  # chunks completed at positions in [start, end)
        fresh: dict[int, Encoded | None] = {}
        if last < first or source is None:
            if cache is None or end < m:  # training: no complete chunk, nothing to attend
                return None
        else:
            states = hidden[:, first * m : (last + 1) * m].reshape(
                x.shape[0], last - first + 1, m, -1
            )
            enc, enc_mask, enc_tokens = source(first, last, states)  # (B, n, S, ...)
            if cache is None:  # training from position 0: the groups are exactly chunks 0..last
                return enc, enc_mask, enc_tokens, 0
            for u in range(first, last + 1):
                fresh[u] = (enc[:, u - first], enc_mask[:, u - first], enc_tokens[:, u - first])
        if end < m:
            return None
        group_lo = (max(start, m - 1) + 1) // m - 1
        group_hi = end // m - 1
        entries = [
            fresh[u] if u in fresh else cache.encoded.get(u) for u in range(group_lo, group_hi + 1)
        ]
        if all(e is None for e in entries):
            return None
        return (*_stack_encoded(entries, x, self.config.enc_d_model), group_lo)

    def _group(self, values: Tensor, start: int, group_lo: int, G: int) -> tuple[int, Tensor]:
        """Lay the states of positions [max(start, m-1), ...) (B, t', C) out as CCA query groups.

        Group g holds positions (group_lo+g)*m + m-1 + i, i < m (the m-1 shift); returns the
        slot offset of the first position and the zero-padded groups (B*G, m, C).
        """
        m = self.config.chunk_size
        B, n, C = values.shape
        offset = max(start, m - 1) - (m - 1) - group_lo * m  # slot of the first position
        tail = G * m - offset - n
        return offset, F.pad(values, (0, 0, offset, tail)).reshape(B * G, m, C)

    def _cca(self, block: DecoderBlock, x: Tensor, start: int, context: Context) -> Tensor:
        """Chunked cross-attention for positions [start, start+t) with the m-1 shift."""
        assert block.cca is not None and block.norm_cca is not None
        states, mask, _, group_lo = context  # (B, G, S, E), (B, G, S)
        m, r = self.config.chunk_size, self.config.neighbor_len
        B, t, C = x.shape
        G, S = states.shape[1], states.shape[2]
        first_pos = max(start, m - 1)  # earlier positions attend to nothing
        offset, q = self._group(block.norm_cca(x[:, first_pos - start :]), start, group_lo, G)
        q_rot = self.rotary.span(0, m, x.dtype)  # position inside the group
        k_rot = self.rotary.cyclic(S, r, x.dtype)  # position inside the neighbour
        y = block.cca(q, states.reshape(B * G, S, -1), mask.reshape(B * G, S), q_rot, k_rot)
        y = y.reshape(B, G * m, C)[:, offset : offset + t - (first_pos - start)]
        return F.pad(y, (0, 0, first_pos - start, 0))  # (B, t, C)


def _cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over targets != -100, in at least float32."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).to(dtype), targets.reshape(-1), ignore_index=-100
    )


def _copy_loss(
    log_probs: Tensor, mixture: Mixture | None, targets: Tensor, decoder_weight: float
) -> Tensor:
    """Mean negative log-likelihood of the copy mixture over targets != -100.

    log_probs (B, T, V) the decoder's log-softmax; mixture as from `Retro._mixture` (None:
    the sentinel everywhere). The decoder alone also learns every token (copying would
    otherwise starve it of gradient wherever a neighbour explains the target): its loss is
    added as w * (ce - ce.detach()), so the reported value stays the mixture's. Both read the
    targets' entries of `log_probs` through one gather, so the backward writes no
    vocabulary-sized tensor beyond that gather's.
    """
    valid = targets != -100
    picked = targets.clamp_min(0)
    own = log_probs.gather(-1, picked[..., None]).squeeze(-1)  # (B, T)
    if mixture is None:
        mixed = own
    else:
        log_copy, log_sentinel, successors, _ = mixture
        mixed = mixture_log_likelihood(own, log_sentinel, log_copy, successors, picked)
    count = valid.sum()
    loss = -torch.where(valid, mixed, 0.0).sum() / count
    if decoder_weight > 0:
        own_loss = -torch.where(valid, own, 0.0).sum() / count
        loss = loss + decoder_weight * (own_loss - own_loss.detach())
    return loss


def _stack_encoded(
    entries: list[Encoded | None], like: Tensor, width: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Stack per-chunk encodings (B, S_u, ...) into (B, G, max S, ...), padding with masked slots."""
    present = [e[0] for e in entries if e is not None]
    B, G = like.shape[0], len(entries)
    S = max((s.shape[1] for s in present), default=1)  # no neighbours at all: one masked slot
    out = like.new_zeros(B, G, S, width)
    out_mask = torch.zeros(B, G, S, dtype=torch.bool, device=like.device)
    out_tokens = torch.full((B, G, S), NO_TOKEN, dtype=torch.long, device=like.device)
    for g, entry in enumerate(entries):
        if entry is not None:
            s, msk, tok = entry
            out[:, g, : s.shape[1]] = s
            out_mask[:, g, : s.shape[1]] = msk
            out_tokens[:, g, : s.shape[1]] = tok
    return out, out_mask, out_tokens

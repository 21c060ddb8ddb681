"""Building blocks of the RETRO decoder and neighbour encoder (pure PyTorch).

Attention everywhere goes through `F.scaled_dot_product_attention`. Masks are boolean,
True = may attend. A query with no key to attend to gets a zero update (not NaN): that is
how "the first m-1 tokens attend to nothing" and "missing neighbours" are expressed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Rotary(nn.Module):
    """Rotary position tables for integer positions (any position: RoPE keeps counting).

    The tables of positions 0..n-1 are computed once and kept per (device, dtype); they grow
    by doubling when a longer span is asked for, so a training step builds none.
    """

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}  # (device, dtypes) -> cos, sin

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin tables (n, head_dim/2) for `positions` (n,) int64."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # (n, hd/2)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def span(self, start: int, end: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin (end-start, head_dim/2) of positions start..end-1: views of the cached tables."""
        key = (self.inv_freq.device, self.inv_freq.dtype, dtype)
        cos, sin = self._tables.get(key, (None, None))
        if cos is None or sin is None or cos.shape[0] < end:
            size = max(end, 2 * (cos.shape[0] if cos is not None else 0), 64)
            # plain tensors even when called under inference_mode (training may reuse them)
            with torch.inference_mode(False), torch.no_grad():
                cos, sin = self(torch.arange(size, device=self.inv_freq.device), dtype)
            self._tables[key] = (cos, sin)
        return cos[start:end], sin[start:end]

    def cyclic(self, length: int, period: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Tables (length, head_dim/2) of positions i % period: token i of k neighbours of r."""
        cos, sin = self.span(0, period, dtype)
        if length == period:
            return cos, sin
        repeats = -(-length // period)
        return cos.repeat(repeats, 1)[:length], sin.repeat(repeats, 1)[:length]


class RMSNorm(nn.RMSNorm):
    """RMSNorm computed in float32 whatever the input dtype, the result cast back.

    Under bf16 autocast the input arrives in bf16 while the gain stays float32; torch's
    RMSNorm then warns and falls back to a slow unfused path. Normalising in float32 is
    also the accurate choice. In float32 (and float64) this is exactly `nn.RMSNorm`.
    """

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64
        weight = self.weight.to(dtype) if self.weight is not None else None
        return F.rms_norm(x.to(dtype), self.normalized_shape, weight, self.eps).to(x.dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (first half, second half) of x (..., n, hd) by the tables (n, hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def attend(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, dropout: float) -> Tensor:
    """SDPA with a per-key mask (N, S); rows with no valid key return zeros instead of NaN."""
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    has_key = key_mask.any(dim=-1)  # (N,)
    safe = key_mask | ~has_key[:, None]  # a fully masked row attends everywhere, then is zeroed
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=safe[:, None, None, :], dropout_p=dropout
    )
    return out.masked_fill(~has_key[:, None, None, None], 0.0)


class MLP(nn.Module):
    """Feed-forward block: GELU or SwiGLU."""

    def __init__(self, d_model: int, d_ff: int, kind: str):
        super().__init__()
        self.kind = kind
        self.up = nn.Linear(d_model, 2 * d_ff if kind == "swiglu" else d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h)
        return self.down(h)


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions; causal (decoder) or masked (encoder)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(
        self,
        x: Tensor,  # (B, t, C)
        cos: Tensor,
        sin: Tensor,
        *,
        causal: bool,
        cache: LayerKV | None = None,
        key_mask: Tensor | None = None,  # (B, t) bool, non-causal only
    ) -> Tensor:
        B, t, C = x.shape
        q, k, v = self.qkv(x).view(B, t, 3, self.n_heads, C // self.n_heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, t, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        drop = self.dropout if self.training else 0.0
        if not causal:
            y = attend(q, k, v, key_mask, drop)
        elif cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        else:
            past = cache.length
            k, v = cache.append(k, v)  # (B, H, past + t, hd)
            if t == 1:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
            else:  # new token i sees the whole past and new tokens j <= i
                rows = torch.arange(t, device=x.device)[:, None] + past
                mask = torch.arange(past + t, device=x.device)[None, :] <= rows  # (t, past+t)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.out(y.transpose(1, 2).reshape(B, t, C))


class CrossAttention(nn.Module):
    """Queries of width d_q attend to a context of width d_kv; output has width d_q."""

    def __init__(self, d_q: int, d_kv: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.q = nn.Linear(d_q, d_q, bias=False)
        self.kv = nn.Linear(d_kv, 2 * d_q, bias=False)
        self.out = nn.Linear(d_q, d_q, bias=False)

    def forward(
        self,
        x: Tensor,  # (N, n, d_q)
        ctx: Tensor,  # (N, S, d_kv)
        key_mask: Tensor | None = None,  # (N, S) bool
        q_rot: tuple[Tensor, Tensor] | None = None,  # tables for query positions (n, hd/2)
        k_rot: tuple[Tensor, Tensor] | None = None,  # tables for key positions (S, hd/2)
    ) -> Tensor:
        N, n, C = x.shape
        S, hd = ctx.shape[1], C // self.n_heads
        q = self.q(x).view(N, n, self.n_heads, hd).transpose(1, 2)  # (N, H, n, hd)
        k, v = self.kv(ctx).view(N, S, 2, self.n_heads, hd).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (N, H, S, hd)
        if q_rot is not None and k_rot is not None:
            q, k = apply_rotary(q, *q_rot), apply_rotary(k, *k_rot)
        y = attend(q, k, v, key_mask, self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(N, n, C))


class LayerKV:
    """Growable key/value buffers of one decoder layer; `length` marks the valid prefix."""

    def __init__(self) -> None:
        self.k: Tensor | None = None  # (B, H, capacity, hd)
        self.v: Tensor | None = None
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H, t, hd) after the valid prefix; return views of all valid keys/values."""
        end = self.length + k.shape[2]
        if self.k is None or end > self.k.shape[2]:
            capacity = max(end, 2 * (self.k.shape[2] if self.k is not None else 0), 64)
            new_k = k.new_empty(*k.shape[:2], capacity, k.shape[3])
            new_v = v.new_empty(*v.shape[:2], capacity, v.shape[3])
            if self.k is not None and self.v is not None and self.length:
                new_k[:, :, : self.length] = self.k[:, :, : self.length]
                new_v[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = new_k, new_v
        assert self.v is not None
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

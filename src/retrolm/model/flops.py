"""Parameter counts, FLOPs per token and MFU, so every speed figure can be put in context.

Convention (as in PaLM / nanoGPT): a multiply-add is 2 FLOPs; attention scores count the
full T x T product (causal masking not halved); training = 3 x forward (backward is twice
the forward). Per decoder token, with d = d_model, e = enc_d_model, T = seq_len, m = chunk,
k = neighbours, r = neighbour length, n_r = k*r/m neighbour tokens per decoder token:

  decoder layer  2 * (4 d^2 + mlp(d, d_ff)) + 4 T d
  lm_head        2 d V
  CCA layer      2 * (2 d^2 + n_r * 2 e d) + 4 k r d
  encoder        n_r * [2 * (d e if e != d) + per layer 2 * (4 e^2 + mlp(e, ff_e)) + 4 r e]
                 + first layer cross-attention: n_r * (2 * 2 e^2 + 4 m e) + 2 * 2 d e
  copy head      2 d c + n_r * 2 e c + 2 k r c + 2 d + 2 (k r)^2
                 (c = copy_dim; only with copy_head; the last term is the matmul that sums the
                 copy weights of neighbour slots sharing a successor token)

where mlp(a, f) = 3 a f (SwiGLU) or 2 a f (GELU). Embedding lookups are free, and so is
element-wise work (softmax, norms, the copy head's exact-match features and its
vocabulary-sized mixture: a few V per token, as the GPT's own log-softmax). The encoder and
CCA terms vanish for a GPT (`cca_layers == []`).
"""

from __future__ import annotations

import time

import torch

from retrolm.model.config import RetroConfig


def _mlp_macs(width: int, hidden: int, kind: str) -> int:
    return (3 if kind == "swiglu" else 2) * width * hidden


def flops_per_token(config: RetroConfig, seq_len: int) -> dict[str, float]:
    """FLOPs per decoder token by component, plus 'forward' and 'train' (= 3 x forward).

    'attention_scores' is the share of the components spent in the attention layers' QK^T
    and AV products (no weights involved); the rest is weight matmuls and the copy head's
    two small weight-free products (its scores and successor sums).
    """
    c, T = config, seq_len
    d, e, m, k, r = c.d_model, c.enc_d_model, c.chunk_size, c.n_neighbors, c.neighbor_len
    decoder = c.n_layers * (2 * (4 * d * d + _mlp_macs(d, c.d_ff, c.mlp)) + 4 * T * d)
    head = 2 * d * c.vocab_size
    cca = encoder = copy = 0.0
    scores = c.n_layers * 4 * T * d  # the attention-score part of all terms (no weights)
    if c.cca_layers:
        n_r = k * r / m
        cca = len(c.cca_layers) * (2 * (2 * d * d + n_r * 2 * e * d) + 4 * k * r * d)
        per_nb_token = c.enc_layers * (
            2 * (4 * e * e + _mlp_macs(e, c.enc_d_ff, c.mlp)) + 4 * r * e
        )
        per_nb_token += 2 * d * e if e != d else 0
        per_nb_token += 2 * 2 * e * e + 4 * m * e  # first layer: q/out projections + scores
        encoder = n_r * per_nb_token + 2 * 2 * d * e  # chunk states -> keys/values, once per chunk
        scores += len(c.cca_layers) * 4 * k * r * d + n_r * (c.enc_layers * 4 * r * e + 4 * m * e)
    if c.cca_layers and c.copy_head:
        dc = c.copy_dim
        copy = 2 * d * dc + (k * r / m) * 2 * e * dc + 2 * k * r * dc + 2 * d + 2 * (k * r) ** 2
    forward = decoder + head + cca + encoder + copy
    return {
        "decoder": float(decoder),
        "lm_head": float(head),
        "cca": float(cca),
        "encoder": float(encoder),
        "copy_head": float(copy),
        "attention_scores": float(scores),  # included in the components above
        "forward": float(forward),
        "train": float(3 * forward),
    }


def mfu(flops_per_token: float, tokens_per_second: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak FLOP/s."""
    return flops_per_token * tokens_per_second / peak_flops


def measure_matmul_peak(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    size: int = 1024,
    seconds: float = 1.0,
    windows: int = 5,
) -> float:
    """Measured FLOP/s of a square matmul: the best of `windows` timing windows.

    The best window is the ceiling MFU is quoted against (on a shared machine the average
    would fold other people's load into the peak).
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(3):
        a @ b
    sync()
    best = 0.0
    for _ in range(windows):
        n, start = 0, time.perf_counter()
        while True:
            a @ b
            n += 1
            if n % 4 == 0:
                sync()
                if time.perf_counter() - start >= seconds / windows:
                    break
        best = max(best, 2 * size**3 * n / (time.perf_counter() - start))
    return best

"""Neighbour copy head: a pointer-sentinel mixture over the successors of neighbour tokens.

Beyond the paper (an option, `RetroConfig.copy_head`). Plain RETRO can only copy from a
neighbour after it has grown a match-and-copy circuit across the CCA (find the current
token in the neighbour, read its successor, carry that to the output); small models
trained on a CPU budget never grow it. The copy head gives that circuit a direct path:

    score(s, j) = q(h_s) . k(e_j) / sqrt(d_c) + sum_n w_n [x_{s-n+1..s} == nb_{j-n+1..j}]
    score(s, sentinel) = b + w . h_s
    p(y | s) = a_sentinel * softmax(logits_s)(y) + sum_{j : nb_{j+1} = y} a_j

where a = softmax over the neighbour positions j and the sentinel, h_s is the decoder's
last hidden state at position s, e_j the encoder's state of neighbour token j, and the
bracket terms are exact-match features (the last n tokens before the prediction equal
the n neighbour tokens ending at j), with learned weights w_n. This is the pointer
sentinel mixture of Merity et al. (2016) pointed at retrieved text, the mechanism
behind REST-style copying. Causality is the CCA's: position s reads the neighbours of
chunk (s+1)//m - 1, retrieved with tokens <= s. Without neighbours the sentinel takes all
the mass and the output is the decoder's own distribution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrolm.model.config import RetroConfig

NO_TOKEN = -1  # padding id in the token tensors below (never equal to a real token)
# The scalar parameters (match weights, sentinel bias) are stored divided by this. Adam moves
# every parameter by about lr per step whatever its gradient, so a weight that must reach
# ~5 would need thousands of steps at lr 1e-3; scaled, it gets there in a few hundred.
SCALAR_SCALE = 10.0


class NeighbourCopyHead(nn.Module):
    """Scores every neighbour position (and a sentinel) for each grouped query position."""

    def __init__(self, config: RetroConfig):
        super().__init__()
        c = config
        self.copy_dim, self.n_match = c.copy_dim, c.copy_match
        self.norm_q = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.q = nn.Linear(c.d_model, c.copy_dim, bias=False)
        self.k = nn.Linear(c.enc_d_model, c.copy_dim, bias=False)
        self.sentinel = nn.Linear(c.d_model, 1, bias=False)
        # Start as the decoder alone: the sentinel outweighs all k*r neighbour positions
        # (about 95% of the mass when every score is 0).
        start = math.log(c.n_neighbors * c.neighbor_len) + 3.0
        self.sentinel_bias = nn.Parameter(torch.tensor(start / SCALAR_SCALE))
        self.match_weight = nn.Parameter(torch.zeros(max(c.copy_match, 1)))

    def forward(
        self,
        hidden: Tensor,  # (N, m, C) decoder last hidden states, grouped
        query_tokens: Tensor,  # (N, m, L) tokens x_s, x_{s-1}, ... (NO_TOKEN where none)
        states: Tensor,  # (N, S, E) encoded neighbour tokens
        key_tokens: Tensor,  # (N, S, L) tokens nb_j, nb_{j-1}, ... (NO_TOKEN - 1 where none)
        key_mask: Tensor,  # (N, S) True where position j has a successor to copy
    ) -> tuple[Tensor, Tensor]:
        """Log-weights of the neighbour positions (N, m, S) and of the sentinel (N, m)."""
        h = self.norm_q(hidden)
        q = self.q(h)  # (N, m, D)
        k = self.k(states)  # (N, S, D)
        dtype = torch.promote_types(q.dtype, torch.float32)
        scores = torch.einsum("nmd,nsd->nms", q, k).to(dtype) / math.sqrt(self.copy_dim)
        if self.n_match:
            weights = self.match_weight.to(dtype) * SCALAR_SCALE
            match = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
            for n in range(self.n_match):  # suffix of length n+1 equal on both sides
                match = match & (query_tokens[:, :, None, n] == key_tokens[:, None, :, n])
                scores = scores + weights[n] * match
        scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
        bias = self.sentinel_bias.to(dtype) * SCALAR_SCALE
        sentinel = self.sentinel(h).squeeze(-1).to(dtype) + bias  # (N, m)
        log_norm = torch.logsumexp(torch.cat([scores, sentinel[..., None]], dim=-1), dim=-1)
        return scores - log_norm[..., None], sentinel - log_norm


def neighbour_features(tokens: Tensor, r: int, n_back: int) -> tuple[Tensor, Tensor, Tensor]:
    """From neighbour tokens (..., S) with NO_TOKEN padding, S a multiple of r:

    key tokens (..., S, L): nb_j, nb_{j-1}, ..., within the same neighbour (NO_TOKEN - 1 past
    its start, so never equal to a query's padding); successors (..., S) = nb_{j+1} (0
    where none); has_successor (..., S) bool.
    """
    *lead, S = tokens.shape
    nb = tokens.reshape(*lead, S // r, r)  # (..., k, r)
    filler = NO_TOKEN - 1
    shifted = [nb]
    for n in range(1, n_back):
        shifted.append(F.pad(nb[..., :-n], (n, 0), value=filler) if n < r else torch.full_like(nb, filler))
    keys = torch.stack(shifted, dim=-1)  # (..., k, r, L)
    keys = keys.masked_fill(keys == NO_TOKEN, filler)
    succ = F.pad(nb[..., 1:], (0, 1), value=NO_TOKEN)  # (..., k, r)
    has_succ = (succ != NO_TOKEN) & (nb != NO_TOKEN)
    return (
        keys.reshape(*lead, S, n_back),
        succ.clamp_min(0).reshape(*lead, S),
        has_succ.reshape(*lead, S),
    )


def query_features(history: Tensor, positions: Tensor, n_back: int) -> Tensor:
    """Tokens x_p, x_{p-1}, ... (B, *positions.shape, L) from history (B, end); NO_TOKEN outside."""
    end = history.shape[1]
    back = positions[..., None] - torch.arange(n_back, device=positions.device)  # (..., L)
    valid = (back >= 0) & (back < end)
    picked = history[:, back.clamp(0, end - 1)]  # (B, ..., L)
    return picked.masked_fill(~valid, NO_TOKEN)


def mix(logits: Tensor, log_copy: Tensor, log_sentinel: Tensor, successors: Tensor) -> Tensor:
    """log p (B, t, V) = log(a_sentinel * softmax(logits) + copy mass on the successors).

    logits (B, t, V), log_copy (B, t, S), log_sentinel (B, t), successors (B, t, S) int64.
    Computed in float32 (or float64); the result is a valid logits tensor (it is already normalised).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    p_vocab = torch.softmax(logits.to(dtype), dim=-1) * log_sentinel.to(dtype).exp()[..., None]
    mixed = p_vocab.scatter_add(-1, successors, log_copy.to(dtype).exp())
    return mixed.clamp_min(1e-30).log()

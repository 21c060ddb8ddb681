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
from retrolm.model.layers import RMSNorm

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
        self.norm_q = RMSNorm(c.d_model, eps=c.norm_eps)
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


def successor_mass(log_copy: Tensor, successors: Tensor) -> Tensor:
    """Copy probability per distinct successor token, held by the first slot that has it.

    log_copy (N, m, S) log-weights of the neighbour slots, successors (N, S) their successor
    tokens -> (N, m, S): at the first slot j with successor y, the summed weight of every slot
    whose successor is y; 0 at the other slots. Adding these to the vocabulary distribution
    at `successors` is then a scatter without duplicate indices to resolve.
    """
    S = successors.shape[-1]
    same = successors[:, :, None] == successors[:, None, :]  # (N, S, S)
    earlier = torch.ones(S, S, dtype=torch.bool, device=successors.device).triu(1)  # j' < j
    first = ~(same & earlier).any(dim=1)  # (N, S): no earlier slot with the same successor
    route = (same & first[:, None, :]).to(log_copy.dtype)  # (N, S from, S to)
    return torch.bmm(log_copy.exp(), route)  # (N, m, S)


def mix(
    log_probs: Tensor,
    log_sentinel: Tensor,
    successors: Tensor,
    mass: Tensor,
    out: Tensor | None = None,
) -> Tensor:
    """log p (B, t, V) = log(a_sentinel * p_decoder + copy mass on the successors).

    log_probs (B, t, V) the decoder's log-softmax (float32 or float64), log_sentinel (B, t),
    successors (B, t, S) int64, mass (B, t, S) from `successor_mass`. Worked in log space:
    the vocabulary-sized work is one add and one scatter; only the S successor entries go
    through exp/log. The result is normalised (valid logits). `out`: a dead tensor of
    log_probs' shape and dtype to write the result into (on a CPU a fresh vocabulary-sized
    tensor costs more in page faults than the add itself).
    """
    shift = log_sentinel[..., None]
    base = log_probs + shift if out is None else out.copy_(log_probs).add_(shift)  # (B, t, V)
    at = log_probs.gather(-1, successors) + shift  # (B, t, S): base there
    has = mass > 0
    log_mass = torch.where(has, mass, 1.0).log()  # no log(0): its gradient would be NaN
    delta = torch.where(has, torch.logaddexp(at, log_mass) - at, 0.0)
    return base.scatter_add_(-1, successors, delta)  # in place: `base` is ours alone


def mixture_log_likelihood(
    own: Tensor, log_sentinel: Tensor, log_copy: Tensor, successors: Tensor, targets: Tensor
) -> Tensor:
    """log p(target) (B, t) of the mixture without the vocabulary-sized output.

    own (B, t): the decoder's log-probability of the targets; log_sentinel (B, t); log_copy
    and successors (B, t, S); targets (B, t) (any in-vocabulary value where ignored). The
    same value as `mix(...)` at the targets; training only needs this, so its backward is
    as cheap as a GPT's.
    """
    copied = log_copy.masked_fill(successors != targets[..., None], float("-inf"))  # (B, t, S)
    return torch.logsumexp(torch.cat([(own + log_sentinel)[..., None], copied], dim=-1), dim=-1)

"""AdamW with the usual two parameter groups.

Weight decay pulls weights towards zero; that is a useful prior for matrices in linear
layers but not for norm gains (which should stay near 1), biases or embeddings (rare
tokens would be shrunk for lack of gradient), so those get no decay.
"""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group and a non-decayed group.

    No decay: parameters of `nn.Embedding` modules, anything with fewer than two
    dimensions (norm weights, biases, scalar gates). A parameter shared between an
    embedding and a linear layer (tied LM head) counts as an embedding.
    """
    embedding_ids = {
        id(p)
        for module in model.modules()
        if isinstance(module, nn.Embedding)
        for p in module.parameters(recurse=False)
    }
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, param in model.named_parameters():  # shared parameters appear once
        if not param.requires_grad:
            continue
        if param.ndim < 2 or id(param) in embedding_ids:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model)`; the LR is overwritten every step by the schedule."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)

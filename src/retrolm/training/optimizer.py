"""AdamW with the usual two parameter groups (four with a retrieval LR scale).

Weight decay pulls weights towards zero; that is a useful prior for matrices in linear
layers but not for norm gains (which should stay near 1), biases or embeddings (rare
tokens would be shrunk for lack of gradient), so those get no decay.
"""

from __future__ import annotations

import torch
from torch import nn

from retrolm.model.retro import is_retrieval_parameter


def param_groups(
    model: nn.Module, weight_decay: float, retrieval_lr_scale: float = 1.0
) -> list[dict]:
    """Split trainable parameters into a decayed group and a non-decayed group.

    No decay: parameters of `nn.Embedding` modules, anything with fewer than two
    dimensions (norm weights, biases, scalar gates). A parameter shared between an
    embedding and a linear layer (tied LM head) counts as an embedding.

    With `retrieval_lr_scale != 1` the encoder and CCA parameters get their own two
    groups whose `lr_scale` multiplies the scheduled LR: freshly initialised retrieval
    parts next to a trained decoder (full-training retro-fit) usually want a larger step
    than the decoder. (In from-scratch demo runs it did not help; docs/results.md.)
    """
    embedding_ids = {
        id(p)
        for module in model.modules()
        if isinstance(module, nn.Embedding)
        for p in module.parameters(recurse=False)
    }
    split = retrieval_lr_scale != 1.0
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {
        (d, r): [] for r in ((False, True) if split else (False,)) for d in (True, False)
    }
    for name, param in model.named_parameters():  # shared parameters appear once
        if not param.requires_grad:
            continue
        decayed = not (param.ndim < 2 or id(param) in embedding_ids)
        groups[(decayed, split and is_retrieval_parameter(name))].append(param)
    return [
        {
            "params": params,
            "weight_decay": weight_decay if decayed else 0.0,
            "lr_scale": retrieval_lr_scale if retrieval else 1.0,
        }
        for (decayed, retrieval), params in groups.items()
        if params or not retrieval
    ]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    retrieval_lr_scale: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model)`; the LR is overwritten every step by the schedule
    (times each group's `lr_scale`, see `set_lr`)."""
    groups = param_groups(model, weight_decay, retrieval_lr_scale)
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's LR to `lr` times its `lr_scale` (1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)

"""Profile one training step (forward + backward + AdamW) of RETRO and of its GPT baseline.

Prints, per model, the top operators by self CPU time (torch.profiler; ms per step, the mean
over steps that alternate RETRO and GPT) as a Markdown table, then one JSON line with the
self-time totals and their ratio. The default model is the demo's: cpu-small
with one encoder layer, k = 1 neighbour, the copy head (copy_match 4), 4 x 256 tokens.

Run: `OMP_NUM_THREADS=1 python benchmarks/profile_step.py [--no-copy-head] [--top 25]`.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from torch.profiler import ProfilerActivity, profile

from retrolm.model.config import RetroConfig
from retrolm.model.retro import Retro
from retrolm.training.optimizer import build_optimizer

DEMO = {"enc_layers": 1, "n_neighbors": 1, "copy_head": True, "copy_match": 4}


def make_step(model: Retro, tokens: torch.Tensor, neighbours: torch.Tensor | None):
    """A closure running one forward + backward + optimizer step."""
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))

    def step() -> None:
        _, loss = model(tokens, neighbours, targets=tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def profile_once(step) -> dict[str, tuple[float, int]]:
    """Self CPU ms and call count per operator of one call of `step`."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}


def table(ops: dict[str, tuple[float, int]], top: int) -> tuple[str, float]:
    """Markdown table of the `top` operators by self CPU time, and the total self time (ms)."""
    total = sum(ms for ms, _ in ops.values())
    lines = ["| op | calls | self ms | share |", "| --- | ---: | ---: | ---: |"]
    for key, (ms, count) in sorted(ops.items(), key=lambda item: -item[1][0])[:top]:
        lines.append(f"| `{key}` | {count} | {ms:.1f} | {ms / total:.1%} |")
    return "\n".join(lines), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--no-copy-head", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per model")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    overrides = {**DEMO, "copy_head": not args.no_copy_head}
    config = RetroConfig.from_name(args.preset, **overrides)
    B, T, m = args.batch, args.seq, config.chunk_size
    tokens = torch.randint(0, config.vocab_size, (B, T))
    neighbours = torch.randint(
        0, config.vocab_size, (B, math.ceil(T / m), config.n_neighbors, config.neighbor_len)
    )
    models = {"retro": (Retro(config), neighbours), "gpt": (Retro(config.as_gpt()), None)}
    steps = {name: make_step(model.train(), tokens, nb) for name, (model, nb) in models.items()}
    for step in steps.values():
        step()  # warm-up (optimizer state, allocator)
    # per-step averages over rounds that alternate the models (a shared machine's load hits both)
    ops: dict[str, dict[str, tuple[float, int]]] = {name: {} for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            for key, (ms, count) in profile_once(step).items():
                old_ms, _ = ops[name].get(key, (0.0, 0))
                ops[name][key] = (old_ms + ms / args.steps, count)
    summary = {}
    for name in steps:
        text, total = table(ops[name], args.top)
        head = config.copy_head and name == "retro"
        print(f"\n### {name} (copy_head={head}), ms per step, mean of {args.steps}\n")
        print(text)
        summary[name] = {"self_ms_per_step": total}
    summary["retro_over_gpt"] = summary["retro"]["self_ms_per_step"] / summary["gpt"]["self_ms_per_step"]
    print(json.dumps({"kind": "profile", "config": overrides, "batch": B, "seq": T, **summary}))


if __name__ == "__main__":
    main()

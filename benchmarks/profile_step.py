"""Profile one training step (forward + backward + AdamW) of RETRO and of its GPT baseline.

Prints, per model, the top operators by self CPU time (torch.profiler) as a Markdown table,
then one JSON line with the self-time totals. The default model is the demo's: cpu-small
with one encoder layer, k = 1 neighbour, the copy head (copy_match 4), 4 x 256 tokens.

Run: `OMP_NUM_THREADS=1 python benchmarks/profile_step.py [--no-copy-head] [--top 25]`.
"""

from __future__ import annotations

import argparse
import json
import math
import time

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


def table(prof, top: int) -> tuple[str, float]:
    """Markdown table of the `top` operators by self CPU time, and the total self time (ms)."""
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    lines = ["| op | calls | self ms | share |", "| --- | ---: | ---: | ---: |"]
    for e in events[:top]:
        ms = e.self_cpu_time_total / 1e3
        lines.append(f"| `{e.key}` | {e.count} | {ms:.1f} | {ms / total:.1%} |")
    return "\n".join(lines), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--no-copy-head", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="profiled steps per model")
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
    summary = {}
    for name, (model, nb) in models.items():
        step = make_step(model.train(), tokens, nb)
        step()  # warm-up (optimizer state, allocator)
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        wall = (time.perf_counter() - start) / args.steps
        text, total = table(prof, args.top)
        print(f"\n### {name} (copy_head={config.copy_head and name == 'retro'}), per {args.steps} steps\n")
        print(text)
        summary[name] = {"profiled_wall_s_per_step": wall, "self_ms_total": total}
    print(json.dumps({"kind": "profile", "config": overrides, "batch": B, "seq": T, **summary}))


if __name__ == "__main__":
    main()

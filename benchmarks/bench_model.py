"""Model speed: RETRO vs GPT training step, MFU against a measured matmul peak, KV-cache decoding.

Prints one JSON object per line. The default model is the demo's (cpu-small with one
encoder layer, k = 1 neighbour, the copy head with copy_match 4; batch 4 x 256 tokens), fp32.
Run: `OMP_NUM_THREADS=1 python benchmarks/bench_model.py --threads 1` (CPU), add `--bf16`
for bf16 autocast too (on a CPU without AVX-512 BF16 that is 10-30x slower: not a speed
path there), or `--device cuda --bf16`. RETRO and GPT share the same decoder
(`config.as_gpt()`); their training steps (forward + backward + AdamW) alternate so that a
shared machine's load hits both alike; the JSON has medians and spreads of the step times
and of the per-pair time ratios, and the ratio of the fastest steps (on a loaded machine
the least disturbed estimate). A matmul peak measured before and after the timing gives
MFU and an idle-machine check (`machine_busy`: the two peaks differ by more than 10% or the
1-minute load average exceeds the core count). With `retro_pytorch` (lucidrains'
RETRO-pytorch) importable, it is timed too at a matched configuration (`--skip-lucidrains`
to skip); without it the JSON says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable

import torch

from retrolm.model.config import RetroConfig
from retrolm.model.flops import flops_per_token, measure_matmul_peak, mfu
from retrolm.model.retro import Retro
from retrolm.training.optimizer import build_optimizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEMO = {"enc_layers": 1, "n_neighbors": 1, "copy_head": True, "copy_match": 4}


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(device: str, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=DTYPES[dtype])


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, max and the relative interquartile range of repeated measurements."""
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values), "iqr_rel": (q[2] - q[0]) / med}


def batch(config: RetroConfig, B: int, T: int, k: int, device: str):
    tokens = torch.randint(0, config.vocab_size, (B, T), device=device)
    neighbours = torch.randint(
        0,
        config.vocab_size,
        (B, math.ceil(T / config.chunk_size), k, config.neighbor_len),
        device=device,
    )
    return tokens, neighbours


def optimizer_step(loss_fn: Callable[[], torch.Tensor], optimizer, device: str) -> Callable[[], float]:
    """A closure timing one training step: `loss_fn()` forward, backward, optimizer; seconds."""

    def step() -> float:
        sync(device)
        start = time.perf_counter()
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - start

    return step


def timed_step(model: Retro, tokens, neighbours, device: str, dtype: str) -> Callable[[], float]:
    """One retrolm training step: forward + backward + AdamW (our parameter groups)."""
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))

    def loss() -> torch.Tensor:
        with autocast(device, dtype):
            return model(tokens, neighbours, targets=tokens)[1]

    return optimizer_step(loss, optimizer, device)


def interleave(steps: dict[str, Callable[[], float]], iters: int) -> dict[str, list[float]]:
    """Run the steps in turn `iters` times after one warm-up round; seconds per step each."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(iters + 1):
        for name, step in steps.items():
            seconds = step()
            if i:
                times[name].append(seconds)
    return times


def peak(args, dtype: str) -> float:
    return measure_matmul_peak(args.device, DTYPES[dtype], size=args.peak_size)


def bench_train(config: RetroConfig, args) -> None:
    retro = Retro(config).to(args.device).train()
    gpt = Retro(config.as_gpt()).to(args.device).train()
    for dtype in args.dtypes:
        for T in args.seq:
            before = peak(args, dtype)
            tokens, neighbours = batch(config, args.batch, T, config.n_neighbors, args.device)
            times = interleave(
                {
                    "retro": timed_step(retro, tokens, neighbours, args.device, dtype),
                    "gpt": timed_step(gpt, tokens, None, args.device, dtype),
                },
                args.iters,
            )
            after = peak(args, dtype)
            t_retro, t_gpt = statistics.median(times["retro"]), statistics.median(times["gpt"])
            pair_ratios = [a / b for a, b in zip(times["retro"], times["gpt"], strict=True)]
            n_tok = args.batch * T
            f_retro = flops_per_token(config, T)["train"]
            f_gpt = flops_per_token(config.as_gpt(), T)["train"]
            best = max(before, after)
            emit(
                kind="train_step", dtype=dtype, seq_len=T, batch=args.batch, k=config.n_neighbors,
                iters=args.iters, retro_s=spread(times["retro"]), gpt_s=spread(times["gpt"]),
                ratio=t_retro / t_gpt, pair_ratio=spread(pair_ratios),
                ratio_of_fastest=min(times["retro"]) / min(times["gpt"]),
                flops_ratio=f_retro / f_gpt, ratio_over_flops=(t_retro / t_gpt) / (f_retro / f_gpt),
                retro_tok_s=n_tok / t_retro, gpt_tok_s=n_tok / t_gpt,
                matmul_peak_before=before, matmul_peak_after=after,
                retro_mfu=mfu(f_retro, n_tok / t_retro, best), gpt_mfu=mfu(f_gpt, n_tok / t_gpt, best),
                **idle_check(before, after),
            )  # fmt: skip


def idle_check(before: float, after: float) -> dict:
    """Flag a busy machine: peaks differing > 10%, or a load average above the core count."""
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    drift = abs(after - before) / max(before, after)
    return {
        "loadavg_1min": load,
        "cores": cores,
        "peak_drift": drift,
        "machine_busy": bool(drift > 0.10 or load > cores),
    }


@torch.no_grad()
def bench_decode(config: RetroConfig, args) -> None:
    model = Retro(config).to(args.device).eval()
    m, prompt_len = config.chunk_size, args.prompt
    dtype = args.dtypes[0]
    for n_new in args.generate:
        total = prompt_len + n_new
        tokens, neighbours = batch(config, 1, total, config.n_neighbors, args.device)

        def retrieve(u, _chunk, neighbours=neighbours):
            return neighbours[:, u], None

        # KV cache: prefill the prompt, then one token per step (greedy)
        sync(args.device)
        start = time.perf_counter()
        with autocast(args.device, dtype):
            logits, cache = model.step(tokens[:, :prompt_len], None, retrieve)
            for _ in range(n_new):
                nxt = logits[:, -1:].argmax(-1)
                logits, cache = model.step(nxt, cache, retrieve)
        sync(args.device)
        cached = n_new / (time.perf_counter() - start)

        # recompute the whole prefix every step; long runs time a sample of prefix lengths
        lengths = list(range(prompt_len, total))
        stride = max(1, len(lengths) // args.recompute_samples)
        sampled = lengths[::stride]
        sync(args.device)
        start = time.perf_counter()
        with autocast(args.device, dtype):
            for n in sampled:
                model(tokens[:, :n], neighbours[:, : math.ceil(n / m)])
        sync(args.device)
        per_step = (time.perf_counter() - start) / len(sampled)
        recompute = 1.0 / per_step
        emit(
            kind="decode", dtype=dtype, prompt=prompt_len, generated=n_new, k=config.n_neighbors,
            cached_tok_s=cached, recompute_tok_s=recompute, speedup=cached / recompute,
            recompute_sampled_steps=len(sampled),
        )  # fmt: skip


# lucidrains' RETRO-pytorch (0.3.9) at a configuration matched to ours: CCA at layers 3 and
# 6 of 6, m = 64, r = 128. Its RETRO does not pass `heads` on (every attention has 8 heads),
# so dim_head 32 gives our attention width, 256 (4 heads of 64 here). Differences that stay:
# its encoder cross-attends to the chunk at every layer (ours: the first), GELU MLP (ours:
# SwiGLU of the same size), learned absolute positions, biases.
LUCIDRAINS = dict(
    num_tokens=8192, max_seq_len=2048, enc_dim=256, enc_depth=2, dec_dim=256, dec_depth=6,
    dec_cross_attn_layers=(3, 6), dim_head=32, chunk_size=64,
)  # fmt: skip


def matched_config() -> RetroConfig:
    """Our side of the RETRO-pytorch comparison: d 256, 6 layers, 4 heads, CCA at [3, 6]."""
    return RetroConfig(
        vocab_size=8192, n_layers=6, d_model=256, n_heads=4, chunk_size=64, n_neighbors=2,
        enc_layers=2, enc_d_model=256, enc_heads=4, cca_layers=[3, 6], max_seq_len=1024,
        tie_embeddings=False,  # RETRO-pytorch has a separate output projection
    )  # fmt: skip


def lucidrains_step(model, tokens, neighbours, device: str) -> Callable[[], float]:
    """One RETRO-pytorch training step (forward + backward + AdamW)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return optimizer_step(lambda: model(tokens, neighbours, return_loss=True), optimizer, device)


def bench_lucidrains(args) -> None:
    """Time RETRO-pytorch against our model at the matched configuration, if installed."""
    try:
        from retro_pytorch import RETRO  # type: ignore[import-not-found]
    except Exception as err:  # not installed, or its optional dependencies are missing
        emit(kind="lucidrains", skipped=f"retro_pytorch not importable ({type(err).__name__}: {err})")
        return
    ours = Retro(matched_config()).to(args.device).train()
    theirs = RETRO(**LUCIDRAINS).to(args.device).train()
    for T in (512, 1024):
        tokens, neighbours = batch(ours.config, 4, T, 2, args.device)
        # RETRO-pytorch takes seq_len + 1 tokens (it shifts for the labels itself)
        their_tokens = torch.cat([tokens, tokens[:, :1]], dim=1)
        times = interleave(
            {"ours": timed_step(ours, tokens, neighbours, args.device, "fp32"), "theirs": lucidrains_step(theirs, their_tokens, neighbours, args.device)},
            max(3, args.iters // 2),
        )
        emit(
            kind="lucidrains", seq_len=T, batch=4, ours_s=spread(times["ours"]),
            theirs_s=spread(times["theirs"]),
            theirs_over_ours=statistics.median(times["theirs"]) / statistics.median(times["ours"]),
            params_ours=ours.num_params(), params_theirs=sum(p.numel() for p in theirs.parameters()),
        )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--no-demo", action="store_true", help="the preset as it is, k = 2")
    parser.add_argument("--no-copy-head", action="store_true", help="the demo without the copy head")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="also time bf16 autocast")
    parser.add_argument("--seq", type=int, nargs="+", default=[256])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=9)
    parser.add_argument("--generate", type=int, nargs="+", default=[256])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--recompute-samples", type=int, default=16)
    parser.add_argument("--peak-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-lucidrains", action="store_true")
    args = parser.parse_args()
    args.dtypes = ["fp32", "bf16"] if args.bf16 else ["fp32"]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    longest = max(max(args.seq), args.prompt + max(args.generate))
    overrides = {} if args.no_demo else {**DEMO, "copy_head": not args.no_copy_head}
    config = RetroConfig.from_name(args.preset, max_seq_len=max(longest, 64), **overrides)
    emit(
        kind="setup", preset=args.preset, overrides=overrides, device=args.device,
        threads=torch.get_num_threads(), torch=torch.__version__,
        params_retro=Retro(config).num_params(), params_gpt=Retro(config.as_gpt()).num_params(),
        cca_layers=config.cca_layers,
    )  # fmt: skip
    if not args.skip_train:
        bench_train(config, args)
    if not args.skip_decode:
        bench_decode(config, args)
    if not args.skip_lucidrains:
        bench_lucidrains(args)


if __name__ == "__main__":
    main()

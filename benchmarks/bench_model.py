"""Model speed: RETRO vs GPT training step, MFU against a measured matmul peak, KV-cache decoding.

Prints one JSON object per line. Run: `python benchmarks/bench_model.py` (CPU, fp32 + bf16)
or `python benchmarks/bench_model.py --device cuda --dtype bf16`. The RETRO and GPT models
share the same decoder (`config.as_gpt()`); RETRO gets k neighbours of r = 2m per chunk.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time

import torch

from retrolm.model.config import RetroConfig
from retrolm.model.flops import flops_per_token, measure_matmul_peak, mfu
from retrolm.model.retro import Retro

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(device: str, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=DTYPES[dtype])


def batch(config: RetroConfig, B: int, T: int, k: int, device: str):
    tokens = torch.randint(0, config.vocab_size, (B, T), device=device)
    neighbours = torch.randint(
        0,
        config.vocab_size,
        (B, math.ceil(T / config.chunk_size), k, config.neighbor_len),
        device=device,
    )
    return tokens, neighbours


def train_step(model: Retro, tokens, neighbours, device: str, dtype: str) -> float:
    """Seconds of one forward + backward (no optimizer step)."""
    sync(device)
    start = time.perf_counter()
    with autocast(device, dtype):
        _, loss = model(tokens, neighbours, targets=tokens)
    loss.backward()
    sync(device)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def time_pair(
    retro: Retro, gpt: Retro, tokens, neighbours, args, dtype: str
) -> tuple[float, float]:
    """Median step times, RETRO and GPT interleaved so a shared CPU's load hits both alike."""
    t_retro, t_gpt = [], []
    for i in range(args.iters + 1):  # the first round warms up
        a = train_step(retro, tokens, neighbours, args.device, dtype)
        b = train_step(gpt, tokens, None, args.device, dtype)
        if i:
            t_retro.append(a)
            t_gpt.append(b)
    return sorted(t_retro)[len(t_retro) // 2], sorted(t_gpt)[len(t_gpt) // 2]


def bench_train(config: RetroConfig, args) -> None:
    retro = Retro(config).to(args.device).train()
    gpt = Retro(config.as_gpt()).to(args.device).train()
    for dtype in args.dtypes:
        peak = measure_matmul_peak(args.device, DTYPES[dtype], size=args.peak_size)
        emit(kind="matmul_peak", device=args.device, dtype=dtype, size=args.peak_size, flops=peak)
        for T in args.seq:
            tokens, neighbours = batch(config, args.batch, T, args.k, args.device)
            t_retro, t_gpt = time_pair(retro, gpt, tokens, neighbours, args, dtype)
            n_tok = args.batch * T
            f_retro = flops_per_token(config, T)["train"]
            f_gpt = flops_per_token(config.as_gpt(), T)["train"]
            emit(
                kind="train_step", dtype=dtype, seq_len=T, batch=args.batch, k=args.k,
                retro_s=t_retro, gpt_s=t_gpt, ratio=t_retro / t_gpt,
                flops_ratio=f_retro / f_gpt,
                retro_tok_s=n_tok / t_retro, gpt_tok_s=n_tok / t_gpt,
                retro_mfu=mfu(f_retro, n_tok / t_retro, peak), gpt_mfu=mfu(f_gpt, n_tok / t_gpt, peak),
            )  # fmt: skip


@torch.no_grad()
def bench_decode(config: RetroConfig, args) -> None:
    model = Retro(config).to(args.device).eval()
    m, prompt_len = config.chunk_size, args.prompt
    dtype = args.dtypes[0]
    for n_new in args.generate:
        total = prompt_len + n_new
        tokens, neighbours = batch(config, 1, total, args.k, args.device)

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
            kind="decode", dtype=dtype, prompt=prompt_len, generated=n_new, k=args.k,
            cached_tok_s=cached, recompute_tok_s=recompute, speedup=cached / recompute,
            recompute_sampled_steps=len(sampled),
        )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--generate", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--recompute-samples", type=int, default=64)
    parser.add_argument("--peak-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args()
    args.dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    longest = max(max(args.seq), args.prompt + max(args.generate))
    config = RetroConfig.from_name(args.preset, max_seq_len=max(longest, 64), n_neighbors=args.k)
    emit(
        kind="setup", preset=args.preset, device=args.device, threads=torch.get_num_threads(),
        torch=torch.__version__, params_retro=Retro(config).num_params(),
        params_gpt=Retro(config.as_gpt()).num_params(), cca_layers=config.cca_layers,
    )  # fmt: skip
    if not args.skip_train:
        bench_train(config, args)
    if not args.skip_decode:
        bench_decode(config, args)


if __name__ == "__main__":
    main()

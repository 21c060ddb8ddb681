"""A run killed with SIGKILL and resumed ends in exactly the state of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from retrolm.training import checkpointing as ckpt
from retrolm.training.trainer import TrainConfig, train

STEPS = 16
BATCH, SEQ = 2, 32
EVERY = 2
WRONG = 0.5  # the seeded wrong-neighbour draw must repeat after a resume too


def _cli(db: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "retrolm", "train", "--db", str(db), "--model", "tiny",
        "--out", str(out), "--tokens", str(STEPS * BATCH * SEQ), "--batch-size", str(BATCH),
        "--seq-len", str(SEQ), "--checkpoint-every", str(EVERY), "--seed", "7",
        "--device", "cpu", "--wrong-neighbour-share", str(WRONG), *extra,
    ]  # fmt: skip


def _state_without_timing(path: Path) -> dict:
    state = json.loads((path / ckpt.TRAINER_STATE).read_text())
    state.pop("elapsed_s")
    state["train_config"].pop("resume")
    state["train_config"].pop("progress")
    return state


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_db_path, tmp_path):
    # one thread everywhere: the same kernels (and summation order) in all three runs
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(tiny_db_path, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 90
        while not ckpt.list_checkpoints(killed):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint appeared in 90 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / ckpt.FINAL).exists(), "run finished before it was killed"
    killed_at = ckpt.list_checkpoints(killed)[-1][0]
    assert 0 < killed_at < STEPS

    resumed = subprocess.run(
        _cli(tiny_db_path, killed, "--resume"), env=env, capture_output=True, text=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    # the reference: the same run, never interrupted, in this process
    reference = tmp_path / "reference"
    cfg = TrainConfig(
        tokens=STEPS * BATCH * SEQ, batch_size=BATCH, seq_len=SEQ, checkpoint_every=EVERY,
        seed=7, device="cpu", progress=False, wrong_neighbour_share=WRONG,
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(tiny_db_path, "tiny", reference, cfg)
    finally:
        torch.set_num_threads(threads)

    final_a, final_b = reference / ckpt.FINAL, killed / ckpt.FINAL
    weights_a = load_file(final_a / "model.safetensors")
    weights_b = load_file(final_b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=0, atol=1e-6)

    opt_a = torch.load(ckpt.step_dir(reference, STEPS) / ckpt.OPTIMIZER, weights_only=True)
    opt_b = torch.load(ckpt.step_dir(killed, STEPS) / ckpt.OPTIMIZER, weights_only=True)
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for key in opt_a["state"]:
        for field, value in opt_a["state"][key].items():
            torch.testing.assert_close(value, opt_b["state"][key][field], rtol=0, atol=1e-6)

    # step, tokens, data position, schedule and every RNG state
    assert _state_without_timing(final_a) == _state_without_timing(final_b)

    # the metric log of the resumed run has each step once, with the reference losses
    def losses(out: Path) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").open())]

    got, want = losses(killed), losses(reference)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    assert [round(v, 5) for _, v in got] == [round(v, 5) for _, v in want]
    assert (killed / "loss.png").stat().st_size > 0
    assert len(ckpt.list_checkpoints(killed)) <= 3  # older checkpoints pruned

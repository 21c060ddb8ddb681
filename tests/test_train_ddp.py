"""torchrun with 2 processes (gloo) follows the loss trajectory of 1 process, same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from retrolm.training.trainer import TrainConfig, train

STEPS, BATCH, SEQ = 5, 4, 32


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_two_processes_match_one_process(tiny_db_path, tmp_path):
    tokens = STEPS * BATCH * SEQ
    single = tmp_path / "single"
    cfg = TrainConfig(
        tokens=tokens, batch_size=BATCH, seq_len=SEQ, checkpoint_every=0, seed=3,
        device="cpu", progress=False,
    )  # fmt: skip
    train(tiny_db_path, "tiny", single, cfg)

    double = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "retrolm", "train", "--db", str(tiny_db_path), "--model", "tiny",
        "--out", str(double), "--tokens", str(tokens), "--batch-size", str(BATCH),
        "--seq-len", str(SEQ), "--checkpoint-every", "0", "--seed", "3", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]

    one, two = _losses(single), _losses(double)
    assert len(one) == len(two) == STEPS
    assert one[0] != one[-1]  # the model did learn something, so the comparison means something
    for a, b in zip(one, two, strict=True):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (one, two)

    w1 = load_file(single / "final" / "model.safetensors")
    w2 = load_file(double / "final" / "model.safetensors")
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-4, atol=1e-5)
    state = json.loads((double / "final" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["samples_seen"] == STEPS * BATCH

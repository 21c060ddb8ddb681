"""What a person watches during and after training: progress bar, metrics, loss curve.

Only rank 0 creates a `Monitor`; the other ranks get `None` and log nothing.
Metrics go to `<out>/metrics.jsonl` (one JSON object per logged step), to TensorBoard
under `<out>/tensorboard/` when the `tensorboard` package is installed, and to
`<out>/loss.png` at the end.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from retrolm.atomic import atomic_path

METRICS = "metrics.jsonl"
LOSS_PNG = "loss.png"


def truncate_metrics(out_dir: Path, after_step: int) -> None:
    """Drop metric lines past `after_step`: a resumed run re-does those steps."""
    path = out_dir / METRICS
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= after_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a kill
    with atomic_path(path) as tmp:
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    path = out_dir / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


class Monitor:
    """tqdm bar (loss, tokens/s, ETA) + JSONL + optional TensorBoard for one run."""

    def __init__(
        self, out_dir: Path, total_steps: int | None, start_step: int, enabled_bar: bool = True
    ):
        from tqdm.auto import tqdm

        self.out_dir = out_dir
        self._file = open(out_dir / METRICS, "a", encoding="utf-8")  # noqa: SIM115
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            file=sys.stderr,
            disable=not enabled_bar,
            dynamic_ncols=True,
        )
        self._tb = None
        try:  # optional: only when tensorboard is installed
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        except ImportError:
            pass

    def set_total(self, total_steps: int) -> None:
        self._bar.total = total_steps
        self._bar.refresh()

    def note(self, message: str) -> None:
        """A line for the person watching, printed above the bar."""
        self._bar.write(message, file=sys.stderr)

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        self._bar.update(1)
        self._bar.set_postfix(
            loss=f"{record['loss']:.3f}",
            lr=f"{record['lr']:.2e}",
            tok_s=f"{record['tokens_per_s']:.0f}",
            refresh=False,
        )
        if self._tb is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                self._tb.add_scalar(f"train/{key}", record[key], record["step"])

    def close(self) -> None:
        self._bar.close()
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def plot_loss(out_dir: Path, title: str = "training loss") -> Path | None:
    """Write `<out>/loss.png` from metrics.jsonl (matplotlib, Agg backend)."""
    records = read_metrics(out_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["tokens"] for r in records], [r["loss"] for r in records], linewidth=1)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / LOSS_PNG
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path

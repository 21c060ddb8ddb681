"""The one `--device` rule of every command: the device given, else cuda if available, else cpu."""

from __future__ import annotations

from typing import Any

import typer

from retrolm.errors import RetrolmError

DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda if available, else cpu)."


def device_option() -> Any:
    """The `--device` option, the same in every command (resolve it with `resolve_device`)."""
    return typer.Option(None, "--device", help=DEVICE_HELP)


def resolve_device(device: str | None) -> str:
    """`device` checked (a CUDA device must exist), or the default: cuda if available, else cpu."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise RetrolmError(f"--device {device!r}: choose cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise RetrolmError(f"--device {device!r}: choose cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise RetrolmError(f"--device {device}: no CUDA device is available; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise RetrolmError(f"--device {device}: only {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return device

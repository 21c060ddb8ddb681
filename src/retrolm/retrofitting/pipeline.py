"""Retro-fitting: turn a trained GPT into a RETRO and train the new parts (docs/reference.md §3).

Sources: a retrolm GPT checkpoint directory (or a run directory holding `final/`), or a
local Hugging Face GPT-2-family directory (wrapped, see `retrolm.retrofitting.hf_gpt2`). The new
model keeps every decoder weight and adds a randomly initialised neighbour encoder and
CCA layers. Each CCA output projection starts at zero, so right after retro-fitting the
model is the source GPT whether retrieval is on or off; training moves it away.

Modes: `freeze_decoder=True` trains only the encoder + CCA (DeepMind); otherwise every
parameter trains (InstructRetro). Both re-warm the LR linearly from the new floor and
re-decay it with a cosine (`TrainConfig.rewarm`); full training may replay a share of
sequences without neighbours (`replay_share`), so the decoder keeps working as a GPT.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from retrolm.checkpoints import (
    CONFIG,
    check_fits,
    load_checkpoint,
    resolve_checkpoint_dir,
    save_model,
)
from retrolm.errors import RetrolmError
from retrolm.model.config import default_cca_layers
from retrolm.model.retro import Retro, is_retrieval_parameter
from retrolm.retrofitting.config import RetrofitConfig

if TYPE_CHECKING:
    from retrolm.db.database import RetrievalDB
    from retrolm.db.dataset import RetroDataset
    from retrolm.training.trainer import TrainConfig

REPORT = "retrofit.json"


# -- loading any retrolm checkpoint ---------------------------------------------------------------


def source_kind(path: str | os.PathLike[str]) -> str:
    """'hf' for a Hugging Face model directory, 'retrolm' for a retrolm checkpoint."""
    p = Path(path)
    if not p.exists():
        raise RetrolmError(f"source {p} does not exist; pass a retrolm checkpoint or an HF model dir")
    directory = resolve_checkpoint_dir(p)
    try:
        data = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise RetrolmError(f"cannot read {directory / CONFIG}: {err}") from None
    return "hf" if "model_type" in data else "retrolm"


# -- building the retro-fitted model ---------------------------------------------------------------


def build_retrofit(
    source: str | os.PathLike[str] | nn.Module,
    vocab_size: int,
    chunk_size: int,
    *,
    cca_layers: list[int] | None = None,
    enc_layers: int = 2,
    enc_d_model: int | None = None,
    enc_heads: int | None = None,
    n_neighbors: int = 2,
    pad_id: int = 0,
    seed: int = 0,
    zero_init_cca: bool = True,
) -> tuple[Retro, nn.Module]:
    """(retro-fitted RETRO, source model). The source's decoder weights are copied.

    `source` is a retrolm GPT (model object or checkpoint dir) or an HF GPT-2 dir.
    `vocab_size` / `chunk_size` / `pad_id` come from the database the RETRO will use.
    """
    torch.manual_seed(seed)
    if isinstance(source, nn.Module) or source_kind(source) == "retrolm":
        src = source if isinstance(source, Retro) else load_checkpoint(source)
        if not isinstance(src, Retro):
            raise RetrolmError("a model source must be a retrolm Retro (GPT) model")
        model = _retrofit_retrolm(src, vocab_size, chunk_size, cca_layers, enc_layers,
                                  enc_d_model, enc_heads, n_neighbors)  # fmt: skip
    else:
        from retrolm.retrofitting.hf_gpt2 import (
            GPT2Retro,
            copy_hf_weights,
            gpt2_retro_config,
            load_hf_causal_lm,
            read_hf_config,
        )

        hf_config = read_hf_config(source)
        src = load_hf_causal_lm(source)
        config = gpt2_retro_config(
            hf_config, vocab_size, chunk_size, cca_layers=cca_layers, enc_layers=enc_layers,
            enc_d_model=enc_d_model or _half_width(int(hf_config.get("n_embd", 768)),
                                                   int(hf_config.get("n_head", 12))),
            enc_heads=enc_heads, n_neighbors=n_neighbors, pad_id=pad_id,
        )  # fmt: skip
        model = GPT2Retro(config)
        copy_hf_weights(model, src)
    if zero_init_cca:
        with torch.no_grad():
            for block in model.blocks:
                if block.cca is not None:
                    block.cca.out.weight.zero_()
    return model, src


def _half_width(d: int, heads: int) -> int:
    """Encoder width for an HF source: half the decoder's, a multiple of 2 * heads."""
    e = max(2 * heads, (d // 2) // (2 * heads) * (2 * heads))
    return e


def _retrofit_retrolm(
    src: Retro,
    vocab_size: int,
    chunk_size: int,
    cca_layers: list[int] | None,
    enc_layers: int,
    enc_d_model: int | None,
    enc_heads: int | None,
    n_neighbors: int,
) -> Retro:
    sc = src.config
    if sc.cca_layers:
        raise RetrolmError(
            f"the source already has CCA layers {sc.cca_layers}; retro-fit a GPT (trained with --no-retrieval)"
        )
    if sc.vocab_size != vocab_size:
        raise RetrolmError(
            f"the source vocabulary ({sc.vocab_size}) differs from the database's ({vocab_size}); "
            "use the database the GPT was trained on (or one built with its tokenizer)"
        )
    if sc.max_seq_len < chunk_size:
        raise RetrolmError(f"the source's context {sc.max_seq_len} is shorter than a chunk ({chunk_size})")
    config = dataclasses.replace(
        sc,
        chunk_size=chunk_size,
        neighbor_len=2 * chunk_size if sc.continuation else chunk_size,
        n_neighbors=n_neighbors,
        cca_layers=default_cca_layers(sc.n_layers) if cca_layers is None else list(cca_layers),
        enc_layers=enc_layers,
        enc_d_model=enc_d_model or sc.enc_d_model,
        enc_heads=enc_heads or sc.enc_heads,
        extra=dict(sc.extra),
    )
    model = type(src)(config)  # Retro, or GPT2Retro for a GPT-2 that was wrapped before
    state = src.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not is_retrieval_parameter(k)] + list(unexpected)
    if bad:
        raise RetrolmError(f"the source weights do not fit the retro-fitted decoder ({bad[:3]})")
    return model


def freeze_decoder(model: nn.Module) -> int:
    """Freeze every parameter except encoder + CCA; return the number still trainable."""
    trainable = 0
    for name, param in model.named_parameters():
        keep = is_retrieval_parameter(name)
        param.requires_grad_(keep)
        trainable += param.numel() if keep else 0
    if trainable == 0:
        raise RetrolmError("the model has no encoder / CCA parameters to train")
    return trainable


def parameter_counts(model: Retro) -> dict[str, Any]:
    """Total, decoder and new (encoder + CCA) parameter counts; tied weights once."""
    seen: set[int] = set()
    total = new = 0
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        new += param.numel() if is_retrieval_parameter(name) else 0
    return {
        "total": total,
        "decoder": total - new,
        "retrieval": new,
        "retrieval_share_of_decoder": new / max(1, total - new),
    }


# -- perplexity ----------------------------------------------------------------------------------


def valid_sequences(db: RetrievalDB, seq_len: int, split: str = "valid") -> RetroDataset:
    """The sequences `split_perplexity` scores, with every stored neighbour per chunk.

    Built once and shared by every model and mode compared: each model takes the first k
    of the stored neighbours (the same k a dataset built for that k would give).
    """
    from retrolm.db.dataset import RetroDataset

    stored = int(db.neighbors[split].shape[1])
    return RetroDataset(db, split, seq_len, k=stored, retrieval=True)


@torch.no_grad()
def split_perplexity(
    model: nn.Module,
    db: RetrievalDB,
    split: str = "valid",
    *,
    seq_len: int | None = None,
    k: int | None = None,
    retrieval: bool = True,
    max_sequences: int = 64,
    batch_size: int = 8,
    data: RetroDataset | None = None,
) -> float:
    """Token perplexity of `model` on the first `max_sequences` sequences of `split`.

    `data`: the sequences to score (from `valid_sequences`), so that several models are
    compared without rebuilding them; by default they are built from `db` and `split`.
    """
    from retrolm.db.dataset import RetroDataset

    config = model.config
    k = k or int(config.n_neighbors)
    use_nb = retrieval and bool(config.cca_layers)
    if data is None:
        seq_len = seq_len or min(int(config.max_seq_len), 4 * int(config.chunk_size))
        data = RetroDataset(db, split, seq_len, k=k, retrieval=use_nb)
    elif use_nb and not (data.retrieval and 1 <= k <= data.k):
        raise RetrolmError(f"--k {k} is out of range: the evaluation data holds {data.k} neighbours")
    n = min(len(data), max_sequences)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for lo in range(0, n, batch_size):
        batch = _batch(data, range(lo, min(n, lo + batch_size)), k if use_nb else 0, device)
        _, loss = model(
            batch["tokens"], batch.get("neighbours"), batch.get("neighbour_mask"),
            batch["targets"], retrieval=use_nb,
        )  # fmt: skip
        tokens = batch["targets"].numel()
        nll += float(loss) * tokens
        count += tokens
    model.train(was_training)
    return math.exp(nll / count)


def _batch(data: RetroDataset, rows: range, k: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Items `rows` stacked on `device`; the first `k` neighbours per chunk (none if k is 0)."""
    items = [data[i] for i in rows]
    batch = {key: torch.stack([it[key] for it in items]) for key in ("tokens", "targets")}
    if k and "neighbours" in items[0]:
        for key in ("neighbours", "neighbour_mask"):
            batch[key] = torch.stack([it[key][:, :k] for it in items])  # (b, l, k, r)
    return {key: value.to(device) for key, value in batch.items()}


def _gpt_perplexity(src: nn.Module, data: RetroDataset, max_sequences: int) -> float:
    """Perplexity of an HF causal LM (the untouched source) on the same valid sequences."""
    vocab_size = int(data.db.vocab_size)
    n = min(len(data), max_sequences)
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            item = data[i]
            logits = src(item["tokens"][None]).logits[0, :, :vocab_size]
            target = item["targets"]
            nll += float(torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum"))
            count += target.numel()
    return math.exp(nll / count)


# -- the whole procedure ---------------------------------------------------------------------------


# Older keyword names of retrofit()'s options, still accepted.
_OLD_NAMES = {"freeze": "freeze_decoder", "n_neighbors": "k"}


def retrofit(
    source: str | os.PathLike[str],
    db_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    train_config: TrainConfig | None = None,
    config: RetrofitConfig | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Retro-fit `source` on database `db_path`, train into `out_dir`; return the report.

    `config` (`RetrofitConfig`) says what is added and what trains; keyword `options` override
    its fields (`freeze` and `n_neighbors` are older names of `freeze_decoder` and `k`). The
    peak LR is `config.lr` if set, else `train_config.lr` if a train_config is given, else the
    mode's default (`RetrofitConfig.peak_lr`).

    Writes `out_dir/init/` (the untrained retro-fitted model), the training run
    (`checkpoints/`, `final/`, metrics) and `out_dir/retrofit.json` with parameter
    counts and valid perplexities before/after, with retrieval on and off. With
    `freeze_decoder`, checks that every frozen tensor of the saved final model is
    bit-identical to the source's.
    """
    from retrolm.db.database import RetrievalDB
    from retrolm.training.trainer import TrainConfig, train

    options = {_OLD_NAMES.get(name, name): value for name, value in options.items()}
    config = dataclasses.replace(config or RetrofitConfig(), **options)
    freeze = config.freeze_decoder
    cfg = train_config or TrainConfig()
    if config.lr is not None or train_config is None:
        cfg = dataclasses.replace(cfg, lr=config.peak_lr())
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RetrolmError(f"--out {out} is a file; pass a directory for the run")
    db = RetrievalDB.open(db_path)
    if source_kind(source) == "retrolm":  # tokenizer and vocabulary of the GPT vs the database
        check_fits(source, db)
    model, src = build_retrofit(
        source, db.vocab_size, db.chunk_size, cca_layers=config.cca_layers, enc_layers=config.enc_layers,
        enc_d_model=config.enc_d_model, n_neighbors=config.k, pad_id=db.tokenizer.pad_id,
        seed=cfg.seed,
    )  # fmt: skip
    eval_sequences = config.eval_sequences
    seq_len = cfg.seq_len or min(int(model.config.max_seq_len), 512)
    if cfg.seq_len is None:
        cfg = dataclasses.replace(cfg, seq_len=seq_len)
    counts = parameter_counts(model)
    trainable = freeze_decoder(model) if freeze else counts["total"]
    if freeze and cfg.replay_share:
        raise RetrolmError(
            "--replay-share needs full training: with --freeze-decoder only encoder + CCA train, "
            "and replayed sequences (no neighbours) give them no gradient"
        )
    frozen = {
        name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad
    }
    data = valid_sequences(db, seq_len)  # one set of valid sequences for every comparison
    kw = dict(seq_len=seq_len, max_sequences=eval_sequences, data=data)
    before = {
        "source": (
            split_perplexity(src, db, retrieval=False, **kw)
            if isinstance(src, Retro)
            else _gpt_perplexity(src, data, eval_sequences)
        ),
        "retrieval_off": split_perplexity(model, db, retrieval=False, **kw),
        "retrieval_on": split_perplexity(model, db, retrieval=True, **kw),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out / "init")
    cfg = dataclasses.replace(cfg, rewarm=True)
    t0 = time.perf_counter()
    final = train(db, model, out, cfg)  # the database opened (and verified) above
    seconds = time.perf_counter() - t0
    trained = load_checkpoint(final)
    if frozen:
        changed = [
            name for name, p in trained.named_parameters()
            if name in frozen and not torch.equal(p.detach().cpu(), frozen[name].cpu())
        ]  # fmt: skip
        if changed:
            raise RetrolmError(f"frozen parameters changed during training: {changed[:3]}")
    after = {
        "retrieval_off": split_perplexity(trained, db, retrieval=False, **kw),
        "retrieval_on": split_perplexity(trained, db, retrieval=True, **kw),
    }
    report = {
        "source": str(source),
        "source_kind": "retrolm" if isinstance(src, Retro) else "hf",
        "mode": "freeze-decoder" if freeze else "full",
        "database": str(db.path),
        "final": str(final),
        "parameters": {**counts, "trainable": trainable},
        "frozen_parameters_unchanged": bool(frozen),
        "retrofit": config.to_dict(),
        "train": {k: v for k, v in cfg.to_dict().items() if k not in ("progress",)},
        "train_seconds": seconds,
        "valid_perplexity": {"before": before, "after": after, "sequences": eval_sequences,
                             "seq_len": seq_len},
    }  # fmt: skip
    from retrolm.atomic import write_json

    write_json(out / REPORT, report)
    return report

"""Held-out perplexity and bits-per-byte for GPT, RETRO, RETRO-off, RETRO-shuffled and RAG_GPT,
with overlap buckets.

One pass over a database split (valid or test; its documents are never in the database)
scores every token of the split's stream once, in non-overlapping sequences of n tokens
aligned to the query windows, exactly as the trainer cuts them:

    sequence i: tokens stream[s*m : s*m+n], targets stream[s*m+1 : s*m+n+1], s = i*n/m
    (the last sequence is shorter and takes the tail of the stream)

Every target token is charged to the evaluation chunk (query window) w = p // m of its
stream position p. Because of the CCA shift, RETRO predicts all tokens of chunk w with
the neighbours of chunk w-1; RAG_GPT gets the same neighbour (top-1) as text. The
overlap r(C_w) is measured against those neighbours too ("what the model could copy").

RAG_GPT context for the targets of chunk w inside one sequence (see docs/evaluation.md):

    [top-1 neighbour of chunk w-1: chunk + continuation, real tokens only] [EOS]
    [the sequence's own tokens up to the last input, cut from the left so the whole
     input fits the model's max_seq_len]

and only chunk w's targets are scored. Without a neighbour (w = 0, or none stored) the
input is the sequence's own tokens, as for the GPT.

RETRO-shuffled is the RETRO checkpoint fed the neighbours of ANOTHER evaluation sequence
(`shuffle_sources`: a fixed derangement that depends only on the sequence lengths, so it
is the same for every model). It keeps everything about retrieval (number, length and
padding of neighbours, a chunk of real text from the database) except its relevance, so
RETRO-shuffled / RETRO is the gain from the neighbours' content, while RETRO / RETRO-off
also counts any gain from merely having neighbour-shaped input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrolm.errors import RetrolmError
from retrolm.evaluation.metrics import (
    DEFAULT_ALPHAS,
    batch_longest_common_substring,
    bits_per_byte,
    overlap_buckets,
    perplexity,
)

if TYPE_CHECKING:
    from retrolm.db.database import RetrievalDB
    from retrolm.model.config import RetroConfig
    from retrolm.model.retro import Retro

MODES_GPT = ("GPT", "RAG_GPT")
MODES_RETRO = ("RETRO", "RETRO-off", "RETRO-shuffled")


# -- checkpoints ------------------------------------------------------------------------------


def trained_seq_len(model_dir: Path, config: RetroConfig) -> int:
    """The sequence length the checkpoint was trained with (else the model's max_seq_len)."""
    from retrolm.checkpoints import trainer_state

    n = (trainer_state(model_dir) or {}).get("seq_len")
    return int(n) if n else int(config.max_seq_len)


# -- the evaluation data (shared by every model) ----------------------------------------------


@dataclass
class EvalData:
    """One split's stream cut into sequences, plus per-chunk bytes, neighbours and overlap."""

    stream: np.ndarray  # (L,) int64
    m: int
    seq_len: int
    starts: list[int]  # first query window of each sequence
    lengths: list[int]  # input length of each sequence (<= seq_len)
    neighbour_ids: np.ndarray  # (W, k) int64, best first, -1 = none
    chunk_tokens: np.ndarray  # (W,) number of scored target tokens charged to each chunk
    chunk_bytes: np.ndarray  # (W,) UTF-8 bytes of those target tokens
    overlap: np.ndarray  # (W,) r(C_w) against the neighbours of chunk w-1

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_tokens)


def prepare(db: RetrievalDB, split: str, seq_len: int, k: int, max_sequences: int | None = None) -> EvalData:
    """Cut `split` into sequences and compute what every model's evaluation shares."""
    from retrolm.db.dataset import first_k_valid

    if split not in db.splits:
        raise RetrolmError(f"database {db.path} has no split {split!r}; choose one of {list(db.splits)}")
    m = int(db.chunk_size)
    if seq_len <= 0 or seq_len % m:
        raise RetrolmError(f"sequence length {seq_len} must be a positive multiple of the chunk size {m}")
    stored_k = int(db.neighbors[split].shape[1])
    if not 1 <= k <= stored_k:
        raise RetrolmError(f"--k {k} is out of range: the database stores {stored_k} neighbours per chunk")
    stream = np.asarray(db.streams[split].tokens, dtype=np.int64)
    if len(stream) < 2:
        raise RetrolmError(f"split {split!r} of {db.path} has fewer than 2 tokens: nothing to evaluate")
    l_seq = seq_len // m
    starts, lengths = [], []
    for begin in range(0, len(stream) - 1, seq_len):
        starts.append(begin // m)
        lengths.append(min(seq_len, len(stream) - 1 - begin))
        if max_sequences is not None and len(starts) >= max_sequences:
            break
    last_target = starts[-1] * m + lengths[-1]  # stream position of the last scored target
    n_chunks = last_target // m + 1
    assert l_seq >= 1
    ids = first_k_valid(np.array(db.neighbors[split][:n_chunks], dtype=np.int64), k)  # (W, k)

    positions = np.arange(1, last_target + 1)  # every scored target position
    chunk_tokens = np.bincount(positions // m, minlength=n_chunks)
    tok = db.tokenizer
    chunk_bytes = np.array(
        [len(tok.decode(stream[max(1, w * m) : min((w + 1) * m, last_target + 1)]).encode("utf-8"))
         for w in range(n_chunks)], dtype=np.int64,
    )  # fmt: skip

    # r(C_w): longest common token run between chunk w and the neighbours of chunk w-1
    chunks = np.full((n_chunks, m), -1, dtype=np.int64)
    chunk_mask = np.zeros((n_chunks, m), dtype=bool)
    for w in range(n_chunks):
        part = stream[w * m : min((w + 1) * m, last_target + 1)]
        chunks[w, : len(part)] = part
        chunk_mask[w, : len(part)] = True
    used = np.full_like(ids, -1)
    used[1:] = ids[:-1]
    nb_tokens, nb_mask = db.chunks.gather(used)  # (W, k, r)
    lcs = batch_longest_common_substring(chunks, nb_tokens, chunk_mask, nb_mask)  # (W, k)
    overlap = lcs.max(axis=1) / m if lcs.size else np.zeros(n_chunks)
    return EvalData(stream, m, seq_len, starts, lengths, ids, chunk_tokens, chunk_bytes, overlap)


def shuffle_sources(lengths: list[int], m: int) -> list[int]:
    """For each sequence, the other sequence whose neighbours RETRO-shuffled reads.

    Why fixed and data-only: every model must be scored with the same wrong neighbours.
    Sequences are grouped by length (all but the last are seq_len long); inside a group of
    g >= 2, sequence j reads member (j + g // 2) mod g: no fixed point, and the source is
    half the split away, so it is rarely the same or a neighbouring document. A sequence
    alone in its group (the short last one) reads the first windows of the sequence half
    the split away among those with at least as many windows. Only with a single sequence
    in the split is the source the sequence itself (see `shuffled_neighbour_ids`).
    """
    n = len(lengths)
    windows = [-(-length // m) for length in lengths]
    groups: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        groups.setdefault(length, []).append(i)
    sources = list(range(n))
    for members in groups.values():
        g = len(members)
        if g >= 2:
            for j, i in enumerate(members):
                sources[i] = members[(j + g // 2) % g]
        else:
            i = members[0]
            others = [o for o in range(n) if o != i and windows[o] >= windows[i]]
            if others:
                sources[i] = others[(len(others) // 2) % len(others)]
    return sources


def shuffled_neighbour_ids(data: EvalData) -> np.ndarray:
    """(W, k) neighbour ids where each sequence's windows hold another sequence's neighbours.

    Sequence i's windows get the ids of the first windows of `shuffle_sources(...)[i]`,
    so shapes stay valid. With a single sequence in the split there is no other one: its
    windows are rotated by half their number instead (a chunk of the same text, but never
    the one retrieved for that position; a one-window sequence is unchanged, and its
    targets see no neighbour anyway because of the CCA shift).
    """
    m = data.m
    out = data.neighbour_ids.copy()
    sources = shuffle_sources(data.lengths, m)
    for i, (start, length) in enumerate(zip(data.starts, data.lengths, strict=True)):
        n_win = -(-length // m)
        src = sources[i]
        if src == i:
            rows = start + (np.arange(n_win) + n_win // 2) % n_win
        else:
            rows = data.starts[src] + np.arange(n_win)
        out[start : start + n_win] = data.neighbour_ids[rows]
    return out


# -- scoring ----------------------------------------------------------------------------------


def _charge(sums: np.ndarray, nll: np.ndarray, positions: np.ndarray, m: int) -> None:
    """Add per-token NLLs (nats) to the chunk of each target's stream position."""
    np.add.at(sums, positions // m, nll)


def score_sequences(model: Retro, db: RetrievalDB, data: EvalData, retrieval: bool, batch_size: int = 8,
                    device: str = "cpu", neighbour_ids: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Per-chunk NLL sums (nats, float64 (W,)) of `model` over the split's sequences.

    `neighbour_ids` (W, k) replaces the stored neighbours (RETRO-shuffled); default: the true ones.
    """
    import torch
    import torch.nn.functional as F

    m, sums = data.m, np.zeros(data.num_chunks, dtype=np.float64)
    use_nb = retrieval and bool(model.config.cca_layers)
    nb_ids = data.neighbour_ids if neighbour_ids is None else neighbour_ids
    order = list(range(len(data.starts)))
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(data.lengths[i], []).append(i)
    model.eval()
    with torch.no_grad():
        for length, members in groups.items():
            for lo in range(0, len(members), batch_size):
                batch = members[lo : lo + batch_size]
                begins = [data.starts[i] * m for i in batch]
                tokens = np.stack([data.stream[b : b + length] for b in begins])  # (B, T)
                targets = np.stack([data.stream[b + 1 : b + length + 1] for b in begins])  # (B, T)
                neighbours = mask = None
                if use_nb:
                    l_chunks = -(-length // m)
                    ids = np.stack([nb_ids[s : s + l_chunks] for s in
                                    (data.starts[i] for i in batch)])  # (B, l, k)  # fmt: skip
                    nb, nb_mask = db.chunks.gather(ids)  # (B, l, k, r)
                    neighbours = torch.as_tensor(nb, device=device)
                    mask = torch.as_tensor(nb_mask, device=device)
                logits, _ = model(torch.as_tensor(tokens, device=device), neighbours, mask,
                                  retrieval=use_nb)  # (B, T, V)  # fmt: skip
                nll = F.cross_entropy(logits.double().transpose(1, 2),
                                      torch.as_tensor(targets, device=device), reduction="none")  # (B, T)
                positions = np.array(begins)[:, None] + 1 + np.arange(length)[None, :]  # (B, T)
                _charge(sums, nll.cpu().numpy().reshape(-1), positions.reshape(-1), m)
    return sums


def rag_inputs(db: RetrievalDB, data: EvalData, max_len: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """RAG_GPT inputs: (tokens (T,), targets (T,) with -100 where unscored, chunk w) per piece.

    One piece per (sequence, chunk w) pair: the chunk's targets inside that sequence.
    """
    m, eos = data.m, int(db.tokenizer.eos_id)
    pieces = []
    for start, length in zip(data.starts, data.lengths, strict=True):
        begin = start * m
        positions = begin + 1 + np.arange(length)  # stream positions of the targets
        for w in np.unique(positions // m):
            idx = np.nonzero(positions // m == w)[0]  # target indices inside the sequence
            last = int(idx[-1])
            own = data.stream[begin : begin + last + 1]  # inputs up to the last scored target
            prefix = np.zeros(0, dtype=np.int64)
            if w >= 1 and data.neighbour_ids[w - 1, 0] >= 0:
                nb, nb_mask = db.chunks.gather(data.neighbour_ids[w - 1, :1])  # (1, r)
                prefix = np.concatenate([nb[0][nb_mask[0]], [eos]]).astype(np.int64)
            keep = min(len(own), max_len - len(prefix))
            if keep < len(idx):
                raise RetrolmError(f"max_seq_len {max_len} is too short for a RAG_GPT prefix and one chunk")
            own = own[len(own) - keep :]
            tokens = np.concatenate([prefix, own])
            targets = np.full(len(tokens), -100, dtype=np.int64)
            first = len(tokens) - (last - int(idx[0]) + 1)
            targets[first:] = data.stream[begin + 1 + idx[0] : begin + 1 + last + 1]
            pieces.append((tokens, targets, int(w)))
    return pieces


def score_rag(model: Retro, db: RetrievalDB, data: EvalData, batch_size: int = 8, device: str = "cpu") -> np.ndarray:
    """Per-chunk NLL sums (nats) of a GPT with the top-1 neighbour's text in its context."""
    import torch
    import torch.nn.functional as F

    sums = np.zeros(data.num_chunks, dtype=np.float64)
    pieces = rag_inputs(db, data, int(model.config.max_seq_len))
    pieces.sort(key=lambda p: len(p[0]))  # similar lengths share a batch: less padding
    pad = int(db.tokenizer.pad_id)
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(pieces), batch_size):
            batch = pieces[lo : lo + batch_size]
            width = max(len(p[0]) for p in batch)
            tokens = np.full((len(batch), width), pad, dtype=np.int64)  # right padding: causal
            targets = np.full((len(batch), width), -100, dtype=np.int64)
            for j, (t, y, _) in enumerate(batch):
                tokens[j, : len(t)] = t
                targets[j, : len(y)] = y
            logits, _ = model(torch.as_tensor(tokens, device=device), retrieval=False)  # (B, T, V)
            nll = F.cross_entropy(logits.double().transpose(1, 2), torch.as_tensor(targets, device=device),
                                  ignore_index=-100, reduction="none").sum(dim=1)  # (B,)
            for j, (_, _, w) in enumerate(batch):
                sums[w] += float(nll[j])
    return sums


# -- the public entry point ---------------------------------------------------------------------


def _row(name: str, checkpoint: Path, sums: np.ndarray, data: EvalData) -> dict[str, Any]:
    nll, tokens, nbytes = float(sums.sum()), int(data.chunk_tokens.sum()), int(data.chunk_bytes.sum())
    scored = data.chunk_tokens > 0
    return {
        "model": name,
        "checkpoint": str(checkpoint),
        "nll_nats": nll,
        "tokens": tokens,
        "bytes": nbytes,
        "loss": nll / tokens,
        "ppl": perplexity(nll, tokens),
        "bpb": bits_per_byte(nll, nbytes),
        "buckets": overlap_buckets(data.overlap[scored], sums[scored], data.chunk_bytes[scored]),
    }


def evaluate(
    db: str | Path | RetrievalDB,
    checkpoint_dirs: list[str | Path],
    split: str = "valid",
    k: int | None = None,
    max_sequences: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    rag: bool = True,
    shuffled: bool = True,
) -> dict[str, Any]:
    """Evaluate checkpoints on a held-out split of `db` (a RetrievalDB or its path).

    A GPT checkpoint gives rows GPT and RAG_GPT; a RETRO checkpoint gives RETRO,
    RETRO-off (the same weights with retrieval switched off) and RETRO-shuffled (the same
    weights fed another sequence's neighbours; `shuffled=False` skips it). k defaults to the largest
    `n_neighbors` of the RETRO checkpoints (2 without one); seq_len to the first
    checkpoint's training sequence length. Returns a JSON-able dict (see `to_markdown`).
    """
    from retrolm.checkpoints import FINAL, check_fits, load_checkpoint, resolve_checkpoint_dir

    if not checkpoint_dirs:
        raise RetrolmError("pass at least one --checkpoint")
    if isinstance(db, (str, Path)):
        from retrolm.db.database import RetrievalDB

        db = RetrievalDB.open(db)
    dirs = [resolve_checkpoint_dir(c) for c in checkpoint_dirs]
    models = []
    for d in dirs:
        check_fits(d, db, k, stored_neighbours=True)
        models.append((d, load_checkpoint(d, map_location=device)))
    retro_ks = [int(mdl.config.n_neighbors) for _, mdl in models if mdl.config.cca_layers]
    k = k if k is not None else (max(retro_ks) if retro_ks else 2)
    n = seq_len or trained_seq_len(dirs[0], models[0][1].config)
    data = prepare(db, split, n, k, max_sequences)
    wrong_ids = shuffled_neighbour_ids(data) if shuffled and retro_ks else None

    rows: list[dict[str, Any]] = []
    for d, model in models:
        label = d.parent.name if d.name == FINAL else d.name
        before = len(rows)
        if model.config.cca_layers:
            rows.append(_row("RETRO", d, score_sequences(model, db, data, True, batch_size, device), data))
            rows.append(_row("RETRO-off", d, score_sequences(model, db, data, False, batch_size, device), data))
            if wrong_ids is not None:
                rows.append(_row("RETRO-shuffled", d, score_sequences(model, db, data, True, batch_size, device,
                                                                      wrong_ids), data))  # fmt: skip
        else:
            rows.append(_row("GPT", d, score_sequences(model, db, data, False, batch_size, device), data))
            if rag:
                rows.append(_row("RAG_GPT", d, score_rag(model, db, data, batch_size, device), data))
        for row in rows[before:]:
            row["label"] = label
    scored = data.chunk_tokens > 0
    return {
        "database": str(db.path),
        "split": split,
        "k": k,
        "seq_len": n,
        "sequences": len(data.starts),
        "chunks": int(scored.sum()),
        "tokens": int(data.chunk_tokens.sum()),
        "bytes": int(data.chunk_bytes.sum()),
        "alphas": list(DEFAULT_ALPHAS),
        "overlap_note": "r(C) = longest common token run between chunk C and the neighbours of the "
                        "previous chunk (those used to predict C), divided by m; RETRO-shuffled is bucketed "
                        "by the same r of the true neighbours, so its columns compare with RETRO's",
        "rows": rows,
    }


# -- output ----------------------------------------------------------------------------------


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def find_row(result: dict[str, Any], model: str, label: str | None = None) -> dict[str, Any] | None:
    """The first row of `result` for mode `model` (GPT, RAG_GPT, RETRO, RETRO-off, RETRO-shuffled),
    of the checkpoint labelled `label` when given."""
    return next((r for r in result["rows"] if r["model"] == model and label in (None, r.get("label"))), None)


def content_gain(result: dict[str, Any], label: str | None = None) -> dict[str, float | None]:
    """How much a RETRO checkpoint gets from retrieval, split into its two causes.

    `retro_over_off` = RETRO ppl / RETRO-off ppl (retrieval on vs off: < 1 means it helps)
    and `shuffled_over_retro` = RETRO-shuffled ppl / RETRO ppl (> 1 means the model reads
    the neighbours' content, not just their presence). None where a row is missing.
    `label` picks the checkpoint when several RETROs were evaluated (default: the first).
    """
    retro = find_row(result, "RETRO", label)
    label = retro.get("label") if retro else label
    off, wrong = find_row(result, "RETRO-off", label), find_row(result, "RETRO-shuffled", label)

    def ppl(row: dict[str, Any] | None) -> float | None:
        return float(row["ppl"]) if row else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    p_retro, p_off, p_wrong = ppl(retro), ppl(off), ppl(wrong)
    return {"retro_ppl": p_retro, "retro_off_ppl": p_off, "retro_shuffled_ppl": p_wrong,
            "retro_over_off": ratio(p_retro, p_off), "shuffled_over_retro": ratio(p_wrong, p_retro)}  # fmt: skip


def to_markdown(result: dict[str, Any]) -> str:
    """The perplexity table and the overlap-bucket table as Markdown."""
    gpt = find_row(result, "GPT")
    lines = [
        f"Split `{result['split']}`: {result['tokens']} tokens, {result['bytes']} bytes, "
        f"{result['chunks']} chunks, {result['sequences']} sequences of <= {result['seq_len']} tokens, "
        f"k = {result['k']}.",
        "",
        "| model | checkpoint | ppl | bpb | ppl / GPT ppl |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ratio = _fmt(r["ppl"] / gpt["ppl"]) if gpt else "n/a"
        lines.append(f"| {r['model']} | {r.get('label', '')} | {_fmt(r['ppl'], 2)} | {_fmt(r['bpb'])} | {ratio} |")
    for label in dict.fromkeys(r.get("label") for r in result["rows"] if r["model"] == "RETRO"):
        gain = content_gain(result, label)
        parts = [f"RETRO / RETRO-off = {_fmt(gain['retro_over_off'])} (retrieval on vs off)"]
        if gain["shuffled_over_retro"] is not None:
            parts.append(f"RETRO-shuffled / RETRO = {_fmt(gain['shuffled_over_retro'])} "
                         "(above 1: the model reads its neighbours' content)")  # fmt: skip
        lines += ["", f"Retrieval gain of {label or 'RETRO'}: " + "; ".join(parts) + "."]
    lines += ["", "Overlap buckets (docs/reference.md §1.1): bpb over chunks with r(C) <= alpha; " + result["overlap_note"] + ".",
              "", "| alpha | share of chunks | " + " | ".join(f"{r['model']} bpb" for r in result["rows"]) + " |",
              "|---|---|" + "---|" * len(result["rows"])]  # fmt: skip
    for i, alpha in enumerate(result["alphas"]):
        first = result["rows"][0]["buckets"][i]
        cells = " | ".join(_fmt(r["buckets"][i]["bpb"]) for r in result["rows"])
        lines.append(f"| {alpha:.3g} | {first['share']:.3f} ({first['n_chunks']}) | {cells} |")
    return "\n".join(lines) + "\n"

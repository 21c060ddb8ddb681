"""Question answering with GPT, RAG_GPT, RETRO, RETRO++ and Iter-RetGen (docs/reference.md §2, §4).

Every mode answers from the same passages (the item's own, or the top-k chunks the
database retrieves for the question, each = chunk + continuation) and the same model
family, so the comparison isolates *where* the evidence goes:

| mode | decoder context | encoder (CCA) |
|---|---|---|
| closed-book | `question: Q\\n answer:` | nothing |
| rag | `title: T\\ntext` blocks, then the question (`reorder`: strongest first and last) | nothing |
| retro | the closed-book prompt | all passages |
| retro++ | RETRO++ template (docs/reference.md §2) with the top-1 passage as `source` | the other passages |
| iter-retgen | a reader (rag by default) answers; question + answer is the second query | as the reader |

RETRO prompts are left-padded with EOS to a multiple of the chunk size m, so the last
prompt token completes a chunk; the passages are that chunk's neighbours (and those of
any chunk completed while answering). Positions from there on, i.e. every answer token
of up to m-1 tokens, attend to them through CCA. Answers are decoded greedily and end
at a newline. Fine-tuning (`finetune`) uses exactly these inputs, with loss only on the
answer tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from retrolm.errors import RetrolmError

if TYPE_CHECKING:
    from retrolm.db.database import RetrievalDB
    from retrolm.model.retro import Retro
    from retrolm.tokenizer import Tokenizer
from retrolm.qa.data import (
    Passage,
    QAItem,
    rag_prompt,
    reorder_passages,
    retro_plus_plus_template,
)

MODES = ("closed-book", "rag", "retro", "retro++", "iter-retgen")
RETRO_MODES = ("retro", "retro++")
IGNORE = -100


@dataclass
class Evidence:
    """One passage: text for prompts, neighbour tokens (r,) + mask (r,) for the encoder."""

    title: str
    text: str
    tokens: np.ndarray  # int64 (r,)
    mask: np.ndarray  # bool (r,)
    score: float = 0.0
    doc_id: str | None = None


@dataclass
class Example:
    """Model input for one question in one mode."""

    prompt_ids: list[int]
    neighbours: np.ndarray | None  # int64 (k', r) for the last prompt chunk, or None
    neighbour_mask: np.ndarray | None  # bool (k', r)
    passages: list[Evidence]


# -- passages ----------------------------------------------------------------------------------


class PassageSource:
    """Passages for a question: the item's own, else the database's top-k for a query."""

    def __init__(self, db: RetrievalDB | None, tokenizer: Tokenizer, k: int, neighbor_len: int, pad_id: int):
        if k < 1:
            raise RetrolmError(f"--k {k}: need at least one passage per question")
        self.db, self.tokenizer, self.k = db, tokenizer, k
        self.r, self.pad_id = neighbor_len, pad_id
        self._titles: dict[str, str] | None = None

    def for_item(self, item: QAItem, query: str | None = None) -> list[Evidence]:
        """Item passages (if any and no new query), else retrieved with `query` or the question."""
        if item.passages and query is None:
            return [self._from_text(p) for p in item.passages[: self.k]]
        if self.db is None:
            raise RetrolmError("these questions have no passages: pass --db to retrieve them")
        return self.search(query or item.question)

    def search(self, query: str) -> list[Evidence]:
        hits = self.db.search(query, k=self.k)
        if not hits:
            return []
        ids = np.array([h["chunk_id"] for h in hits], dtype=np.int64)
        tokens, mask = self.db.chunks.gather(ids)  # (k, 2m) x2
        out = []
        for j, hit in enumerate(hits):
            toks, msk = self._fit(tokens[j], mask[j])
            out.append(Evidence(
                title=self.title(hit["doc_id"]), text=(hit["text"] + hit["continuation"]).strip(),
                tokens=toks, mask=msk, score=float(hit["score"]), doc_id=hit["doc_id"],
            ))  # fmt: skip
        return out

    def title(self, doc_id: str) -> str:
        if self._titles is None:
            self._titles = {}
            with open(Path(self.db.path) / "documents.jsonl", encoding="utf-8") as handle:
                for line in handle:
                    row = json.loads(line)
                    self._titles[row["id"]] = row.get("title") or ""
        return self._titles.get(doc_id, "")

    def _from_text(self, passage: Passage) -> Evidence:
        ids = np.array(self.tokenizer.encode(passage.text)[: self.r], dtype=np.int64)
        tokens = np.full(self.r, self.pad_id, dtype=np.int64)
        tokens[: len(ids)] = ids
        mask = np.arange(self.r) < len(ids)
        return Evidence(passage.title, passage.text, tokens, mask)

    def _fit(self, tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Gathered (2m,) neighbour tokens cut or padded to the model's r."""
        out = np.full(self.r, self.pad_id, dtype=np.int64)
        out_mask = np.zeros(self.r, dtype=bool)
        n = min(self.r, len(tokens))
        out[:n], out_mask[:n] = tokens[:n], mask[:n]
        return out, out_mask


# -- prompts -------------------------------------------------------------------------------------


def closed_book_prompt(question: str) -> str:
    return f"question: {question}\n answer:"


def build_example(
    mode: str,
    question: str,
    passages: list[Evidence],
    tokenizer: Tokenizer,
    chunk_size: int,
    *,
    reorder: bool = False,
    max_prompt_tokens: int | None = None,
) -> Example:
    """Prompt tokens (+ encoder neighbours) for `question` in `mode` (not iter-retgen)."""
    if mode == "closed-book":
        text, enc = closed_book_prompt(question), []
    elif mode == "rag":
        shown = reorder_passages(passages) if reorder else list(passages)
        text, enc = _fit_rag(shown, question, tokenizer, max_prompt_tokens), []
    elif mode == "retro":
        text, enc = closed_book_prompt(question), list(passages)
    elif mode == "retro++":
        if passages:
            top = passages[0]
            text = retro_plus_plus_template(top.title, top.text, question).rstrip(" ")
        else:
            text = closed_book_prompt(question)
        enc = list(passages[1:])
    else:
        raise RetrolmError(f"unknown QA mode {mode!r}; choose one of {list(MODES)}")
    ids = tokenizer.encode(text)
    limit = max_prompt_tokens
    if limit is not None and mode in RETRO_MODES:
        limit = max(chunk_size, limit // chunk_size * chunk_size)  # room for the EOS padding
    if limit is not None and len(ids) > limit:
        ids = ids[-limit:]  # keep the question and the "answer:" cue
    neighbours = mask = None
    if mode in RETRO_MODES:
        ids = [tokenizer.eos_id] * (-len(ids) % chunk_size) + ids  # last token completes a chunk
        if enc:
            neighbours = np.stack([e.tokens for e in enc])  # (k', r)
            mask = np.stack([e.mask for e in enc])
    return Example(ids, neighbours, mask, passages)


def _fit_rag(passages: list[Evidence], question: str, tokenizer: Tokenizer, limit: int | None) -> str:
    """rag_prompt, dropping the last passages while it is longer than `limit` tokens."""
    shown = [Passage(p.title, p.text) for p in passages]
    text = rag_prompt(shown, question)
    while limit is not None and len(shown) > 1 and len(tokenizer.encode(text)) > limit:
        shown = shown[:-1]
        text = rag_prompt(shown, question)
    return text


# -- generation ----------------------------------------------------------------------------------


def _prompt_limit(model: Retro, max_new_tokens: int) -> int | None:
    """Longest prompt a model with learned positions can take (None: RoPE, unlimited)."""
    n = getattr(model, "n_positions", None)
    return None if n is None else int(n) - max_new_tokens


@torch.no_grad()
def answer_examples(
    model: Retro,
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers (text before the first newline) for prepared examples.

    Examples of equal prompt length run as one batch (the step API keeps rows aligned).
    """
    from retrolm.generation.decode import StopChecker, decode_tokens
    from retrolm.generation.sampling import SamplingParams

    params = SamplingParams(greedy=True)
    checker = StopChecker(tokenizer, ["\n"], max_new_tokens)
    device = next(model.parameters()).device
    m, r = model.config.chunk_size, model.config.neighbor_len
    use_cca = bool(model.config.cca_layers)
    answers: list[str] = [""] * len(examples)
    by_len: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_len.setdefault(len(ex.prompt_ids), []).append(i)
    was_training = model.training
    model.eval()
    try:
        for length, idx in by_len.items():
            for lo in range(0, len(idx), batch_size):
                group = idx[lo : lo + batch_size]
                retrieve = None
                if use_cca and any(examples[i].neighbours is not None for i in group):
                    retrieve = _fixed_retriever([examples[i] for i in group], length // m - 1, r, device)
                steps = decode_tokens(
                    model, [examples[i].prompt_ids for i in group], params, checker, retrieve,
                    [0] * len(group),
                )  # fmt: skip
                *_, (rows, _stats) = steps  # the last yield has every row done
                for b, i in enumerate(group):
                    answers[i] = checker.final_text(rows[b]).strip()
    finally:
        model.train(was_training)
    return answers


def _stack_neighbours(
    examples: Sequence[Example], r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row neighbours padded to the largest k': (B, k, r) int64, (B, k, r) bool."""
    k = max((ex.neighbours.shape[0] for ex in examples if ex.neighbours is not None), default=1)
    tokens = torch.zeros(len(examples), k, r, dtype=torch.int64)
    mask = torch.zeros(len(examples), k, r, dtype=torch.bool)
    for b, ex in enumerate(examples):
        if ex.neighbours is not None:
            n = ex.neighbours.shape[0]
            tokens[b, :n] = torch.from_numpy(ex.neighbours)
            mask[b, :n] = torch.from_numpy(ex.neighbour_mask)
    return tokens, mask


def _fixed_retriever(examples: Sequence[Example], first_chunk: int, r: int, device: Any):
    """A `retrieve(u, chunk)` callback giving each row its passages from chunk `first_chunk` on."""
    tokens, mask = _stack_neighbours(examples, r)
    tokens, mask = tokens.to(device), mask.to(device)

    def retrieve(u: int, chunk_tokens: torch.Tensor):
        return (tokens, mask) if u >= first_chunk else None

    return retrieve


# -- the evaluation loop ---------------------------------------------------------------------------


def iter_reader_for(model: Retro) -> str:
    """Iter-RetGen's reader: RAG for a GPT, RETRO++ for a RETRO."""
    return "retro++" if model.config.cca_layers else "rag"


def answer_items(
    model: Retro,
    tokenizer: Tokenizer,
    items: Sequence[QAItem],
    mode: str,
    source: PassageSource | None,
    *,
    reorder: bool = False,
    iter_reader: str | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Answer every item in `mode`; one record per item (prediction, passages, first answer)."""
    if mode not in MODES:
        raise RetrolmError(f"unknown QA mode {mode!r}; choose one of {list(MODES)}")
    if mode in RETRO_MODES and not model.config.cca_layers:
        raise RetrolmError(f"--mode {mode} needs a RETRO checkpoint (this one has no CCA layers)")
    m = model.config.chunk_size
    limit = _prompt_limit(model, max_new_tokens)
    reader = mode
    if mode == "iter-retgen":
        reader = iter_reader or iter_reader_for(model)
        if reader not in ("rag", "retro", "retro++"):
            raise RetrolmError(f"--iter-reader {reader!r}: choose rag, retro or retro++")
    passages: list[list[Evidence]] = []
    for item in items:
        passages.append([] if mode == "closed-book" else source.for_item(item))  # type: ignore[union-attr]

    def run(ps: list[list[Evidence]]) -> list[str]:
        examples = [
            build_example(reader, it.question, p, tokenizer, m, reorder=reorder, max_prompt_tokens=limit)
            for it, p in zip(items, ps, strict=True)
        ]
        return answer_examples(model, tokenizer, examples, max_new_tokens=max_new_tokens,
                               batch_size=batch_size)  # fmt: skip

    preds = run(passages)
    first = None
    if mode == "iter-retgen":
        first = preds
        assert source is not None
        passages = [source.search(f"{it.question} {a}".strip()) for it, a in zip(items, first, strict=True)]
        preds = run(passages)
    records = []
    for i, item in enumerate(items):
        rec: dict[str, Any] = {
            "question": item.question, "answers": item.answers, "prediction": preds[i],
            "passages": [p.doc_id or p.title for p in passages[i]],
        }  # fmt: skip
        if first is not None:
            rec["first_answer"] = first[i]
        if "kind" in item.extra:
            rec["kind"] = item.extra["kind"]
        records.append(rec)
    return records


def score(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """EM and F1 (percent) overall and per `kind` (when the items have one)."""
    from retrolm.evaluation.metrics import exact_match, f1_score

    for rec in records:
        rec["em"] = exact_match(rec["prediction"], rec["answers"])
        rec["f1"] = f1_score(rec["prediction"], rec["answers"])

    def agg(rs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        n = len(rs)
        return {
            "n": n,
            "em": 100.0 * sum(r["em"] for r in rs) / n if n else math.nan,
            "f1": 100.0 * sum(r["f1"] for r in rs) / n if n else math.nan,
        }

    out = agg(records)
    kinds = sorted({r["kind"] for r in records if "kind" in r})
    if kinds:
        out["by_kind"] = {k: agg([r for r in records if r.get("kind") == k]) for k in kinds}
    return out


# -- data selection --------------------------------------------------------------------------------


def load_items(spec: str | Path, work_dir: Path | None = None) -> list[QAItem]:
    """A QA JSONL file, or `builtin:facts` (the facts corpus's QA pairs, default seed)."""
    from retrolm.qa.data import load_qa_jsonl

    if str(spec) == "builtin:facts":
        import tempfile

        from retrolm.corpora.facts import write_qa_jsonl

        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            path = Path(tmp) / "facts_qa.jsonl"
            write_qa_jsonl(path)
            return load_qa_jsonl(path)
    if str(spec).startswith("builtin:"):
        raise RetrolmError(f"unknown built-in QA data {spec!r}; use builtin:facts or a JSONL file")
    return load_qa_jsonl(spec)


def select_items(
    items: Sequence[QAItem],
    *,
    subset: str = "all",
    eval_share: float = 0.5,
    kind: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[QAItem]:
    """Filter items: a stable fine-tune/eval split (hash of the question), kind, and limit.

    `limit` keeps a seeded sample, balanced across kinds when the items have them.
    """
    if subset not in ("all", "finetune", "eval"):
        raise RetrolmError(f"--subset {subset!r}: choose all, finetune or eval")
    out = []
    for it in items:
        h = int(hashlib.sha256(it.question.encode("utf-8")).hexdigest()[:8], 16) / 16**8
        part = "eval" if h < eval_share else "finetune"
        if subset != "all" and part != subset:
            continue
        if kind is not None and it.extra.get("kind") != kind:
            continue
        out.append(it)
    if limit is not None and len(out) > limit:
        rng = np.random.default_rng(seed)
        kinds = sorted({str(it.extra.get("kind", "")) for it in out})
        per = -(-limit // len(kinds))
        keep: list[int] = []
        for k in kinds:
            idx = [i for i, it in enumerate(out) if str(it.extra.get("kind", "")) == k]
            keep += sorted(rng.permutation(idx)[:per].tolist())
        out = [out[i] for i in sorted(keep)[:limit]]
    if not out:
        raise RetrolmError("no QA items left after --subset/--kind/--limit; relax the filters")
    return out


# -- fine-tuning -------------------------------------------------------------------------------------


def training_batch(
    examples: Sequence[Example],
    answers: Sequence[str],
    tokenizer: Tokenizer,
    chunk_size: int,
    neighbor_len: int,
    with_neighbours: bool,
) -> dict[str, torch.Tensor]:
    """tokens/targets (B, T) with targets = -100 except on the answer (and its newline).

    Sequences are prompt + " answer\\n", right-padded; RETRO rows get their passages as
    neighbours of every chunk from the last prompt chunk on, as at inference.
    """
    seqs, starts = [], []
    for ex, ans in zip(examples, answers, strict=True):
        answer_ids = tokenizer.encode(f" {ans.strip()}\n")
        seqs.append(ex.prompt_ids + answer_ids)
        starts.append(len(ex.prompt_ids))
    T = max(len(s) for s in seqs) - 1
    B = len(seqs)
    tokens = torch.full((B, T), tokenizer.pad_id, dtype=torch.int64)
    targets = torch.full((B, T), IGNORE, dtype=torch.int64)
    for b, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        s = torch.tensor(seq, dtype=torch.int64)
        tokens[b, : len(seq) - 1] = s[:-1]
        targets[b, start - 1 : len(seq) - 1] = s[start:]  # position t predicts token t+1
    batch = {"tokens": tokens, "targets": targets}
    if with_neighbours:
        n_chunks = -(-T // chunk_size)
        nb, mask = _stack_neighbours(examples, neighbor_len)  # (B, k, r)
        neighbours = torch.zeros(B, n_chunks, nb.shape[1], neighbor_len, dtype=torch.int64)
        nmask = torch.zeros(B, n_chunks, nb.shape[1], neighbor_len, dtype=torch.bool)
        for b, start in enumerate(starts):
            first = start // chunk_size - 1
            neighbours[b, first:] = nb[b]
            nmask[b, first:] = mask[b]
        batch["neighbours"], batch["neighbour_mask"] = neighbours, nmask
    return batch


def finetune(
    model: Retro,
    tokenizer: Tokenizer,
    items: Sequence[QAItem],
    mode: str,
    source: PassageSource | None,
    *,
    steps: int = 200,
    batch_size: int = 8,
    lr: float = 1e-4,
    reorder: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Fine-tune `model` in place on QA pairs in `mode` (loss on answer tokens only).

    Returns the loss per step. AdamW, linear warm-up (10%) and cosine decay to 0.1x.
    """
    from tqdm import tqdm

    from retrolm.training.optimizer import build_optimizer, set_lr
    from retrolm.training.schedule import LRSchedule

    if mode == "iter-retgen":
        mode = iter_reader_for(model)
    m, r = model.config.chunk_size, model.config.neighbor_len
    limit = _prompt_limit(model, 16)
    examples = []
    for it in items:
        passages = [] if mode == "closed-book" else source.for_item(it)  # type: ignore[union-attr]
        examples.append(
            build_example(mode, it.question, passages, tokenizer, m, reorder=reorder,
                          max_prompt_tokens=limit)
        )  # fmt: skip
    with_nb = mode in RETRO_MODES and bool(model.config.cca_layers)
    device = next(model.parameters()).device
    optimizer = build_optimizer(model, lr, 0.0, (0.9, 0.95))
    schedule = LRSchedule(lr, steps, max(1, steps // 10), 0.1)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(items)) for _ in range(-(-steps * batch_size // len(items)))])
    losses = []
    model.train()
    bar = tqdm(range(steps), desc=f"qa finetune ({mode})", disable=not progress)
    for step in bar:
        pick = order[step * batch_size : (step + 1) * batch_size]
        batch = training_batch(
            [examples[i] for i in pick], [items[i].answers[0] for i in pick], tokenizer, m, r, with_nb
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        set_lr(optimizer, schedule.lr(step))
        _, loss = model(batch["tokens"], batch.get("neighbours"), batch.get("neighbour_mask"),
                        batch["targets"])  # fmt: skip
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses

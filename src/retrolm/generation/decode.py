"""KV-cached generation for RETRO and GPT checkpoints, with online retrieval.

- One `Retro.step` per new token (or per verified draft); the prompt is fed once.
- RETRO retrieves online: whenever a chunk of m tokens is complete, the model calls an
  `OnlineRetriever`, which searches the database with that chunk's text and returns
  neighbour + continuation tokens; they are encoded once into the cache.
- Batching: the step API keeps all sequences of a batch at the same position (chunk
  boundaries are absolute positions), so prompts are grouped by token length and each
  group of equal-length prompts is decoded as one batch (no padding, no attention mask).
  Prompts of other lengths run in their own groups. Speculative decoding runs one
  prompt at a time (each row would accept a different number of tokens).
- Short prompts: a RETRO model reads neighbours from position m-1 on (the first m-1
  tokens of any text attend to nothing, as in training), so with a prompt shorter than
  one chunk the first new tokens are generated without retrieval; `retrieval_note` says
  so (and that nothing was retrieved at all when no chunk was ever completed).
- Length: at most MAX_NEW_TOKENS new tokens per call. Positions past the model's
  `max_seq_len` keep counting (rotary extrapolation, see docs/model.md); the cache
  grows with the text.
- Seeds: prompt i of a call samples with its own generator seeded `seed + i`, so a
  result does not depend on which other prompts share its batch.
- Stop: EOS ends a generation; so does any stop string (the text is cut before it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from retrolm.errors import RetrolmError
from retrolm.generation.retrieval import ChunkRetrieval, OnlineRetriever
from retrolm.generation.sampling import SamplingParams, choose_next
from retrolm.generation.speculative import decode_speculative

# Beyond this a request is most likely a typo (100000000), not a plan: at ~30-300 tokens/s
# on a CPU, 16384 tokens already take minutes, and the KV cache grows with the text.
MAX_NEW_TOKENS = 16384

if TYPE_CHECKING:
    from retrolm.db.database import RetrievalDB
    from retrolm.model.retro import Retro
    from retrolm.tokenizer import Tokenizer


@dataclass
class GenerationResult:
    """One prompt's generation. `token_ids` are the new tokens only (the prompt is apart)."""

    prompt: str
    text: str
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str  # "length" | "stop" | "eos"
    retrieval: list[ChunkRetrieval] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    # RETRO only: why some or all new tokens were generated without neighbours ("" = none were)
    retrieval_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Row:
    """Decoding state of one sequence."""

    prompt_ids: list[int]
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class StopChecker:
    """Detects EOS, stop strings and the token limit after each new token."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] | None, max_new_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.max_new_tokens = max_new_tokens
        # a stop string of L characters spans at most 4L byte-level tokens
        self.window = 4 * max((len(s) for s in self.stop), default=0) + 1

    def push(self, row: _Row, token: int) -> bool:
        """Append `token` unless the row is done; return True when the row is done after it."""
        if row.done:
            return True
        if token == self.tokenizer.eos_id:
            row.finish_reason = "eos"
            return True
        row.generated.append(token)
        if self.stop:
            tail = self.tokenizer.decode(row.generated[-self.window :])
            if any(s in tail for s in self.stop):
                row.finish_reason = "stop"
                return True
        if len(row.generated) >= self.max_new_tokens:
            row.finish_reason = "length"
        return row.done

    def final_text(self, row: _Row) -> str:
        text = self.tokenizer.decode(row.generated)
        if row.finish_reason == "stop":
            cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=len(text))
            text = text[:cut]
        return text


def safe_to_stream(text: str, stops: Sequence[str]) -> str:
    """The part of a growing `text` that may be shown now: cut at the first stop string,
    without an incomplete UTF-8 tail (decoded as U+FFFD) or a tail that a stop string
    might still complete. Streaming in the CLI and in the server both use it."""
    for s in stops:
        cut = text.find(s) if s else -1
        if cut >= 0:
            text = text[:cut]
    text = text.rstrip("\ufffd")
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold]


class TextStream:
    """Printable pieces of one row's growing text, for streaming output.

    A piece never ends inside a UTF-8 character (the byte-level tokenizer decodes a
    partial one as U+FFFD) and never holds text a stop string might still cut; `finish`
    returns the rest of the final text. Text is committed whenever nothing is held back,
    so each call decodes only the tokens after the last commit (no quadratic cost).
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.sent = ""  # everything returned so far
        self.base = 0  # tokens [0, base) are fully in `committed`
        self.committed = ""

    def _safe(self, text: str) -> tuple[str, bool]:
        """(the part of `text` safe to print, whether it is all of `text`)."""
        safe = safe_to_stream(text, self.stop)
        return safe, safe == text

    def piece(self, token_ids: Sequence[int]) -> str:
        """New printable text after `token_ids` (all new tokens so far) grew."""
        tail = self.tokenizer.decode(list(token_ids[self.base :]))
        safe, whole = self._safe(self.committed + tail)
        if not safe.startswith(self.sent):
            return ""
        new, self.sent = safe[len(self.sent) :], safe
        if whole:
            self.base, self.committed = len(token_ids), safe
        return new

    def finish(self, final_text: str) -> str:
        """What is left to print of the final text (stop strings already cut by the caller)."""
        rest = final_text[len(self.sent) :] if final_text.startswith(self.sent) else ""
        self.sent = final_text
        return rest


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _is_retro(model: Retro) -> bool:
    return bool(model.config.cca_layers)


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Prompt token ids; an empty prompt starts from EOS (the document separator)."""
    ids = tokenizer.encode(prompt)
    return ids if ids else [tokenizer.eos_id]


def decode_tokens(
    model: Retro,
    prompt_ids: list[list[int]],  # B prompts of EQUAL length
    params: SamplingParams,
    checker: StopChecker,
    retriever: OnlineRetriever | None,
    seeds: list[int],
    speculative: bool = False,
    draft_len: int = 8,
    draft_history: bool = True,
) -> Iterator[tuple[list[_Row], dict[str, Any]]]:
    """Decode one batch; yield (rows, stats) after every model step (rows grow in place).

    The last yield has every row done. With `speculative` (greedy or sampled), B must be 1;
    the loop itself is `speculative.decode_speculative`.
    """
    B = len(prompt_ids)
    if B == 0 or any(len(p) != len(prompt_ids[0]) or not p for p in prompt_ids):
        raise RetrolmError("decode_tokens needs non-empty prompts of equal token length")
    if speculative and B != 1:
        raise RetrolmError("speculative decoding needs one prompt at a time")
    device = _device_of(model)
    rows = [_Row(list(p)) for p in prompt_ids]
    stats: dict[str, Any] = {
        "model_steps": 0, "drafted": 0, "accepted": [], "accepted_from": {"neighbours": 0, "history": 0},
    }  # fmt: skip
    generators = None
    if not params.is_greedy:
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    if checker.max_new_tokens <= 0:
        for row in rows:
            row.finish_reason = "length"
        yield rows, stats
        return
    logits, cache = model.step(torch.tensor(prompt_ids, device=device), None, retriever)
    stats["model_steps"] += 1
    nxt = choose_next(logits[:, -1], cache.token_history(), params, generators)  # (B,)
    if speculative:
        generator = generators[0] if generators else None
        for _ in decode_speculative(model, rows[0], cache, int(nxt[0]), params, checker, retriever,
                                    generator, draft_len, draft_history, stats):  # fmt: skip
            yield rows, stats
        return
    while True:
        done = [checker.push(row, int(t)) for row, t in zip(rows, nxt.tolist(), strict=True)]
        yield rows, stats
        if all(done):
            return
        logits, cache = model.step(nxt[:, None], cache, retriever)
        stats["model_steps"] += 1
        nxt = choose_next(logits[:, -1], cache.token_history(), params, generators)


def retrieval_note(row: _Row, m: int, retriever: OnlineRetriever, b: int) -> str:
    """Why some or all of a RETRO row's new tokens were generated without neighbours ("" if none)."""
    p, n = len(row.prompt_ids), len(row.generated)
    found = [r for r in retriever.retrieval_of(b, row.prompt_ids + row.generated, False) if r.chunk_ids]
    blind = min(n, max(0, m - p))  # new token j comes from position p-1+j; CCA starts at m-1
    if not found and n:
        return (
            f"nothing retrieved: the prompt ({p} tokens) plus the {n} new tokens never completed "
            f"a {m}-token chunk with neighbours, so no token read any; give a prompt of at least "
            f"{m} tokens"
        )
    if blind:
        return (
            f"the prompt ({p} tokens) is shorter than one {m}-token chunk: the first {blind} new "
            f"tokens were generated without neighbours (retrieval starts when a chunk is complete)"
        )
    return ""


def _group_by_length(prompt_ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of prompts grouped by equal token length, at most `batch_size` per group."""
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompt_ids):
        by_len.setdefault(len(p), []).append(i)
    groups = []
    for idx in by_len.values():
        groups += [idx[j : j + batch_size] for j in range(0, len(idx), batch_size)]
    return groups


def generate(
    model: Retro,
    tokenizer: Tokenizer,
    prompts: list[str] | str,
    *,
    db: RetrievalDB | None = None,
    max_new_tokens: int = 64,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    stop: Sequence[str] | None = None,
    seed: int = 0,
    speculative: bool = False,
    k: int | None = None,
    return_retrieval: bool = False,
    batch_size: int = 16,
    draft_len: int = 8,
    draft_history: bool = True,
    prompt_ids: list[list[int]] | None = None,
    on_step: Callable[[int, list[int]], None] | None = None,
) -> list[GenerationResult]:
    """Generate a continuation of each prompt (see the module docstring for the policies).

    RETRO models need `db` (a `RetrievalDB`); GPT models ignore it. `k` neighbours per
    chunk (default: the model's training k). `temperature=0` means greedy.
    `speculative=True` gives output distributed exactly as without it (greedy: the same
    tokens), usually faster. `prompt_ids` (token ids per prompt)
    replaces tokenising `prompts`. `draft_history=False` drafts from neighbours only
    (for measuring them). `on_step(prompt_index, new_token_ids_so_far)` is called
    after each model step (streaming).
    """
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    if prompt_ids is None:
        prompt_ids = [encode_prompt(tokenizer, p) for p in texts]
    elif len(prompt_ids) != len(texts):
        raise RetrolmError("prompt_ids must have one entry per prompt")
    if not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise RetrolmError(
            f"max_new_tokens {max_new_tokens} must be in [0, {MAX_NEW_TOKENS}]; "
            "for longer text, continue from the output in another call"
        )
    params = SamplingParams(greedy, temperature, top_k, top_p, repetition_penalty)
    params.validate()
    retro = _is_retro(model)
    if retro and db is None:
        raise RetrolmError("this is a RETRO checkpoint: pass --db <database> for online retrieval")
    if retro:
        from retrolm.checkpoints import check_fits

        k = check_fits(model, db, k)
    k = int(k or model.config.n_neighbors)
    checker = StopChecker(tokenizer, stop, max_new_tokens)
    was_training = model.training
    model.eval()
    results: list[GenerationResult | None] = [None] * len(texts)
    try:
        groups = [[i] for i in range(len(texts))] if speculative else _group_by_length(prompt_ids, batch_size)
        for group in groups:
            retriever = (
                OnlineRetriever(db, k, len(group), _device_of(model)) if retro else None
            )
            t0 = time.perf_counter()
            rows: list[_Row] = []
            stats: dict[str, Any] = {}
            for rows, step_stats in decode_tokens(
                model, [prompt_ids[i] for i in group], params, checker, retriever,
                [seed + i for i in group], speculative, draft_len, draft_history,
            ):  # fmt: skip
                stats = step_stats
                if on_step is not None:
                    for b, i in enumerate(group):
                        on_step(i, rows[b].generated)
            seconds = time.perf_counter() - t0
            new_total = sum(len(r.generated) for r in rows)
            for b, i in enumerate(group):
                row = rows[b]
                accepted = stats.get("accepted", [])
                results[i] = GenerationResult(
                    prompt=texts[i],
                    text=checker.final_text(row),
                    prompt_ids=list(row.prompt_ids),
                    token_ids=list(row.generated),
                    finish_reason=row.finish_reason or "length",
                    retrieval=(
                        retriever.retrieval_of(b, row.prompt_ids + row.generated, return_retrieval)
                        if retriever is not None else []
                    ),
                    retrieval_note=(
                        retrieval_note(row, model.config.chunk_size, retriever, b)
                        if retriever is not None else ""
                    ),
                    stats={
                        "new_tokens": len(row.generated),
                        "batch_size": len(group),
                        "seconds": seconds,
                        "tokens_per_s": new_total / seconds if seconds > 0 else 0.0,
                        "model_steps": stats.get("model_steps", 0),
                        "retrieval_calls": retriever.calls if retriever is not None else 0,
                        "searches": retriever.searches if retriever is not None else 0,
                        "retrieval_seconds": retriever.seconds if retriever is not None else 0.0,
                        "drafted": stats.get("drafted", 0),
                        "accepted_lengths": list(accepted),
                        "mean_accepted": sum(accepted) / len(accepted) if accepted else 0.0,
                        "accepted_from": dict(stats.get("accepted_from", {})),
                    },
                )
    finally:
        model.train(was_training)
    return [r for r in results if r is not None]


# ------------------------------------------------------------------------------- loading


def load_for_generation(
    checkpoint: str | Path, db: str | Path | None = None, device: str = "cpu"
) -> tuple[Retro, Tokenizer, RetrievalDB | None]:
    """(model, tokenizer, db or None) for a checkpoint, checked against each other.

    The tokenizer comes from `db`; without one, from the checkpoint's own tokenizer.json
    or the database recorded in its trainer_state.json. RETRO checkpoints need `db`.
    """
    from retrolm.checkpoints import (
        check_fits,
        load_checkpoint,
        resolve_checkpoint_dir,
        tokenizer_file,
    )
    from retrolm.db.database import RetrievalDB
    from retrolm.tokenizer import Tokenizer

    ckpt = resolve_checkpoint_dir(checkpoint)
    model = load_checkpoint(ckpt, map_location=device).eval()
    opened = None
    if db is not None:
        opened = RetrievalDB.open(db, verify=False)
    elif _is_retro(model):
        raise RetrolmError(f"{ckpt} is a RETRO checkpoint: pass --db <database> for online retrieval")
    if opened is not None:
        check_fits(ckpt, opened)
        tokenizer = opened.tokenizer
        if _is_retro(model):
            _ = opened.retriever  # load the encoder / index now, not inside the first step
    else:
        own = tokenizer_file(ckpt)
        if own is None:
            raise RetrolmError(f"no tokenizer for {ckpt}: pass --db <database the model was trained on>")
        tokenizer = Tokenizer.load(own)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise RetrolmError(
            f"tokenizer/vocabulary mismatch: the tokenizer has {tokenizer.vocab_size} tokens, the "
            f"checkpoint {model.config.vocab_size}; use the database the model was trained on"
        )
    return model, tokenizer, opened

"""`POST /v1/completions`: check a request into a `Plan`, generate its choices, answer.

Choices: every prompt `n` times, in OpenAI's order (prompt 0's n choices first). Choice c
samples with seed `seed + c`; without a seed each request draws a random one. Temperature
0 is greedy. With `stream: true` the answer is server-sent events (streaming.py).
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from retrolm.errors import RetrolmError
from retrolm.serve.body import ApiError, read_json
from retrolm.serve.engine import ClientGone, Engine, ServeLimits
from retrolm.serve.logprobs import TokenLogprobs
from retrolm.serve.schemas import CompletionRequest

MIN_TEMPERATURE = 0.01


@dataclass
class Plan:
    """A checked completions request: token ids per prompt and the decoding settings."""

    prompts: list[list[int]]  # token ids of each prompt
    texts: list[str]  # each prompt's text (decoded when given as token ids)
    n: int
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    stops: list[str]
    seed: int
    logprobs: int | None
    echo: bool
    stream: bool
    include_usage: bool
    return_retrieval: bool
    rid: str
    created: int

    @property
    def greedy(self) -> bool:
        """Temperature 0 is greedy; so is any below 0.01 (dividing logits by it overflows)."""
        return self.temperature < MIN_TEMPERATURE

    @property
    def owners(self) -> list[int]:
        """The prompt index of each choice."""
        return [p for p in range(len(self.prompts)) for _ in range(self.n)]


def stop_list(stop: str | list[str] | None) -> list[str]:
    """`stop` as a list of 1 to 4 strings of 1 to 128 characters."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 4:
        raise ApiError(400, f"stop: at most 4 stop strings, got {len(stops)}")
    if any(len(s) > 128 or not s for s in stops):
        raise ApiError(400, "stop: each stop string must have 1 to 128 characters")
    return stops


def prompts_of(req: CompletionRequest, engine: Engine, limits: ServeLimits) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt (text, texts, ids or lists of ids), within the limits."""
    from retrolm.generation.decode import encode_prompt

    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], str)):
        texts = [prompt] if isinstance(prompt, str) else prompt
        if any(len(t) > 20 * limits.max_prompt_tokens for t in texts):  # cheap guard first
            raise ApiError(400, f"prompt: longer than {20 * limits.max_prompt_tokens} characters")
        ids = [encode_prompt(engine.tokenizer, t) for t in texts]
    else:
        texts = None
        ids = [prompt] if prompt and isinstance(prompt[0], int) else list(prompt)
        vocab = engine.tokenizer.vocab_size
        if any(not p for p in ids):
            raise ApiError(400, "prompt: a token-id prompt must not be empty")
        if any(t < 0 or t >= vocab for p in ids for t in p):
            raise ApiError(400, f"prompt: token ids must be in 0..{vocab - 1}")
    if not ids:
        raise ApiError(400, "prompt: an empty list; give at least one prompt")
    longest = max(len(p) for p in ids)
    if longest > limits.max_prompt_tokens:
        raise ApiError(400, f"prompt: {longest} tokens, the limit is {limits.max_prompt_tokens}")
    return ids, list(texts) if texts is not None else [engine.tokenizer.decode(p) for p in ids]


def plan_completion(req: CompletionRequest, engine: Engine, limits: ServeLimits) -> Plan:
    """Check `req` against the limits; 400 with a one-line message when it does not fit."""
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens: at most {limits.max_tokens}, got {max_tokens}")
    if req.logprobs is not None and req.logprobs > limits.max_logprobs:
        raise ApiError(400, f"logprobs: at most {limits.max_logprobs}, got {req.logprobs}")
    stops = stop_list(req.stop)
    ids, texts = prompts_of(req, engine, limits)
    n = req.n or 1
    if len(ids) * n > limits.max_choices:
        raise ApiError(400, f"{len(ids)} prompts x n={n} choices; the limit is {limits.max_choices}")
    return Plan(
        prompts=ids, texts=texts, n=n,
        max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
        top_k=req.top_k, top_p=1.0 if req.top_p is None else req.top_p,
        repetition_penalty=req.repetition_penalty, stops=stops,
        seed=secrets.randbelow(2**31) if req.seed is None else req.seed,
        logprobs=req.logprobs, echo=bool(req.echo), stream=bool(req.stream),
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        return_retrieval=req.return_retrieval,
        rid=f"cmpl-{uuid.uuid4().hex[:24]}", created=int(time.time()),
    )  # fmt: skip


def generate_choices(engine: Engine, plan: Plan, cancelled: threading.Event,
                     on_step: Callable[[int, list[int]], None] | None = None) -> list[Any]:
    """Every choice's `GenerationResult` (runs on the worker; stops when `cancelled`)."""
    from retrolm.generation.decode import generate

    def step(choice: int, ids: list[int]) -> None:
        if cancelled.is_set():
            raise ClientGone
        if on_step is not None:
            on_step(choice, ids)

    owners = plan.owners
    try:
        return generate(
            engine.model, engine.tokenizer, [plan.texts[p] for p in owners], db=engine.db,
            prompt_ids=[plan.prompts[p] for p in owners], max_new_tokens=plan.max_tokens,
            greedy=plan.greedy, temperature=plan.temperature if not plan.greedy else 1.0,
            top_k=plan.top_k, top_p=plan.top_p, repetition_penalty=plan.repetition_penalty,
            stop=plan.stops, seed=plan.seed, speculative=engine.speculative and plan.greedy,
            return_retrieval=plan.return_retrieval, on_step=step,
        )  # fmt: skip
    except RetrolmError as err:
        raise ApiError(400, str(err)) from None


def finish_reason(result: Any) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def scored_ids(result: Any, eos: int) -> list[int]:
    """Prompt + completion tokens, with the EOS that ended the completion (it was chosen)."""
    return result.prompt_ids + result.token_ids + ([eos] if result.finish_reason == "eos" else [])


def reported_range(scores: TokenLogprobs, plan: Plan, result: Any) -> tuple[int, int]:
    """Tokens [lo, hi) a choice reports: the prompt's when echoing, then the completion's
    tokens that start inside its (stop-cut) text, then the EOS that ended it."""
    n_prompt, hi = len(result.prompt_ids), len(scores.ids)
    if result.finish_reason == "stop" and hi > n_prompt:
        hi = scores.count_before(scores.offsets[n_prompt] + len(result.text), n_prompt)
    return (0 if plan.echo else n_prompt), hi


def choice_logprobs(engine: Engine, plan: Plan, result: Any) -> dict[str, Any] | None:
    if plan.logprobs is None:
        return None
    scores = TokenLogprobs(engine, plan.logprobs)
    scores.feed(scored_ids(result, engine.tokenizer.eos_id))
    return scores.block(*reported_range(scores, plan, result))


def usage(plan: Plan, results: list[Any]) -> dict[str, int]:
    prompt = sum(len(p) for p in plan.prompts)
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def retrieval_records(result: Any) -> list[dict[str, Any]]:
    return [{"chunk_index": r.chunk_index, "query": r.query, "neighbours": r.neighbours}
            for r in result.retrieval]  # fmt: skip


def completion_body(engine: Engine, plan: Plan, results: list[Any]) -> dict[str, Any]:
    """The JSON answer; log-probs are computed here, on the worker."""
    choices = []
    for c, (p, res) in enumerate(zip(plan.owners, results, strict=True)):
        choice = {"text": (plan.texts[p] if plan.echo else "") + res.text, "index": c,
                  "logprobs": choice_logprobs(engine, plan, res), "finish_reason": finish_reason(res)}
        if plan.return_retrieval:
            choice["retrieval"] = retrieval_records(res)
        choices.append(choice)
    return {"id": plan.rid, "object": "text_completion", "created": plan.created, "model": engine.name,
            "choices": choices, "usage": usage(plan, results)}  # fmt: skip


async def until_disconnected(request: Request) -> None:
    """Return once the client has gone (the body is read, so only a disconnect can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def completions(request: Request) -> Any:
    """POST /v1/completions."""
    from retrolm.serve.streaming import stream_completion

    engine, limits = request.app.state.engine, request.app.state.limits
    plan = plan_completion(await read_json(request, CompletionRequest, limits), engine, limits)
    if plan.stream:
        return stream_completion(engine, limits, plan)
    cancelled = threading.Event()

    def job() -> dict[str, Any]:
        return completion_body(engine, plan, generate_choices(engine, plan, cancelled))

    return await engine.run(job, cancelled, limits.max_pending, lambda: until_disconnected(request))

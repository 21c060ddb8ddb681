"""HTTP server: an OpenAI-compatible subset over `retrolm.generation.decode` (FastAPI).

- `POST /v1/completions`: prompt, max_tokens, temperature (0 = greedy), top_p, top_k,
  repetition_penalty, stop, seed, stream (server-sent events `data: {...}\\n\\n`, ending
  with `data: [DONE]\\n\\n`), return_retrieval.
- `POST /v1/retrieve`: {"text", "k"} -> the database's neighbours (chunk + continuation).
- `GET /health`.

The model and the database are loaded once (`create_app`). One worker thread runs every
model and retriever call, so concurrent requests are serialised and never share a cache;
the event loop stays free for /health and for queueing. Bodies are parsed by hand, so
malformed JSON, wrong types and oversized inputs get a 4xx with a one-line message (never
a 500). A client that drops a stream stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import Request  # module level: FastAPI resolves the string annotations here
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from retrolm.errors import RetrolmError


@dataclass(frozen=True)
class ServeLimits:
    """Per-request limits (all configurable from `retrolm serve`)."""

    max_prompt_tokens: int = 1024
    max_tokens: int = 512
    max_body_bytes: int = 256 * 1024
    max_pending: int = 64  # requests queued or running; more get 503
    max_retrieve_k: int = 32


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**62)
    stream: bool = False
    n: Literal[1] = 1
    model: str | None = None
    return_retrieval: bool = False


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    text: str = Field(min_length=1)
    k: int = Field(4, ge=1)


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class _Cancelled(Exception):
    """Raised inside the worker when a streaming client went away."""


class Engine:
    """The loaded model, tokenizer and database, plus the single worker thread."""

    def __init__(self, model: Any, tokenizer: Any, db: Any = None, name: str = "retrolm",
                 speculative: bool = False) -> None:
        self.model, self.tokenizer, self.db, self.name = model.eval(), tokenizer, db, name
        self.speculative = speculative
        self.kind = "retro" if model.config.cca_layers else "gpt"
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrolm-model")
        self.pending = 0
        self._count_lock = threading.Lock()
        if db is not None:
            _ = db.retriever  # load the encoder / index now, not on the first request

    @classmethod
    def load(cls, checkpoint: str | Path, db: str | Path | None = None, device: str = "cpu",
             speculative: bool = False) -> Engine:
        from retrolm.generation.decode import load_for_generation

        model, tokenizer, database = load_for_generation(checkpoint, db, device=device)
        path = Path(checkpoint).resolve()
        name = f"{path.parent.name}/{path.name}" if path.name == "final" else path.name
        return cls(model, tokenizer, database, name=name, speculative=speculative)

    def try_reserve(self, limit: int) -> bool:
        with self._count_lock:
            if self.pending >= limit:
                return False
            self.pending += 1
            return True

    def release(self) -> None:
        with self._count_lock:
            self.pending -= 1

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _error_body(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind}}


def _validation_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        where = ".".join(str(p) for p in e.get("loc", ())) or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 4:
        raise _HTTPError(400, f"stop: at most 4 stop strings, got {len(stops)}")
    if any(len(s) > 128 or not s for s in stops):
        raise _HTTPError(400, "stop: each stop string must have 1 to 128 characters")
    return stops


def _held_back(text: str, stops: list[str]) -> str:
    """The part of `text` safe to stream: drop an incomplete UTF-8 tail and any stop-string prefix."""
    for s in stops:
        cut = text.find(s)
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


def create_app(
    checkpoint: str | Path | None = None,
    db: str | Path | None = None,
    limits: ServeLimits | None = None,
    *,
    engine: Engine | None = None,
    device: str = "cpu",
    speculative: bool = False,
):
    """The FastAPI app; loads the checkpoint (and database) once, or uses a given `engine`."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or ServeLimits()
    if engine is None:
        if checkpoint is None:
            raise RetrolmError("create_app needs a checkpoint directory or an engine")
        engine = Engine.load(checkpoint, db, device=device, speculative=speculative)
    app = FastAPI(title="retrolm", version="1")
    app.state.engine = engine
    app.state.limits = limits

    @app.exception_handler(_HTTPError)
    async def _on_error(_: Request, err: _HTTPError) -> JSONResponse:
        return JSONResponse(_error_body(err.message, err.kind), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(_error_body(str(err.detail), "invalid_request_error"), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        message = f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg', 'invalid request')}"
        return JSONResponse(_error_body(message, "invalid_request_error"), status_code=400)

    async def read_json(request: Request, schema: type[BaseModel]) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise _HTTPError(413, f"request body over {limits.max_body_bytes} bytes")
        body = b""
        async for part in request.stream():
            body += part
            if len(body) > limits.max_body_bytes:
                raise _HTTPError(413, f"request body over {limits.max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _HTTPError(400, f"body is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise _HTTPError(400, "body must be a JSON object")
        try:
            return schema.model_validate(data)
        except ValidationError as err:
            raise _HTTPError(400, _validation_message(err)) from None

    async def run_in_worker(fn: Any) -> Any:
        if not engine.try_reserve(limits.max_pending):
            raise _HTTPError(503, "server busy: too many requests in flight; retry later", "server_busy")
        try:
            return await asyncio.wrap_future(engine.executor.submit(fn))
        finally:
            engine.release()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": engine.name,
            "kind": engine.kind,
            "database": str(engine.db.path) if engine.db is not None else None,
            "pending": engine.pending,
            "limits": limits.__dict__,
        }

    @app.post("/v1/retrieve")
    async def retrieve(request: Request) -> dict[str, Any]:
        req = await read_json(request, RetrieveRequest)
        if engine.db is None:
            raise _HTTPError(400, "this server has no database; start it with --db")
        if req.k > limits.max_retrieve_k:
            raise _HTTPError(400, f"k: at most {limits.max_retrieve_k}, got {req.k}")
        if len(req.text) > 20 * limits.max_prompt_tokens:
            raise _HTTPError(400, f"text: longer than {20 * limits.max_prompt_tokens} characters")
        hits = await run_in_worker(lambda: engine.db.search(req.text, req.k))
        return {"object": "list", "data": hits}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        from retrolm.generation.decode import encode_prompt, generate

        req = await read_json(request, CompletionRequest)
        stops = _stop_list(req.stop)
        if req.max_tokens > limits.max_tokens:
            raise _HTTPError(400, f"max_tokens: at most {limits.max_tokens}, got {req.max_tokens}")
        if len(req.prompt) > 20 * limits.max_prompt_tokens:  # cheap guard before tokenising
            raise _HTTPError(400, f"prompt: longer than {20 * limits.max_prompt_tokens} characters")
        prompt_ids = encode_prompt(engine.tokenizer, req.prompt)
        if len(prompt_ids) > limits.max_prompt_tokens:
            raise _HTTPError(
                400, f"prompt: {len(prompt_ids)} tokens, the limit is {limits.max_prompt_tokens}"
            )
        greedy = req.temperature == 0.0
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        cancelled = threading.Event()

        def job(on_step: Any = None) -> Any:
            def step(i: int, ids: list[int]) -> None:
                if cancelled.is_set():
                    raise _Cancelled
                if on_step is not None:
                    on_step(list(ids))

            try:
                return generate(
                    engine.model, engine.tokenizer, req.prompt, db=engine.db,
                    prompt_ids=[prompt_ids], max_new_tokens=req.max_tokens, greedy=greedy,
                    temperature=req.temperature if not greedy else 1.0,
                    top_k=req.top_k, top_p=req.top_p, repetition_penalty=req.repetition_penalty,
                    stop=stops, seed=req.seed or 0, speculative=engine.speculative and greedy,
                    return_retrieval=req.return_retrieval, on_step=step,
                )[0]  # fmt: skip
            except RetrolmError as err:
                raise _HTTPError(400, str(err)) from None

        def body(res: Any) -> dict[str, Any]:
            out = {
                "id": rid, "object": "text_completion", "created": created, "model": engine.name,
                "choices": [{"text": res.text, "index": 0, "logprobs": None,
                             "finish_reason": "length" if res.finish_reason == "length" else "stop"}],
                "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(res.token_ids),
                          "total_tokens": len(prompt_ids) + len(res.token_ids)},
            }  # fmt: skip
            if req.return_retrieval:
                out["retrieval"] = [
                    {"chunk_index": r.chunk_index, "query": r.query, "neighbours": r.neighbours}
                    for r in res.retrieval
                ]
            return out

        if not req.stream:
            return body(await run_in_worker(job))

        if not engine.try_reserve(limits.max_pending):
            raise _HTTPError(503, "server busy: too many requests in flight; retry later", "server_busy")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def push(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def stream_job() -> None:
            try:
                push(("done", job(lambda ids: push(("ids", ids)))))
            except _Cancelled:
                push(("cancelled", None))
            except _HTTPError as err:
                push(("error", err.message))
            except Exception as err:  # a bug: report it in the stream instead of hanging
                push(("error", f"internal error: {type(err).__name__}: {err}"))
            finally:
                engine.release()

        engine.executor.submit(stream_job)

        def event(text: str, finish: str | None) -> str:
            chunk = {
                "id": rid, "object": "text_completion", "created": created, "model": engine.name,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            }  # fmt: skip
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

        async def events():
            sent = ""
            try:
                while True:
                    kind, item = await queue.get()
                    if kind == "ids":
                        safe = _held_back(engine.tokenizer.decode(item), stops)
                        if len(safe) > len(sent) and safe.startswith(sent):
                            yield event(safe[len(sent) :], None)
                            sent = safe
                    elif kind == "done":
                        final = item.text
                        rest = final[len(sent) :] if final.startswith(sent) else ""
                        reason = "length" if item.finish_reason == "length" else "stop"
                        yield event(rest, reason)
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        if kind == "error":
                            err = _error_body(str(item), "server_error")
                            yield f"data: {json.dumps(err)}\n\n"
                        yield "data: [DONE]\n\n"
                        return
            finally:
                cancelled.set()  # the client left (or we finished): stop generating

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return app

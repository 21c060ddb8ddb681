"""`POST /v1/completions` with `stream: true`: server-sent events.

Each event is `data: {...}\\n\\n` in the completions shape with the new piece of one
choice's text (`index` says which), `finish_reason` null until that choice's last event;
then, with `stream_options.include_usage`, one event with empty `choices` and the usage;
then `data: [DONE]\\n\\n`. A piece never holds an incomplete UTF-8 character or the start
of a stop string that might still complete. With `logprobs`, each event carries the
log-probs of the tokens its text completes. The worker builds the events (it owns the
decoding state); the event loop only forwards them. A client that disconnects stops its
generation at the next token.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from fastapi.responses import StreamingResponse

from retrolm.generation.decode import safe_to_stream
from retrolm.serve.body import ApiError, error_body
from retrolm.serve.completions import (
    Plan,
    finish_reason,
    generate_choices,
    reported_range,
    usage,
)
from retrolm.serve.engine import ClientGone, Engine, ServeLimits
from retrolm.serve.logprobs import TokenLogprobs


class ChoiceStream:
    """One choice's streaming state: the text sent so far and the tokens reported."""

    def __init__(self, engine: Engine, plan: Plan, prompt: list[int]) -> None:
        self.engine, self.plan = engine, plan
        self.sent = ""
        self.n_prompt = len(prompt)
        self.reported = 0 if plan.echo else self.n_prompt
        self.scores = TokenLogprobs(engine, plan.logprobs) if plan.logprobs is not None else None
        if self.scores is not None:
            self.scores.feed(prompt)

    def _block(self, hi: int) -> dict[str, Any] | None:
        lo, self.reported = self.reported, max(self.reported, hi)
        return self.scores.block(lo, hi) if self.scores is not None else None

    def echo(self, text: str) -> tuple[str, dict[str, Any] | None]:
        """The prompt's text (and log-probs), sent first when echoing."""
        return text, self._block(self.n_prompt)

    def advance(self, ids: list[int]) -> tuple[str, dict[str, Any] | None] | None:
        """The new safe piece of text after `ids` (the completion so far), or None."""
        scores = self.scores
        if scores is not None:
            scores.feed(ids[len(scores.ids) - self.n_prompt :])
        safe = safe_to_stream(self.engine.tokenizer.decode(ids), self.plan.stops)
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return None
        piece, self.sent = safe[len(self.sent) :], safe
        if scores is None:
            return piece, None
        end, hi = scores.offsets[self.n_prompt] + len(safe), self.reported
        while hi + 1 < len(scores.ids) and scores.offsets[hi + 1] <= end:
            hi += 1  # tokens wholly inside the sent text
        return piece, self._block(hi)

    def finish(self, result: Any) -> tuple[str, dict[str, Any] | None, str]:
        """The rest of the text, its log-probs and the finish reason."""
        if self.scores is not None and result.finish_reason == "eos":
            self.scores.feed([self.engine.tokenizer.eos_id])
        rest = result.text[len(self.sent) :] if result.text.startswith(self.sent) else ""
        hi = reported_range(self.scores, self.plan, result)[1] if self.scores is not None else 0
        return rest, self._block(hi), finish_reason(result)


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def chunk(engine: Engine, plan: Plan, index: int, text: str, logprobs: dict[str, Any] | None,
          finish: str | None) -> str:
    choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}
    return sse({"id": plan.rid, "object": "text_completion", "created": plan.created,
                "model": engine.name, "choices": [choice]})  # fmt: skip


def stream_job(engine: Engine, plan: Plan, cancelled: threading.Event, push: Any) -> None:
    """Generate on the worker, pushing ready SSE strings; always ends with a None."""
    try:
        streams = [ChoiceStream(engine, plan, plan.prompts[p]) for p in plan.owners]
        if plan.echo:
            for c, p in enumerate(plan.owners):
                push(chunk(engine, plan, c, *streams[c].echo(plan.texts[p]), None))

        def on_step(c: int, ids: list[int]) -> None:
            got = streams[c].advance(list(ids))
            if got is not None:
                push(chunk(engine, plan, c, *got, None))

        results = generate_choices(engine, plan, cancelled, on_step)
        for c, res in enumerate(results):
            push(chunk(engine, plan, c, *streams[c].finish(res)))
        if plan.include_usage:
            push(sse({"id": plan.rid, "object": "text_completion", "created": plan.created,
                      "model": engine.name, "choices": [], "usage": usage(plan, results)}))  # fmt: skip
    except ClientGone:
        pass
    except ApiError as err:
        push(sse(error_body(err.message, err.kind)))
    except Exception as err:  # a bug: say so in the stream instead of hanging the client
        push(sse(error_body(f"internal error: {type(err).__name__}: {err}", "server_error")))
    finally:
        push(None)


def stream_completion(engine: Engine, limits: ServeLimits, plan: Plan) -> StreamingResponse:
    """Queue the generation (429 before any byte is sent when full) and stream its events."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    cancelled = threading.Event()

    def push(item: str | None) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    engine.submit(lambda: stream_job(engine, plan, cancelled, push), cancelled, limits.max_pending)

    async def events():
        try:
            while (item := await queue.get()) is not None:
                yield item
            yield "data: [DONE]\n\n"
        finally:
            cancelled.set()  # the client left (or we finished): stop generating

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})

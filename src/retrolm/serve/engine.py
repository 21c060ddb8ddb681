"""The loaded model, tokenizer and database, and the one worker thread that runs them.

Every model and retriever call runs on one worker thread, so requests never share a
cache and the event loop stays free for parsing, /health and refusing work. The queue in
front of the worker is bounded (`max_pending`, queued + running): one more request gets
429 with Retry-After. Work whose client went away is skipped if it has not started and
stopped at the next token if it has (`cancelled` events, checked by the jobs).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from retrolm.checkpoints import FINAL
from retrolm.serve.body import ApiError

if TYPE_CHECKING:
    from retrolm.db.database import RetrievalDB
    from retrolm.model.retro import Retro
    from retrolm.tokenizer import Tokenizer

T = TypeVar("T")


@dataclass(frozen=True)
class ServeLimits:
    """Per-request and per-server limits (all configurable from `retrolm serve`)."""

    max_prompt_tokens: int = 1024
    max_tokens: int = 512
    max_body_bytes: int = 256 * 1024
    max_json_depth: int = 32
    max_pending: int = 64  # requests queued or running; more get 429
    max_choices: int = 32  # prompts x n in one request
    max_logprobs: int = 20
    max_retrieve_k: int = 32


class ClientGone(Exception):
    """The client disconnected; its job stops (raised in the worker or the handler)."""


class Engine:
    """The model (eval mode), its tokenizer, the database (RETRO) and the worker thread."""

    def __init__(self, model: Retro, tokenizer: Tokenizer, db: RetrievalDB | None = None, name: str = "retrolm",
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
             speculative: bool = False, name: str | None = None) -> Engine:
        """Load a checkpoint (+ database); `name` defaults to the checkpoint directory's name."""
        from retrolm.generation.decode import load_for_generation

        model, tokenizer, database = load_for_generation(checkpoint, db, device=device)
        return cls(model, tokenizer, database, name=name or default_model_name(checkpoint),
                   speculative=speculative)

    def submit(self, job: Callable[[], T], cancelled: threading.Event, limit: int) -> Future[T]:
        """Queue `job` on the worker; 429 when `limit` jobs are queued or running already.

        A job whose `cancelled` is set before it starts is skipped (raises ClientGone).
        """
        with self._count_lock:
            if self.pending >= limit:
                raise ApiError(429, f"server busy: {limit} requests queued or running; retry later",
                               "server_busy", headers={"Retry-After": "1"})
            self.pending += 1

        def guarded() -> T:
            if cancelled.is_set():
                raise ClientGone
            return job()

        future = self.executor.submit(guarded)
        future.add_done_callback(self._release)
        return future

    async def run(self, job: Callable[[], T], cancelled: threading.Event, limit: int,
                  disconnected: Callable[[], Any] | None = None) -> T:
        """Run `job` on the worker and await it; stop it if `disconnected()` finishes first."""
        future = asyncio.wrap_future(self.submit(job, cancelled, limit))
        if disconnected is None:
            return await future
        watcher = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({future, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if future in done:
            return future.result()
        cancelled.set()
        future.cancel()  # a queued job is dropped; a running one stops at its next token
        raise ClientGone

    def _release(self, _: Future) -> None:
        with self._count_lock:
            self.pending -= 1

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def default_model_name(checkpoint: str | Path) -> str:
    """`<run>/final` -> "<run>/final" (a bare "final" says nothing); else the directory's name."""
    path = Path(checkpoint).resolve()
    return f"{path.parent.name}/{path.name}" if path.name == FINAL else path.name

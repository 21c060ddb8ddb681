"""The small endpoints: health, models, retrieval and the tokenizer.

`/tokenize`, `/detokenize` and `/tokenizer_info` follow vLLM's shapes, which is what
lm-evaluation-harness's `tokenizer_backend=remote` (and its auto-detection) reads, so a
client can count tokens exactly as the model does without a copy of the tokenizer.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from fastapi import Request

from retrolm.serve.body import ApiError, read_json
from retrolm.serve.schemas import DetokenizeRequest, RetrieveRequest, TokenizeRequest

STARTED = int(time.time())


async def health(request: Request) -> dict[str, Any]:
    """GET /health."""
    engine, limits = request.app.state.engine, request.app.state.limits
    return {
        "status": "ok",
        "model": engine.name,
        "kind": engine.kind,
        "database": str(engine.db.path) if engine.db is not None else None,
        "pending": engine.pending,
        "limits": limits.__dict__,
    }


def model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": STARTED, "owned_by": "retrolm"}


async def list_models(request: Request) -> dict[str, Any]:
    """GET /v1/models: the one served model."""
    return {"object": "list", "data": [model_card(request.app.state.engine.name)]}


async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    """GET /v1/models/{id}."""
    name = request.app.state.engine.name
    if model_id != name:
        raise ApiError(404, f"model {model_id!r} is not served here; this server has {name!r}",
                       "model_not_found")
    return model_card(name)


async def retrieve(request: Request) -> dict[str, Any]:
    """POST /v1/retrieve: the database's neighbours of a text."""
    engine, limits = request.app.state.engine, request.app.state.limits
    req = await read_json(request, RetrieveRequest, limits)
    if engine.db is None:
        raise ApiError(400, "this server has no database; start it with --db")
    if req.k > limits.max_retrieve_k:
        raise ApiError(400, f"k: at most {limits.max_retrieve_k}, got {req.k}")
    if len(req.text) > 20 * limits.max_prompt_tokens:
        raise ApiError(400, f"text: longer than {20 * limits.max_prompt_tokens} characters")
    hits = await engine.run(lambda: engine.db.search(req.text, req.k), threading.Event(),
                            limits.max_pending)
    return {"object": "list", "data": hits}


async def tokenize(request: Request) -> dict[str, Any]:
    """POST /tokenize: {"prompt"} -> {"tokens", "count", "max_model_len"}."""
    engine, limits = request.app.state.engine, request.app.state.limits
    req = await read_json(request, TokenizeRequest, limits)
    tokens = engine.tokenizer.encode(req.prompt)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": limits.max_prompt_tokens}


async def detokenize(request: Request) -> dict[str, Any]:
    """POST /detokenize: {"tokens"} -> {"prompt"}."""
    engine, limits = request.app.state.engine, request.app.state.limits
    req = await read_json(request, DetokenizeRequest, limits)
    vocab = engine.tokenizer.vocab_size
    if any(t < 0 or t >= vocab for t in req.tokens):
        raise ApiError(400, f"tokens: token ids must be in 0..{vocab - 1}")
    return {"prompt": engine.tokenizer.decode(req.tokens)}


async def tokenizer_info(request: Request) -> dict[str, Any]:
    """GET /tokenizer_info: the special tokens (no BOS: documents are separated by EOS)."""
    engine, limits = request.app.state.engine, request.app.state.limits
    inner = getattr(engine.tokenizer, "inner", None)
    name = (lambda i: inner.id_to_token(i)) if inner is not None else (lambda i: None)
    return {"eos_token": name(engine.tokenizer.eos_id), "bos_token": None,
            "pad_token": name(engine.tokenizer.pad_id), "tokenizer_class": "retrolm.Tokenizer",
            "model_max_length": limits.max_prompt_tokens}  # fmt: skip

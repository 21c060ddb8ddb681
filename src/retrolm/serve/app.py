"""`create_app`: the FastAPI app, its route table and its error handlers.

The model and the database are loaded once; every handler finds them on `app.state`
(`engine`, `limits`). Every error is JSON `{"error": {"message", "type"}}` with a 4xx
status for anything a client sent, never a 500.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from retrolm.errors import RetrolmError
from retrolm.serve import routes
from retrolm.serve.body import ApiError, error_body
from retrolm.serve.completions import completions
from retrolm.serve.engine import ClientGone, Engine, ServeLimits

ROUTES = [
    ("/health", "GET", routes.health),
    ("/v1/models", "GET", routes.list_models),
    ("/v1/models/{model_id:path}", "GET", routes.get_model),
    ("/v1/completions", "POST", completions),
    ("/v1/retrieve", "POST", routes.retrieve),
    ("/tokenize", "POST", routes.tokenize),
    ("/detokenize", "POST", routes.detokenize),
    ("/tokenizer_info", "GET", routes.tokenizer_info),
]


async def on_api_error(_: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(error_body(err.message, err.kind), status_code=err.status, headers=err.headers)


async def on_http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(str(err.detail), "invalid_request_error"), status_code=err.status_code)


async def on_validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0] if err.errors() else {}
    message = f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg', 'invalid request')}"
    return JSONResponse(error_body(message, "invalid_request_error"), status_code=400)


async def on_bug(_: Request, err: Exception) -> JSONResponse:
    """A bug still answers in the API's error shape (and uvicorn logs the traceback)."""
    return JSONResponse(error_body(f"internal error: {type(err).__name__}", "server_error"), status_code=500)


async def on_client_gone(_: Request, __: ClientGone) -> Response:
    return Response(status_code=499)  # nobody reads it: the client has gone


def create_app(
    checkpoint: str | Path | None = None,
    db: str | Path | None = None,
    limits: ServeLimits | None = None,
    *,
    engine: Engine | None = None,
    device: str = "cpu",
    speculative: bool = False,
    model_name: str | None = None,
) -> FastAPI:
    """The FastAPI app; loads the checkpoint (and database) once, or uses a given `engine`."""
    if engine is None:
        if checkpoint is None:
            raise RetrolmError("create_app needs a checkpoint directory or an engine")
        engine = Engine.load(checkpoint, db, device=device, speculative=speculative, name=model_name)
    app = FastAPI(title="retrolm", version="1")
    app.state.engine = engine
    app.state.limits = limits or ServeLimits()
    for path, method, handler in ROUTES:
        app.add_api_route(path, handler, methods=[method])
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ClientGone, on_client_gone)
    app.add_exception_handler(Exception, on_bug)
    return app

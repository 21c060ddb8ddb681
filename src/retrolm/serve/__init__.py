"""HTTP server: an OpenAI-compatible subset over `retrolm.generation` (FastAPI).

| module | holds |
|---|---|
| `app.py` | `create_app()`: the route table and the error handlers |
| `engine.py` | `Engine` (model, tokenizer, database, the one worker thread, the bounded queue), `ServeLimits` |
| `body.py` | reading a request body: size and nesting limits, strict schemas, `ApiError` |
| `schemas.py` | the request bodies (pydantic) |
| `completions.py` | `POST /v1/completions` (plain answers) |
| `streaming.py` | `POST /v1/completions` with `stream: true` (server-sent events) |
| `logprobs.py` | token log-probabilities and text offsets (`logprobs`, `echo`) |
| `routes.py` | `/health`, `/v1/models`, `/v1/retrieve`, `/tokenize`, `/detokenize`, `/tokenizer_info` |

docs/serving.md describes the API, the limits and the figures.
"""

from retrolm.serve.app import create_app
from retrolm.serve.engine import Engine, ServeLimits

__all__ = ["Engine", "ServeLimits", "create_app"]

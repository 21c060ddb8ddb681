"""Reading a request body: size and nesting limits first, then JSON, then a strict schema.

Every failure is an `ApiError` with a one-line message and a 4xx status, never a 500:
bodies over the size limit get 413, JSON nested deeper than the limit (checked on the raw
bytes before parsing, so a 5,000-level `stop` cannot reach Python's recursion limit),
malformed JSON, non-objects and schema violations get 400.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type"}}` with `status` (and headers)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


def error_body(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind}}


def json_depth(body: bytes) -> int:
    """Deepest nesting of arrays/objects in `body` (brackets inside strings do not count)."""
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


async def read_body(request: Any, max_bytes: int) -> bytes:
    """The raw body, refused with 413 as soon as it passes `max_bytes` (declared or sent)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"request body over {max_bytes} bytes")
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > max_bytes:
            raise ApiError(413, f"request body over {max_bytes} bytes")
    return body


def parse_json(body: bytes, schema: type[M], max_depth: int) -> M:
    """Body bytes -> a validated `schema` instance, or ApiError(400)."""
    depth = json_depth(body)
    if depth > max_depth:
        raise ApiError(400, f"body is nested {depth} levels deep; the limit is {max_depth}")
    try:
        data = json.loads(body)
    except ValueError as err:  # bad JSON or UTF-8, or an integer of over 4,300 digits
        raise ApiError(400, f"body is not valid JSON: {err}") from None
    except RecursionError:  # unreachable below the depth limit; kept as a last guard
        raise ApiError(400, "body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "body must be a JSON object")
    check_unicode(data)
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise ApiError(400, validation_message(err)) from None


def check_unicode(value: Any) -> None:
    """400 for a string holding a lone UTF-16 surrogate ("\\ud800"): not text, and the
    tokenizer cannot encode it. Recursion is bounded by the depth limit."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "body holds a lone UTF-16 surrogate; send valid Unicode") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(key)
            check_unicode(item)
    elif isinstance(value, list):
        for item in value:
            check_unicode(item)


async def read_json(request: Any, schema: type[M], limits: Any) -> M:
    """Read and validate a JSON body under `limits` (max_body_bytes, max_json_depth)."""
    body = await read_body(request, limits.max_body_bytes)
    return parse_json(body, schema, limits.max_json_depth)


def validation_message(err: ValidationError) -> str:
    """Up to 3 problems as `field: message`, on one line."""
    parts = []
    for e in err.errors()[:3]:
        where = ".".join(str(p) for p in e.get("loc", ())) or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts).replace("\n", " ")

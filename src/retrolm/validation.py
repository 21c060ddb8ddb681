"""Type checks for the settings dataclasses (RetroConfig, TrainConfig, RetrofitConfig).

Values read from JSON or passed from Python arrive unchecked; a wrong type (`dropout: "0.1"`,
`tie_embeddings: "no"`) must fail at once as one line naming the field, not as a traceback
at step 1 or, worse, be saved. Imports nothing heavy: the CLI builds its options from these
dataclasses before any command runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from typing import Any

from retrolm.errors import RetrolmError


def _type_ok(value: Any, hint: Any) -> bool:
    """Does `value` fit the annotation `hint` (int, float, bool, str, list[X], dict, X | None)?"""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # bool is an int subclass, but True is not a size
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return not isinstance(hint, type) or isinstance(value, hint)


def _describe(hint: Any) -> str:
    """'an integer', 'a number or null', ... for error messages."""
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    if typing.get_origin(hint) is dict:
        return "an object"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_field_types(obj: Any, what: str) -> None:
    """Raise a one-line RetrolmError naming the first field of dataclass `obj` whose value
    does not have its annotated type (e.g. `dropout: "0.1"` read from a JSON file)."""
    hints = _field_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _type_ok(value, hints[f.name]):
            raise RetrolmError(f"{what}: {f.name} must be {_describe(hints[f.name])}, got {value!r}")
    for f in dataclasses.fields(obj):  # NaN and infinity pass isinstance but no range check
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise RetrolmError(f"{what}: {f.name} must be a finite number, got {value!r}")

"""Typer options generated from a settings dataclass, so each option is declared once.

A field becomes `--field-name` with its default and `metadata["help"]`; a field without a
default is a required option; a bool is a `--name/--no-name` flag. Metadata keys:

- `help`:   the help text (required: every option says what it does);
- `option`: the option name when it is not `--field-name`;
- `parse`:  a function from the command-line string to the field's value, for types
  Typer cannot read itself (e.g. "98,1,1" -> (98, 1, 1)); the option then takes a
  string whose default is `format` of the field default (default: comma-joined items
  for a tuple or list, else `str`).

`with_dataclass_options(Settings, "settings")` turns `def cmd(settings: Settings, out: Path
= typer.Option(...))` into a Typer command whose options are `out` plus one per field;
the command receives the constructed dataclass.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from typing import Any

import typer


def _format(value: Any) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)


def _option_name(field: dataclasses.Field) -> str:
    return field.metadata.get("option") or "--" + field.name.replace("_", "-")


def _has_default(field: dataclasses.Field) -> bool:
    return field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING


def _default(field: dataclasses.Field) -> Any:
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]


def option_parameter(field: dataclasses.Field, annotation: Any) -> inspect.Parameter:
    """The keyword-only parameter (annotation + typer.Option default) for one field."""
    if "help" not in field.metadata:
        raise TypeError(f"field {field.name!r} has no metadata['help']")
    name, help_text = _option_name(field), field.metadata["help"]
    required = not _has_default(field)
    if "parse" in field.metadata:
        annotation = str
        text = ... if required else field.metadata.get("format", _format)(_default(field))
        default = typer.Option(text, name, help=help_text)
    elif annotation is bool:
        flag = f"{name}/--no-{name[2:]}"
        default = typer.Option(... if required else _default(field), flag, help=help_text)
    else:
        default = typer.Option(... if required else _default(field), name, help=help_text)
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def options_from_dataclass(cls: type, exclude: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One Typer option parameter per field of dataclass `cls` (minus `exclude`)."""
    hints = typing.get_type_hints(cls)
    return [option_parameter(f, hints[f.name]) for f in dataclasses.fields(cls) if f.name not in exclude]


def dataclass_from_options(cls: type, values: dict[str, Any]) -> Any:
    """Build `cls` from command-line values (fields with a `parse` arrive as strings)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        if "parse" in f.metadata:
            value = f.metadata["parse"](value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _resolved(fn: Callable, param: inspect.Parameter) -> inspect.Parameter:
    """`param` with a string annotation (from __future__ annotations) evaluated in fn's module."""
    if isinstance(param.annotation, str):
        return param.replace(annotation=eval(param.annotation, fn.__globals__))  # noqa: S307 - source annotations
    return param


def with_dataclass_options(cls: type, into: str, exclude: tuple[str, ...] = ()) -> Callable:
    """Decorator: replace parameter `into` of a command by one option per field of `cls`."""

    def decorate(fn: Callable) -> Callable:
        own = [_resolved(fn, p) for p in inspect.signature(fn).parameters.values() if p.name != into]
        generated = options_from_dataclass(cls, exclude)
        clash = {p.name for p in own} & {p.name for p in generated}
        if clash:
            raise TypeError(f"{fn.__name__}: parameters {sorted(clash)} are also fields of {cls.__name__}")
        field_names = {p.name for p in generated}

        def command(**kwargs: Any) -> Any:
            fields = {k: kwargs.pop(k) for k in list(kwargs) if k in field_names}
            return fn(**kwargs, **{into: dataclass_from_options(cls, fields)})

        params = generated + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__name__ = fn.__name__
        command.__doc__ = fn.__doc__
        return command

    return decorate

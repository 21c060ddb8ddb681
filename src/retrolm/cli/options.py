"""Command-line options generated from a settings dataclass, so each setting is declared once.

A field becomes `--field-name` with its default and `metadata["help"]`; a field without a
default is a required option; a bool is a `--name/--no-name` flag. Metadata keys:

- `help`:  the help text (required: every option says what it does);
- `option`: the option name (without `--`) when it is not `--field-name`;
- `aliases`: older option names (without `--`) still accepted;
- `parse`: a function from the command-line string to the field's value, for types Typer
  cannot read itself (e.g. "6,9,12" -> [6, 9, 12]); the option then takes a string, its
  default shown with `format` (default: items comma-joined, else `str`);
- `cli`: False keeps the field off the command line (it keeps its default).

`with_dataclass_options(TrainConfig, "cfg")` turns `def cmd(out: Path = typer.Option(...),
cfg: TrainConfig = None)` into a Typer command whose options are `out` plus one per field;
the command receives the constructed (and so validated) dataclass as `cfg`.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Iterable
from typing import Any

import typer


def _format(value: Any) -> str:
    """How a parsed option's default is shown: items comma-joined ("98,1,1"), else str."""
    return ",".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)


def _option_name(field: dataclasses.Field) -> str:
    return "--" + field.metadata.get("option", field.name.replace("_", "-"))


def _aliases(field: dataclasses.Field) -> list[str]:
    """Older spellings still accepted (e.g. --neighbors for --neighbours)."""
    return ["--" + a for a in field.metadata.get("aliases", ())]


def _default(field: dataclasses.Field) -> Any:
    """The field's default, or `...` (Typer's "required") when it has none."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return ...


def _cli_fields(cls: type, exclude: Iterable[str]) -> list[dataclasses.Field]:
    skip = set(exclude)
    unknown = skip - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    return [f for f in dataclasses.fields(cls) if f.name not in skip and f.metadata.get("cli", True)]


def option_parameter(field: dataclasses.Field, annotation: Any) -> inspect.Parameter:
    """The keyword-only parameter (annotation + typer.Option default) for one field."""
    help_text = field.metadata.get("help")
    if not help_text:
        raise TypeError(f"field {field.name!r} has no metadata['help'] for its command-line option")
    name, default = _option_name(field), _default(field)
    if "parse" in field.metadata:
        shown = field.metadata.get("format", _format)(default) if default not in (None, ...) else False
        annotation, default = str | None, (... if default is ... else None)
        info = typer.Option(default, name, *_aliases(field), help=help_text, show_default=shown)
    elif annotation is bool:
        info = typer.Option(default, f"{name}/--no-{name[2:]}", help=help_text)
    else:
        info = typer.Option(default, name, *_aliases(field), help=help_text, show_default=default is not None)
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


def options_from_dataclass(cls: type, exclude: Iterable[str] = ()) -> list[inspect.Parameter]:
    """One Typer option parameter per field of dataclass `cls` (minus `exclude`)."""
    hints = typing.get_type_hints(cls)
    return [option_parameter(f, hints[f.name]) for f in _cli_fields(cls, exclude)]


def dataclass_from_options(cls: type, values: dict[str, Any]) -> Any:
    """Build `cls` from command-line values: parse string fields; unset ones keep the default."""
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in values:
            continue
        value = values[field.name]
        if "parse" in field.metadata:
            if value is None:
                continue
            value = field.metadata["parse"](value)
        kwargs[field.name] = value
    return cls(**kwargs)


def _resolved(func: Callable[..., Any], param: inspect.Parameter) -> inspect.Parameter:
    """`param` with a string annotation (from `__future__` annotations) evaluated in func's
    module; the dataclass parameter itself is never evaluated, so it may be a local class."""
    if isinstance(param.annotation, str):
        return param.replace(annotation=eval(param.annotation, func.__globals__))  # noqa: S307
    return param


def _required(param: inspect.Parameter) -> bool:
    return getattr(param.default, "default", None) is ...


def with_dataclass_options(
    cls: type, into: str, exclude: Iterable[str] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: replace parameter `into` of a command by one option per field of `cls`."""
    generated = options_from_dataclass(cls, exclude)
    field_names = {p.name for p in generated}

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        own = [_resolved(func, p) for p in inspect.signature(func).parameters.values() if p.name != into]
        clash = field_names & {p.name for p in own}
        if clash:
            raise TypeError(f"{func.__name__}: parameters {sorted(clash)} are also fields of {cls.__name__}")

        def command(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in field_names}
            return func(**kwargs, **{into: dataclass_from_options(cls, values)})

        mine = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        # required options first (help and "missing option" errors list them first)
        params = sorted(generated + mine, key=lambda p: not _required(p))
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__name__, command.__doc__ = func.__name__, func.__doc__
        command.__module__ = func.__module__
        return command

    return decorate


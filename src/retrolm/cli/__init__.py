"""The `retrolm` command line: one Typer app, one module per sub-command group.

Each entry of `COMMAND_MODULES` is a module under `retrolm.cli` exposing
`register(app: typer.Typer) -> None`; the module stays thin and calls into the library.
Heavy imports (torch, FAISS, the encoder) happen inside the command functions so that
`retrolm --help` is fast.
"""

from __future__ import annotations

import importlib
import sys

import typer

from retrolm.errors import RetrolmError

COMMAND_MODULES: tuple[str, ...] = (
    "db",
    "train",
    "generate",
    "serve",
    "eval",
    "demo",
    "retrofit",
    "qa",
)

app = typer.Typer(
    name="retrolm",
    help="Retrieval-enhanced language models: build a retrieval database, train RETRO and GPT, "
    "evaluate them honestly.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"retrolm.cli.{name}").register(app)


_register_all()


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a `RetrolmError` becomes one line on stderr and a non-zero exit."""
    try:
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool) and code:
            # non-standalone Typer returns exit codes instead of exiting: Ctrl-C inside a
            # command comes back as 130 here
            if code == 130:
                print("interrupted", file=sys.stderr)
            sys.exit(code)
    except RetrolmError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # click usage errors arrive here in non-standalone mode
        if _is_click(err, "ClickException"):
            err.show()  # type: ignore[attr-defined]
            sys.exit(err.exit_code)  # type: ignore[attr-defined]
        if _is_click(err, "Exit"):
            sys.exit(err.exit_code)  # type: ignore[attr-defined]
        raise


def _is_click(err: BaseException, name: str) -> bool:
    """Is `err` a click `name` exception, from click itself or the copy newer Typer vendors?"""
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(err, cls):
            return True
    return False

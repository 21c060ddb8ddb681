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
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: flags as `--x / --no-x`, not `<bool>`
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        from retrolm import __version__

        typer.echo(f"retrolm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", is_eager=True, callback=_print_version
    ),
) -> None:
    """Retrieval-enhanced language models: build a retrieval database, train RETRO and GPT,
    evaluate them honestly."""


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"retrolm.cli.{name}").register(app)


_register_all()


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. A `RetrolmError` becomes one line on stderr and a non-zero exit; Ctrl-C
    exits 130 with one line (the interrupted command's message, e.g. where to resume)."""
    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else list(argv)
    try:  # not app(...): Typer would turn Ctrl-C into a return value, i.e. exit status 0
        with command.make_context("retrolm", args) as ctx:
            command.invoke(ctx)
    except KeyboardInterrupt as err:
        print(str(err) or "interrupted", file=sys.stderr)
        sys.exit(130)
    except RetrolmError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except Exception as err:  # click's usage errors, --help / --version exits, aborted prompts
        if _is_click(err, "ClickException"):
            err.show()  # type: ignore[attr-defined]
            sys.exit(err.exit_code)  # type: ignore[attr-defined]
        if _is_click(err, "Exit"):
            if err.exit_code:  # type: ignore[attr-defined]
                sys.exit(err.exit_code)  # type: ignore[attr-defined]
            return
        if _is_click(err, "Abort"):
            print("aborted", file=sys.stderr)
            sys.exit(130)
        raise


def _is_click(err: BaseException, name: str) -> bool:
    """Is `err` a click `name` exception, from click itself, the copy newer Typer vendors, or
    Typer's own (`typer.Exit`, `typer.Abort`)?"""
    for module in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(err, cls):
            return True
    return False

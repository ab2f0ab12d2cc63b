"""The ``qpm`` command line. Thin: parse, call one library function per command, format the result.

Each command lives in ``qpmcli/commands/<name>.py`` with a ``register(app)`` function; this module imports no heavy
library so that ``qpm --help`` stays fast (no torch).
"""

from __future__ import annotations

import importlib
import sys

import typer

from qpmcli.errors import QpmError

# Command modules, in the order `qpm --help` lists them.
COMMAND_MODULES = [
    "plugins",
    "config",
    "data",
    "extract",
    "train",
    "select",
    "evaluate",
    "explain",
    "export",
    "predict",
    "serve",
    "demo",
    "runs",
    "doctor",
]

app = typer.Typer(
    name="qpm",
    help="Globally interpretable image classifiers on frozen vision foundation models (DINO-QPM).",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion; plugin names complete from the registry
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", help="Print the qpm version and exit."),
) -> None:
    if version:
        from qpmcli import __version__

        typer.echo(__version__)
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit()


for _name in COMMAND_MODULES:
    importlib.import_module(f"qpmcli.commands.{_name}").register(app)


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 2."""
    try:
        app(prog_name="qpm")
    except QpmError as exc:
        typer.secho("Error: " + " ".join(str(exc).split()), err=True, fg="red")  # one line, whatever it wraps
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except SystemExit as exc:  # Typer turns Ctrl-C into a silent exit 130 (Exit raised from the KeyboardInterrupt)
        if exc.code == 130 and _from_keyboard_interrupt(exc):
            _interrupted()
        raise


def _interrupted() -> None:
    typer.secho("Interrupted. Finished stages are kept; rerun the command (with --resume for train) to continue.",
                err=True, fg="yellow")
    sys.exit(130)


def _from_keyboard_interrupt(exc: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


if __name__ == "__main__":  # pragma: no cover
    main()

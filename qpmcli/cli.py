"""The ``qpm`` command line. Thin: parse, call one library function per command, format the result.

Each command lives in ``qpmcli/commands/<name>.py`` with a ``register(app)`` function; this module imports no heavy
library so that ``qpm --help`` stays fast (no torch).
"""

from __future__ import annotations

import errno
import importlib
import sys
from collections.abc import Sequence

import typer

from qpmcli.errors import QpmError
from qpmcli.options import name_placeholders

# Command modules, in the order `qpm --help` lists them.
COMMAND_MODULES = [
    "plugins",
    "config",
    "data",
    "extract",
    "train",
    "select",
    "evaluate",
    "name_features",
    "conformal",
    "explain",
    "export",
    "predict",
    "edit",
    "add_class",
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
name_placeholders(app)  # --help says RUN, CLASS, FILE, N ... instead of <str>, <int>


def run(argv: Sequence[str] | None = None) -> int:
    """Run ``qpm ARGV`` in this process and return its exit code; the one owner of the error -> exit-code mapping.

    User errors (:class:`QpmError`) are one line on stderr and their ``exit_code`` (2); so are the errors of the
    machine rather than of qpm (:data:`ENVIRONMENT_ERRNOS`: a full disk, a read-only or forbidden folder, a name
    beyond the system's limit); Ctrl-C says what was kept and gives 130; Click's usage errors keep Click's codes.
    Anything else is a bug and propagates with its traceback.
    ``argv`` defaults to ``sys.argv[1:]``. Tests call this directly (no new interpreter, no second torch import).
    """
    try:
        app(args=None if argv is None else [str(a) for a in argv], prog_name="qpm")
    except QpmError as exc:
        typer.secho("Error: " + " ".join(str(exc).split()), err=True, fg="red")  # one line, whatever it wraps
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        typer.secho("Error: " + " ".join(_os_error_line(exc).split()), err=True, fg="red")
        return 2
    except KeyboardInterrupt:
        return _interrupted()
    except SystemExit as exc:  # Click/Typer end every command with SystemExit
        if exc.code == 130 and _from_keyboard_interrupt(exc):  # Typer turns Ctrl-C into a silent exit 130
            return _interrupted()
        return _exit_code(exc.code)
    return 0


# OSError numbers that describe the machine, not a bug of qpm: reported as one line, exit 2 (never a traceback).
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG,
                                errno.ELOOP, errno.EMFILE, errno.ENFILE})


def _os_error_line(exc: OSError) -> str:
    """``<what went wrong>: <path>`` plus the fix for the common cases."""
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    what = exc.strerror or str(exc)
    hint = {errno.ENOSPC: "free space or choose another folder (cache_dir, --run-dir, --out)",
            errno.EDQUOT: "free space or choose another folder",
            errno.ENAMETOOLONG: "use a shorter path",
            errno.ELOOP: "a symbolic link points to itself; fix or remove it"}.get(exc.errno, "")
    if len(where) > 300:
        where = where[:140] + " ... " + where[-140:]
    return f"{what}: {where}" + (f"; {hint}" if hint else "") if where else what + (f"; {hint}" if hint else "")


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())


def _exit_code(code: object) -> int:
    """SystemExit's code as a process exit status: None is 0, a message is printed and gives 1 (as Python does)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    typer.echo(str(code), err=True)
    return 1


def _interrupted() -> int:
    typer.secho("Interrupted. Finished stages are kept; rerun the command (with --resume for train) to continue.",
                err=True, fg="yellow")
    return 130


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

"""Shared fixtures: the `qpm` CLI in an isolated home, in this process (``qpm``) or as a real process
(``qpm_process``, for the few end-to-end smoke tests marked ``e2e``)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def isolated_environ(root: Path) -> dict[str, str]:
    """The environment of a CLI call: clean config/cache homes under ``root``, no QPM_* from the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPM_")}
    env["XDG_CONFIG_HOME"] = str(root / "xdg-config")
    env["XDG_CACHE_HOME"] = str(root / "xdg-cache")
    env["HOME"] = str(root / "home")
    env["PYTHONUNBUFFERED"] = "1"
    (root / "home").mkdir(parents=True, exist_ok=True)
    return env


@pytest.fixture
def isolated_env(tmp_path: Path) -> dict[str, str]:
    """Environment for CLI calls: clean config/cache homes, no QPM_* leaking from the developer's shell."""
    return isolated_environ(tmp_path)


@dataclass
class CliResult:
    """What a CLI call left: the same fields as ``subprocess.CompletedProcess``."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    exception: BaseException | None = field(default=None, repr=False)


class _Stream(io.StringIO):
    """A text stream that also offers ``buffer`` (bytes written to it are decoded into the text)."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = _Buffer(self)

    def isatty(self) -> bool:  # like a pipe: no colours, no live progress
        return False


class _Buffer(io.RawIOBase):
    def __init__(self, text: _Stream) -> None:
        super().__init__()
        self._text = text

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        self._text.write(bytes(data).decode("utf-8", "replace"))
        return len(data)


def invoke(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
           timeout: float | None = None) -> CliResult:
    """``qpm ARGS`` through :func:`qpmcli.cli.run` in this process, with ``env`` as the whole environment and ``cwd``
    as the working directory (both restored afterwards; default: the current ones), stdout and stderr captured. The
    same call shape as :func:`run_qpm` (``timeout`` is accepted for that; pytest-timeout bounds the call).

    An exception that is not a user error (a bug) ends the call as it ends a real process: its traceback goes to
    stderr and the exit code is 1; the exception itself is kept in ``exception``.
    """
    import traceback

    from qpmcli.cli import run

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    out, err = _Stream(), _Stream()
    exception = None
    env = saved_env if env is None else env
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd or saved_cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = run([str(a) for a in args])
            except Exception as exc:  # noqa: BLE001 - a bug in the command: report it the way a process would
                exception = exc
                err.write("".join(traceback.format_exception(exc)))
                code = 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return CliResult([str(a) for a in args], code, out.getvalue(), err.getvalue(), exception)


def run_qpm(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m qpmcli.cli ARGS`` as a real process and capture its output."""
    return subprocess.run([sys.executable, "-m", "qpmcli.cli", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def qpm(isolated_env, tmp_path):
    """Call the CLI in this process: ``qpm(["plugins", "--json"])`` -> :class:`CliResult` (cwd = tmp_path).

    ``env_extra`` adds variables to the isolated environment; ``timeout`` is accepted for symmetry with
    :func:`qpm_process` (pytest-timeout bounds an in-process call)."""

    def _run(args: list[str], env_extra: dict[str, str] | None = None, cwd: Path | None = None,
             timeout: float | None = None) -> CliResult:
        env = dict(isolated_env)
        env.update(env_extra or {})
        return invoke(args, env, cwd or tmp_path)

    return _run


@pytest.fixture
def qpm_process(isolated_env, tmp_path):
    """Call the CLI as a real process (``python -m qpmcli.cli``): for the end-to-end tests (``e2e`` mark) that need
    what only a process has (exit status after a signal, a fresh interpreter's imports, real stdout buffering)."""

    def _run(args: list[str], env_extra: dict[str, str] | None = None, cwd: Path | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess:
        env = dict(isolated_env)
        env.update(env_extra or {})
        return run_qpm(args, env=env, cwd=cwd or tmp_path, timeout=timeout)

    return _run


# ------------------------------------------------------------------------------------------ shared test runs
def copy_run(run: Path, dest: Path) -> Path:
    """A private copy of a shared run (shared runs are read-only: copy before writing into one)."""
    import shutil

    shutil.copytree(run, dest, symlinks=True)
    return dest


README_DEMO = "qpm demo --out qpm-demo"  # the README's demo command, run verbatim by the ``readme_demo`` fixture


@pytest.fixture(scope="session")
def readme_demo(tmp_path_factory) -> dict:
    """The README's ``qpm demo --out qpm-demo``, once per session for every slow test that reads the demo (the README
    test, the named features and the prediction sets): a real process in a clean home with no data and no network.
    A dict with ``base`` (its working folder), ``env``, ``result`` (the CompletedProcess), ``root`` (the demo folder)
    and ``summary`` (demo.json, None when the command failed). Read-only: copy before writing."""
    import json
    import shlex

    base = tmp_path_factory.mktemp("readme-demo")
    env = isolated_environ(base)
    result = run_qpm(shlex.split(README_DEMO)[1:], env=env, cwd=base, timeout=1800)
    root = base / "qpm-demo"
    summary = json.loads((root / "demo.json").read_text()) if result.returncode == 0 else None
    return {"base": base, "env": env, "result": result, "root": root, "summary": summary}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> dict:
    """The real pipeline once per session (``builders.train_shapes_run``: shapes, a tiny random-init ViT, topk
    selection, prototypes, ``model.onnx``). Read-only: tests that write into the run use :func:`copy_run`."""
    from builders import train_shapes_run

    return train_shapes_run(tmp_path_factory.mktemp("trained-run"))


@pytest.fixture(scope="session")
def made_run(tmp_path_factory) -> dict:
    """``builders.build_made_run`` once per session: a hand-set W (shared and distinct features known), real
    prototypes, two test images. Read-only."""
    from builders import build_made_run

    return build_made_run(tmp_path_factory.mktemp("made-run"))

"""Shared fixtures: the `qpm` CLI run as a real subprocess in an isolated home."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture
def isolated_env(tmp_path: Path) -> dict[str, str]:
    """Environment for CLI subprocesses: clean config/cache homes, no QPM_* leaking from the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPM_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg-config")
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg-cache")
    env["HOME"] = str(tmp_path / "home")
    env["PYTHONUNBUFFERED"] = "1"
    (tmp_path / "home").mkdir(exist_ok=True)
    return env


def run_qpm(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m qpmcli.cli ARGS`` as a real process and capture its output."""
    return subprocess.run([sys.executable, "-m", "qpmcli.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def qpm(isolated_env, tmp_path):
    """Call the CLI: ``qpm(["plugins", "--json"])`` -> CompletedProcess (cwd = tmp_path)."""

    def _run(args: list[str], env_extra: dict[str, str] | None = None, cwd: Path | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess:
        env = dict(isolated_env)
        env.update(env_extra or {})
        return run_qpm(args, env=env, cwd=cwd or tmp_path, timeout=timeout)

    return _run

"""Helpers shared by the CLI commands: option definitions, JSON output, settings resolution."""

from __future__ import annotations

import sys
from typing import Any

import typer

DataRoot = typer.Option(None, "--data-root", help="Dataset root folder (overrides QPM_DATA_ROOT / config).")
WeightsDir = typer.Option(None, "--weights-dir", help="Folder with official backbone weight files.")
Device = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N.")
Seed = typer.Option(None, "--seed", help="Random seed (default from settings).")
JsonFlag = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table.")


def settings_from_flags(**flags: Any):
    """Resolve settings with the given CLI flags on top (``None`` = flag not given)."""
    from qpmcli.settings import resolve_settings

    settings, _ = resolve_settings(**flags)
    return settings


def print_json(obj: Any) -> None:
    """Write ``obj`` as JSON to stdout, with the same conversions as the run files (paths, numpy/torch values)."""
    from qpmcli.artifact import to_json

    sys.stdout.write(to_json(obj) + "\n")


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=True)  # never hard-wrap paths users copy; tables still fit the width

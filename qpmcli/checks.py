"""The checks every job makes before any work, on values that need no data: output paths, sizes, time limits,
choices. Each raises :class:`qpmcli.errors.ConfigError` (one line, exit code 2) naming the flag and the valid values.

They serve the request objects of the jobs (``TrainRequest.checked()``, ``SelectRequest.checked()``, ...) and the
commands alike, so a check has one owner whichever way a job is started (CLI or Python API). Core layer: imports
nothing heavy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

from qpmcli.errors import ConfigError, SelectionError


# ---------------------------------------------------------------------------------------------------- output paths
def _writable_parent(path: Path, flag: str) -> None:
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{flag} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {probe} is not writable")


def check_out_dir(path: str | os.PathLike[str] | None, flag: str) -> Path | None:
    """An output folder: it may exist (as a folder) or be creatable; an existing file there is an error."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {p} is an existing file, not a folder; choose a folder")
    _writable_parent(p, flag)
    return p


def check_out_file(path: str | os.PathLike[str] | None, flag: str) -> Path | None:
    """An output file: an existing folder there is an error; its parent must be a (creatable) writable folder."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{flag} {p} is a folder; give a file path")
    _writable_parent(p.parent, flag)
    return p


# ---------------------------------------------------------------------------------------------- selector & metrics
def check_time_limit(value: float, flag: str = "--time-limit") -> float:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{flag} must be a positive finite number of seconds, got {value}")
    return float(value)


def check_selection_sizes(n_features: int, per_class: int, n_classes: int | None = None,
                          n_total: int | None = None) -> None:
    """K >= k >= 1, K <= n_f, and C <= binomial(K, k) (every class needs its own feature set): an infeasible
    selection is a :class:`SelectionError` with the numbers that make it infeasible."""
    if per_class < 1 or n_features < 1:
        raise SelectionError(f"--features ({n_features}) and --per-class ({per_class}) must be at least 1")
    if per_class > n_features:
        raise SelectionError(f"--per-class {per_class} exceeds --features {n_features}: a class cannot get more "
                             f"features than are selected")
    if n_total is not None and n_features > n_total:
        raise SelectionError(f"--features {n_features} exceeds the {n_total} features of the dense model")
    if n_classes is not None and n_classes > math.comb(n_features, per_class):
        raise SelectionError(f"{n_classes} classes need distinct feature sets but only C({n_features},{per_class}) "
                             f"= {math.comb(n_features, per_class)} exist; raise --features or --per-class")


def check_choice(value: str, choices: Iterable[str], flag: str) -> str:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{flag} {value!r} is not one of {', '.join(choices)}")
    return value


def check_positive(value: int | None, flag: str, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{flag} must be at least {minimum}, got {value}")

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


def check_not_run_file(path: str | os.PathLike[str] | None, flag: str, *, allow: Iterable[str] = ()) -> None:
    """An output file must not be one of a run's own files (``model.json``, ``config.json``, ...; the list is
    :data:`qpmcli.artifact.RUN_FILES`) inside a run folder: writing there would silently replace the run's model,
    settings or metrics. ``allow``: run-file names the caller replaces on purpose (behind its own flag)."""
    if path is None:
        return
    from qpmcli.artifact import CONFIG, is_run_file

    p = Path(path).expanduser()
    if p.name in set(allow) or not is_run_file(p.name):
        return
    if (p.parent / CONFIG).is_file() or p.name == CONFIG:
        raise ConfigError(f"{flag} {p} is one of the run's own files; qpm never replaces it from here: choose "
                          f"another file name")


MAX_WORKERS = 1024  # solver threads: CP-SAT starts one per worker
MAX_SOLVER_SEED = 2**31 - 1  # CP-SAT's random_seed is a 32-bit integer


def check_workers(value: int, flag: str = "--workers") -> int:
    if not 1 <= value <= MAX_WORKERS:
        raise ConfigError(f"{flag} must be between 1 and {MAX_WORKERS} (solver threads), got {value}")
    return value


def check_solver_seed(value: int, flag: str = "--seed") -> int:
    if not 0 <= value <= MAX_SOLVER_SEED:
        raise ConfigError(f"{flag} must be between 0 and {MAX_SOLVER_SEED} for the selector (CP-SAT's seed range), "
                          f"got {value}")
    return value


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

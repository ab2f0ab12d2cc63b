"""The current run: a small pointer file in the user's qpm state folder, so that the design card's commands work
verbatim from any working directory::

    qpm train --backbone dinov2-vitb14    # records the run it writes as the current run
    qpm export --onnx                     # exports the current run (and records the .onnx it wrote)
    qpm explain img.jpg                   # uses the current run's exported model, else the run itself

The pointer is ``<state_dir>/current-run.json`` (``state_dir`` defaults to ``~/.cache/qpm``, next to the token
cache), written atomically. The ``model`` setting (``QPM_MODEL``) or a command's ``--model`` overrides it. This module
is light (no torch, no numpy): ``qpm runs`` and ``--help`` may import it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpmcli.artifact import FEATURE_NAMES, MODEL_JSON, ONNX_MODEL
from qpmcli.errors import ArtifactError, ConfigError

POINTER = "current-run.json"
FORMAT = "qpm-current-run"
NO_RUN_HINT = "train one with `qpm train --backbone dinov2-vitb14 ...` or run `qpm demo`"


def no_run_hint(given_as: str | None = None) -> str:
    """How to get past a missing current run: train one, run the demo, or pass the model the way the command takes
    it (``given_as``: ``RUN``, ``MODEL`` or ``--model``; ``None``: name no argument)."""
    if given_as is None:
        return f"{NO_RUN_HINT}, or give the model on the command line"
    what = "a run folder" if given_as == "RUN" else "a run folder or an .onnx file"
    return f"{NO_RUN_HINT}, or pass {given_as} ({what})"


def pointer_path(settings: Any) -> Path:
    return Path(settings.state_dir) / POINTER


def read_pointer(settings: Any, given_as: str | None = None) -> dict[str, Any] | None:
    """The pointer's content, or ``None`` when no run was recorded (a damaged pointer is an error naming it and, with
    ``given_as``, the command's argument that names a model instead)."""
    from qpmcli.files import read_regular_bytes

    path = pointer_path(settings)
    try:
        raw = read_regular_bytes(path, limit=1 << 20)  # a named pipe there is refused, never waited on
        if raw is None:
            return None
        doc = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError, ArtifactError) as exc:
        raise ArtifactError(f"the current-run pointer {path} is unreadable ({exc}); delete it and "
                            f"{no_run_hint(given_as)}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("run"), str):
        raise ArtifactError(f"{path} is not a qpm current-run pointer; delete it and {no_run_hint(given_as)}")
    return doc


def set_current(settings: Any, run: str | os.PathLike[str], *, onnx: str | os.PathLike[str] | None = None,
                by: str = "") -> Path:
    """Record ``run`` (and its exported ``onnx`` file, if any) as the current run; atomic (write aside, rename)."""
    from qpmcli.artifact import atomic_write_json

    path = pointer_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, "run": str(Path(run).expanduser().resolve()),
           "onnx": None if onnx is None else str(Path(onnx).expanduser().resolve()),
           "set_by": by, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return atomic_write_json(path, doc)


def record_export(settings: Any, run: str | os.PathLike[str], onnx: str | os.PathLike[str]) -> bool:
    """After ``qpm export``: when ``run`` is the current run, remember its .onnx file. Returns whether it was."""
    doc = read_pointer(settings)
    if doc is None or Path(doc["run"]) != Path(run).expanduser().resolve():
        return False
    set_current(settings, doc["run"], onnx=onnx, by=doc.get("set_by") or "")
    return True


def check_recordable(settings: Any) -> None:
    """Before a long job that will record its run: the pointer's folder must be creatable and writable (record
    keeping that can fail goes first, not after hours of training). :class:`ConfigError` names the way out."""
    from qpmcli.checks import check_out_file

    path = pointer_path(settings)
    try:
        check_out_file(path, "state_dir (the current-run pointer)")
    except ConfigError as exc:
        raise ConfigError(f"{exc}; set state_dir (QPM_STATE_DIR) to a writable folder or pass --no-current") from None


def try_set_current(settings: Any, run: str | os.PathLike[str], **kwargs: Any) -> str | None:
    """:func:`set_current` after a job succeeded: a failure is returned as a warning line (the job's results stand),
    ``None`` when the run was recorded."""
    try:
        set_current(settings, run, **kwargs)
    except (ArtifactError, OSError) as exc:
        return f"warning: {run} was not recorded as the current run ({exc}); name it on later commands"
    return None


def try_record_export(settings: Any, run: str | os.PathLike[str], onnx: str | os.PathLike[str]
                      ) -> tuple[bool, str | None]:
    """:func:`record_export` after an export succeeded: ``(recorded, warning or None)``; a damaged pointer or an
    unwritable state folder never turns a finished export into a failure."""
    try:
        return record_export(settings, run, onnx), None
    except (ArtifactError, OSError) as exc:
        return False, f"warning: the export is written, but the current-run pointer was not updated ({exc})"


def current_run(settings: Any) -> Path | None:
    """The run directory of the pointer, or ``None`` when none was recorded."""
    doc = read_pointer(settings)
    return None if doc is None else Path(doc["run"])


def exported_model(run: Path, pointer_onnx: str | None = None) -> Path | None:
    """The run's exported ONNX model if one exists and is not older than the run's final model and feature names
    (``qpm name-features`` after an export: the run itself shows the new names), else ``None``.

    Looked for: the file the pointer recorded (``qpm export`` / ``qpm demo``), then ``<run>/model.onnx``.
    """
    trained = max((p.stat().st_mtime for p in (run / MODEL_JSON, run / FEATURE_NAMES) if p.is_file()), default=0.0)
    for cand in ([Path(pointer_onnx)] if pointer_onnx else []) + [run / ONNX_MODEL]:
        if cand.is_file() and cand.stat().st_mtime >= trained:
            return cand
    return None


@dataclass
class Resolved:
    """What a command will use: ``path`` (run folder or .onnx), the run it belongs to, and a one-line description."""

    path: Path
    run: Path | None
    how: str

    def line(self, verb: str = "using") -> str:
        return f"{verb} {self.path} ({self.how})"


def resolve_model(settings: Any, given: str | None = None, *, prefer_onnx: bool = True,
                  run_only: bool = False, given_as: str | None = None) -> Resolved:
    """Resolve the model a command works on: ``given`` (``--model``/RUN), else the ``model`` setting
    (``QPM_MODEL``), else the current run (its exported .onnx when ``prefer_onnx`` and one exists).

    ``run_only``: the command needs a run folder (export, evaluate); a pointer to an .onnx file is then an error.
    ``given_as``: how the command takes the model, named in the hints (default ``RUN`` for ``run_only`` commands,
    which take a run folder argument, else ``--model``).
    """
    given_as = given_as or ("RUN" if run_only else "--model")
    if given:
        path = Path(given).expanduser()
        return Resolved(path, path if path.is_dir() else None, "given on the command line")
    if settings.model:
        path = Path(settings.model).expanduser()
        if run_only and not path.is_dir():
            raise ArtifactError(f"the model setting (QPM_MODEL) is {path}, not a run folder; pass a run folder")
        return Resolved(path, path if path.is_dir() else None, "from the model setting (QPM_MODEL)")
    doc = read_pointer(settings, given_as)
    if doc is None:
        raise ArtifactError(f"no run given and no current run yet: {no_run_hint(given_as)}")
    run = Path(doc["run"])
    if not run.is_dir():
        raise ArtifactError(f"the current run {run} no longer exists ({pointer_path(settings)}); "
                            f"{no_run_hint(given_as)}")
    if prefer_onnx and not run_only:
        onnx = exported_model(run, doc.get("onnx"))
        if onnx is not None:
            return Resolved(onnx, run, f"the current run's exported model; run {run}")
    return Resolved(run, run, "the current run")

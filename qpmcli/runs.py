"""``qpm runs``: the runs under ``runs_dir`` (and any folder given) read from their run files only (JSON; no torch,
no numpy), so that listing a hundred runs takes a fraction of a second.

Per run: name, dataset, backbone, selector/head, status (``complete``, ``interrupted at <stage>``, ``stale``), final
accuracy and SID@5, created time, the exported .onnx (if any), whether it is the current run, and for a run made by
``qpm edit`` / ``qpm add-class`` its parent (``edit.json``).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from qpmcli.artifact import (
    CHECKPOINTS,
    CONFIG,
    DENSE_JSON,
    EDIT,
    METRICS,
    MODEL_JSON,
    ONNX_MODEL,
    SELECTION,
    RunFolder,
    read_json,
)
from qpmcli.errors import ArtifactError, QpmError


def find_runs(folders: list[Path]) -> list[Path]:
    """Run folders (holding ``config.json``): each folder itself if it is a run, else its direct sub-folders."""
    found: list[Path] = []
    seen: set[Path] = set()
    for folder in folders:
        folder = folder.expanduser()
        try:
            cands = [folder] if (folder / CONFIG).is_file() else (
                sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else [])
        except OSError:  # unreadable folder: nothing to list there
            continue
        for cand in cands:
            key = _resolved(cand)
            if key is not None and key not in seen and (cand / CONFIG).is_file():
                seen.add(key)
                found.append(cand)
    return found


def _resolved(path: Path) -> Path | None:
    """``path.resolve()``, or ``None`` for a symlink loop or an unreadable path."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python 3.11)
        return None


def _number(value: Any) -> float | None:
    """A metric read from a run file: a finite number, or ``None`` (a run file may hold anything)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name beyond the system's limit, a loop
        return False


def _stages(head: str) -> list[tuple[str, str]]:
    if head == "linear-probe":
        return [("dense", DENSE_JSON), ("evaluate", MODEL_JSON)]
    return [("dense", DENSE_JSON), ("select", SELECTION), ("finetune", MODEL_JSON), ("evaluate", METRICS)]


def run_info(run: Path, current: Path | None = None, current_onnx: str | None = None) -> dict[str, Any]:
    """One run's row, from its JSON files; a damaged file gives status ``unreadable: ...``."""
    row: dict[str, Any] = {"name": run.name, "path": str(run), "dataset": None, "backbone": None, "selector": None,
                           "head": None, "status": None, "accuracy": None, "sid5": None, "created": None,
                           "onnx": None, "current": current is not None and _resolved(run) == current,
                           "parent": None, "edit": None}
    try:
        if not RunFolder(run).is_run:  # the current run's folder may be anything
            raise ArtifactError("no config.json: not a qpm run folder")
        record = RunFolder(run).record()
        head = record.head
        row.update(dataset=record.dataset, backbone=record.backbone, head=head,
                   selector=record.selector if head == "qpm" else None)
        row["created"] = time.strftime("%Y-%m-%d %H:%M", time.localtime((run / CONFIG).stat().st_mtime))
        metrics = read_json(run / METRICS) if (run / METRICS).exists() else {}  # a pipe there: an error, no wait
        final = metrics.get("final") if isinstance(metrics, dict) else None
        status = "complete"
        for stage, filename in _stages(head):
            done = (run / filename).is_file() and (stage != "evaluate" or isinstance(final, dict))
            if not done:
                ckpt = run / CHECKPOINTS
                resumable = ckpt.is_dir() and any(ckpt.glob("*.json"))
                status = f"interrupted at {stage}" + (" (checkpoint)" if resumable else "")
                break
        if status == "complete" and head == "qpm":
            reason = RunFolder(run).stale_reason()
            if reason:
                status = f"stale ({reason})"
        row["status"] = status
        edit = read_json(run / EDIT) if (run / EDIT).exists() else None
        if isinstance(edit, dict):  # made by qpm edit / add-class from another run
            row["edit"] = edit.get("kind")
            row["parent"] = (edit.get("parent") or {}).get("path")
        if isinstance(final, dict):
            row["accuracy"] = _number(final.get("Accuracy"))
            row["sid5"] = _number(final.get("SID@5"))
    except QpmError as exc:  # a damaged run file: its row says so, the other runs are still listed
        row["status"] = f"unreadable: {str(exc).splitlines()[0]}"
    except OSError as exc:  # a file that vanished or cannot be read meanwhile
        row["status"] = f"unreadable: {exc.strerror or exc}"
    onnx = [Path(current_onnx)] if row["current"] and isinstance(current_onnx, str) and current_onnx else []
    onnx.append(run / ONNX_MODEL)
    row["onnx"] = next((str(p) for p in onnx if _is_file(p)), None)
    return row


def list_runs(settings: Any, folders: list[str | os.PathLike[str]] | None = None) -> dict[str, Any]:
    """Rows for the runs under ``settings.runs_dir`` and ``folders``; the current run marked."""
    from qpmcli.current import read_pointer

    try:
        pointer = read_pointer(settings)
    except Exception:  # a damaged pointer must not hide the runs
        pointer = None
    current = _resolved(Path(pointer["run"])) if pointer else None
    roots = [Path(settings.runs_dir)] + [Path(f) for f in folders or []]
    runs = find_runs(roots)
    if current is not None and current.is_dir() and current not in {_resolved(r) for r in runs}:
        runs.append(current)  # the current run is always listed, wherever it lives
    rows = [run_info(r, current, pointer.get("onnx") if pointer else None) for r in runs]
    return {"runs": rows, "current": None if current is None else str(current),
            "searched": [str(r) for r in roots]}

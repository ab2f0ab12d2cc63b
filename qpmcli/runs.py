"""``qpm runs``: the runs under ``runs_dir`` (and any folder given) read from their run files only (JSON; no torch,
no numpy), so that listing a hundred runs takes a fraction of a second.

Per run: name, dataset, backbone, selector/head, status (``complete``, ``interrupted at <stage>``, ``stale``), final
accuracy and SID@5, created time, the exported .onnx (if any) and whether it is the current run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from qpmcli.artifact import (
    CHECKPOINTS,
    CONFIG,
    DENSE_JSON,
    METRICS,
    MODEL_JSON,
    ONNX_MODEL,
    SELECTION,
    RunFolder,
    read_json,
)
from qpmcli.errors import QpmError


def find_runs(folders: list[Path]) -> list[Path]:
    """Run folders (holding ``config.json``): each folder itself if it is a run, else its direct sub-folders."""
    found: list[Path] = []
    seen: set[Path] = set()
    for folder in folders:
        folder = folder.expanduser()
        cands = [folder] if (folder / CONFIG).is_file() else (
            sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else [])
        for cand in cands:
            key = cand.resolve()
            if key not in seen and (cand / CONFIG).is_file():
                seen.add(key)
                found.append(cand)
    return found


def _stages(head: str) -> list[tuple[str, str]]:
    if head == "linear-probe":
        return [("dense", DENSE_JSON), ("evaluate", MODEL_JSON)]
    return [("dense", DENSE_JSON), ("select", SELECTION), ("finetune", MODEL_JSON), ("evaluate", METRICS)]


def run_info(run: Path, current: Path | None = None, current_onnx: str | None = None) -> dict[str, Any]:
    """One run's row, from its JSON files; a damaged file gives status ``unreadable: ...``."""
    row: dict[str, Any] = {"name": run.name, "path": str(run), "dataset": None, "backbone": None, "selector": None,
                           "head": None, "status": None, "accuracy": None, "sid5": None, "created": None,
                           "onnx": None, "current": current is not None and run.resolve() == current}
    try:
        record = RunFolder(run).record()
        head = record.head
        row.update(dataset=record.dataset, backbone=record.backbone, head=head,
                   selector=record.selector if head == "qpm" else None)
        row["created"] = time.strftime("%Y-%m-%d %H:%M", time.localtime((run / CONFIG).stat().st_mtime))
        metrics = read_json(run / METRICS) if (run / METRICS).is_file() else {}
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
        if isinstance(final, dict):
            row["accuracy"] = final.get("Accuracy")
            row["sid5"] = final.get("SID@5")
    except QpmError as exc:  # a damaged run file: its row says so, the other runs are still listed
        row["status"] = f"unreadable: {str(exc).splitlines()[0]}"
    onnx = [Path(current_onnx)] if row["current"] and current_onnx else []
    onnx.append(run / ONNX_MODEL)
    row["onnx"] = next((str(p) for p in onnx if p.is_file()), None)
    return row


def list_runs(settings: Any, folders: list[str | os.PathLike[str]] | None = None) -> dict[str, Any]:
    """Rows for the runs under ``settings.runs_dir`` and ``folders``; the current run marked."""
    from qpmcli.current import read_pointer

    try:
        pointer = read_pointer(settings)
    except Exception:  # a damaged pointer must not hide the runs
        pointer = None
    current = Path(pointer["run"]).resolve() if pointer else None
    roots = [Path(settings.runs_dir)] + [Path(f) for f in folders or []]
    runs = find_runs(roots)
    if current is not None and current.is_dir() and current not in {r.resolve() for r in runs}:
        runs.append(current)  # the current run is always listed, wherever it lives
    rows = [run_info(r, current, pointer.get("onnx") if pointer else None) for r in runs]
    return {"runs": rows, "current": None if current is None else str(current),
            "searched": [str(r) for r in roots]}

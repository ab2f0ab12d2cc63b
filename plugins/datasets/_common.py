"""Helpers shared by the dataset plugins: root checks, tolerant text-table reading, stable fingerprints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from qpmcli.errors import DatasetError

SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def check_split(name: str, split: str) -> str:
    if split not in SPLITS:
        raise DatasetError(f"dataset {name!r} has no split {split!r}; use one of: {', '.join(SPLITS)}")
    return split


def require_root(name: str, root: str | Path | None, source: str) -> Path:
    """The dataset root as an existing folder, or a :class:`DatasetError` saying where the data comes from."""
    if root is None:
        raise DatasetError(f"dataset {name!r} needs a root folder: pass --data-root or set QPM_DATA_ROOT "
                           f"(obtain the data from {source})")
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset root {path} does not exist (dataset {name!r}; obtain it from {source})")
    if not path.is_dir():
        raise DatasetError(f"dataset root {path} is not a folder (dataset {name!r})")
    return path


def require_file(path: Path, what: str, source: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"missing {what}: {path} (expected {source})")
    return path


def read_table(path: Path, min_fields: int, what: str) -> list[list[str]]:
    """Whitespace-separated rows with at least ``min_fields`` fields (the last field keeps inner spaces if asked).

    Blank lines are skipped; a short row is an error naming the file and line.
    """
    rows: list[list[str]] = []
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {what} {path}: {exc}") from exc
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(None, min_fields - 1) if min_fields > 1 else [line.strip()]
        if len(fields) < min_fields:
            raise DatasetError(f"{what} {path} line {lineno}: expected {min_fields} fields, got {line.strip()!r}")
        rows.append([f.strip() for f in fields])
    return rows


def to_int(value: str, path: Path, what: str) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise DatasetError(f"{what} {path}: {value!r} is not an integer") from exc


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able object (used to fingerprint file lists)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]

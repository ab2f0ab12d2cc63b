"""Helpers shared by the dataset plugins: root checks, tolerant text-table reading, stable fingerprints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from qpmcli.contracts import Dataset, Sample
from qpmcli.errors import DatasetError
from qpmcli.images import IMAGE_SUFFIXES

SPLITS = ("train", "test")
IMAGE_EXTENSIONS = IMAGE_SUFFIXES  # one list for datasets and for qpm predict/explain (qpmcli.images)


# Where each dataset comes from (the plugin descriptions and the missing-root errors say it).
CUB_SOURCE = ("https://www.vision.caltech.edu/datasets/cub_200_2011/ (CUB_200_2011.tgz; segmentations.tgz for masks), "
              "unpacked so that the root holds images.txt, classes.txt, images/")
CARS_SOURCE = ("the Stanford Cars devkit layout (car_devkit/cars_meta.mat, car_devkit/cars_train_annos.mat, "
               "cars_test_annos_withlabels.mat, cars_train/, cars_test/), e.g. from the Kaggle mirror "
               "'eduardo4jesus/stanford-cars-dataset'")
AIRCRAFT_SOURCE = ("https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ (fgvc-aircraft-2013b.tar.gz; the root is "
                   "fgvc-aircraft-2013b or its data/ folder)")
IMAGEFOLDER_SOURCE = "your own images: root/train/<class>/*.jpg and root/test/<class>/*.jpg, or root/<class>/*.jpg"


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


class FileDataset(Dataset):
    """A dataset of image files with labels known up front (``paths``, ``targets``); images via ``open_image``."""

    root: Path
    paths: list[Path]
    targets: list[int]

    def _set_items(self, paths: list[Path], targets: list[int], listing: Path | str) -> None:
        """Store the items; a label outside ``0..C-1`` is an error naming ``listing`` (its file or folder)."""
        n = len(self.classes)
        for path, target in zip(paths, targets, strict=True):
            if not 0 <= target < n:
                raise DatasetError(f"{listing}: label {target} of {path} is out of range (expected 0..{n - 1} for "
                                   f"{n} classes)")
        self.paths, self.targets = list(paths), list(targets)

    def __len__(self) -> int:
        return len(self.paths)

    def label(self, index: int) -> int:
        return self.targets[index]

    def path(self, index: int) -> str:
        """The file of item ``index`` (used to name it in errors without decoding it)."""
        return str(self.paths[index])

    def load_image(self, index: int):
        from qpmcli.images import open_image

        return open_image(self.paths[index])

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.name} {self.split} ({len(self)} items)")
        return Sample(image=self.load_image(index), label=self.targets[index], mask=None, path=str(self.paths[index]))

    def fingerprint(self) -> dict[str, Any]:
        rel = [str(p.relative_to(self.root)) if p.is_relative_to(self.root) else str(p) for p in self.paths]
        return {**super().fingerprint(), "files": digest([rel, self.targets])}

"""Your own images, one folder per class: ``root/train/<class>/*`` + ``root/test/<class>/*``, or a single tree
``root/<class>/*`` from which a seeded, per-class fraction is held out as the test split.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from qpmcli.errors import DatasetError

from ._common import IMAGE_EXTENSIONS, IMAGEFOLDER_SOURCE, FileDataset, check_split, require_root


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, hidden files skipped), in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


class ImageFolder(FileDataset):
    """Images in class folders; class names are the folder names, sorted."""

    name = "imagefolder"

    def __init__(self, root: Any, split: str = "train", *, test_fraction: float = 0.2, seed: int = 0) -> None:
        self.split = check_split(self.name, split)
        self.root = require_root(self.name, root, IMAGEFOLDER_SOURCE)
        self.test_fraction, self.seed = float(test_fraction), int(seed)
        if (self.root / "train").is_dir():
            self.layout = "train/test"
            self._from_split_folders()
        else:
            self.layout = "single"
            if not 0.0 < self.test_fraction < 1.0:
                raise DatasetError(f"imagefolder: test_fraction must be between 0 and 1 (exclusive), not "
                                   f"{test_fraction}")
            self._from_single_tree()

    def _from_split_folders(self) -> None:
        train_dirs = _class_dirs(self.root / "train")
        if not train_dirs:
            raise DatasetError(f"{self.root / 'train'} has no class folders (expected {IMAGEFOLDER_SOURCE})")
        self.classes = [d.name for d in train_dirs]
        folder = self.root / self.split
        if not folder.is_dir():
            raise DatasetError(f"missing {folder}: with a train/ folder, the test images must be in "
                               f"{self.root / 'test'}/<class>/ (or use a single tree root/<class>/ instead)")
        index = {name: i for i, name in enumerate(self.classes)}
        paths: list[Path] = []
        labels: list[int] = []
        for d in _class_dirs(folder):
            if d.name not in index:
                raise DatasetError(f"class folder {d} has no counterpart in {self.root / 'train'} (train classes: "
                                   f"{', '.join(self.classes[:10])}{' ...' if len(self.classes) > 10 else ''})")
            files = _images(d)
            if not files and self.split == "train":
                raise DatasetError(f"class folder {d} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            paths += files
            labels += [index[d.name]] * len(files)
        if not paths:
            raise DatasetError(f"{folder} holds no images in class folders (expected {IMAGEFOLDER_SOURCE})")
        self._set_items(paths, labels, folder)

    def _from_single_tree(self) -> None:
        import numpy as np

        dirs = _class_dirs(self.root)
        if len(dirs) < 2:
            raise DatasetError(f"{self.root} must hold at least two class folders, or train/ and test/ folders "
                               f"(expected {IMAGEFOLDER_SOURCE})")
        self.classes = [d.name for d in dirs]
        paths: list[Path] = []
        labels: list[int] = []
        for label, d in enumerate(dirs):
            files = _images(d)
            if not files:
                raise DatasetError(f"class folder {d} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            # one generator per class, keyed by its name: adding a class or an image elsewhere never reshuffles this one
            key = int.from_bytes(hashlib.sha256(d.name.encode()).digest()[:8], "little")
            order = np.random.default_rng([self.seed, key]).permutation(len(files))
            n_test = min(len(files) - 1, int(round(len(files) * self.test_fraction)))
            chosen = order[:n_test] if self.split == "test" else order[n_test:]
            paths += [files[i] for i in sorted(chosen)]
            labels += [label] * len(chosen)
        self._set_items(paths, labels, self.root)

    def fingerprint(self) -> dict[str, Any]:
        extra = {"layout": self.layout}
        if self.layout == "single":
            extra.update(test_fraction=self.test_fraction, seed=self.seed)
        return {**super().fingerprint(), **extra}

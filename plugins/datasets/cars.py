"""Stanford Cars in the devkit layout, read with scipy: 8144 train / 8041 test images, 196 classes (label = class - 1).

Accepted: ``car_devkit/`` (or ``devkit/``) holding cars_meta.mat and cars_train_annos.mat; the labelled test
annotations ``cars_test_annos_withlabels.mat`` in the devkit folder or at the dataset root (the common mirror layout);
images in ``cars_train/`` and ``cars_test/`` (or the Kaggle mirror's nested ``cars_train/cars_train/``).
Bounding boxes are not used (as in the reference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qpmcli.errors import DatasetError

from ._common import CARS_SOURCE, FileDataset, check_split, require_root

DEVKITS = ("car_devkit", "devkit")


def _loadmat(path: Path) -> dict[str, Any]:
    from scipy.io import loadmat

    try:
        return loadmat(path, squeeze_me=True)
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError... for damaged files
        raise DatasetError(f"cannot read Stanford Cars annotation file {path}: {exc}") from exc


def _field(records, field: str, path: Path):
    import numpy as np

    if records.dtype.names is None or field not in records.dtype.names:
        raise DatasetError(f"{path}: the 'annotations' struct has no field {field!r} (fields: "
                           f"{', '.join(records.dtype.names or ())}); is this the labelled annotation file?")
    return np.atleast_1d(records[field])


class StanfordCars(FileDataset):
    """Stanford Cars (196 classes) from the devkit .mat files."""

    name = "stanford-cars"

    def __init__(self, root: Any, split: str = "train") -> None:
        self.split = check_split(self.name, split)
        self.root = require_root(self.name, root, CARS_SOURCE)
        devkit = next((self.root / d for d in DEVKITS if (self.root / d).is_dir()), None)
        if devkit is None:
            raise DatasetError(f"{self.root} is not a Stanford Cars folder: expected {self.root / 'car_devkit'} "
                               f"with cars_meta.mat (use {CARS_SOURCE})")
        meta_path = devkit / "cars_meta.mat"
        if not meta_path.is_file():
            raise DatasetError(f"missing {meta_path} (class names; part of the devkit, see {CARS_SOURCE})")
        names = _loadmat(meta_path).get("class_names")
        if names is None:
            raise DatasetError(f"{meta_path} has no 'class_names' variable")
        import numpy as np

        self.classes = [str(n).strip() for n in np.atleast_1d(names)]

        if split == "train":
            ann_path = devkit / "cars_train_annos.mat"
            if not ann_path.is_file():
                raise DatasetError(f"missing {ann_path} (training annotations; part of the devkit, see {CARS_SOURCE})")
        else:
            candidates = [devkit / "cars_test_annos_withlabels.mat", self.root / "cars_test_annos_withlabels.mat"]
            ann_path = next((p for p in candidates if p.is_file()), None)
            if ann_path is None:
                raise DatasetError(f"missing cars_test_annos_withlabels.mat (looked in {candidates[0]} and "
                                   f"{candidates[1]}); the devkit's cars_test_annos.mat has no labels: fetch the "
                                   f"labelled file, e.g. from the Kaggle mirror 'eduardo4jesus/stanford-cars-dataset'")
        annotations = _loadmat(ann_path).get("annotations")
        if annotations is None:
            raise DatasetError(f"{ann_path} has no 'annotations' variable")
        annotations = np.atleast_1d(annotations)
        fnames = [str(f) for f in _field(annotations, "fname", ann_path)]
        labels = [int(c) - 1 for c in _field(annotations, "class", ann_path)]

        folder = self.root / f"cars_{split}"
        if (folder / f"cars_{split}").is_dir():  # the Kaggle mirror nests the folder once more
            folder = folder / f"cars_{split}"
        if not folder.is_dir():
            raise DatasetError(f"missing image folder {folder} (expected cars_{split}/ beside car_devkit/)")
        self.image_dir = folder
        self._set_items([folder / f for f in fnames], labels, ann_path)

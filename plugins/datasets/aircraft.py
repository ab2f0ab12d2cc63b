"""FGVC-Aircraft at the variant level (100 classes): train = trainval (6667 images), test = test (3333 images).

Root: ``fgvc-aircraft-2013b`` or its ``data/`` folder, holding images_variant_trainval.txt, images_variant_test.txt,
variants.txt and images/<id>.jpg. Class order = variants.txt (as torchvision and the reference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qpmcli.errors import DatasetError

from ._common import AIRCRAFT_SOURCE, FileDataset, check_split, read_table, require_root

SPLIT_FILES = {"train": "images_variant_trainval.txt", "test": "images_variant_test.txt"}


def find_aircraft_data(root: Path) -> Path:
    for candidate in (root, root / "data", root / "fgvc-aircraft-2013b" / "data"):
        if (candidate / SPLIT_FILES["train"]).is_file() or (candidate / SPLIT_FILES["test"]).is_file():
            return candidate
    raise DatasetError(f"{root} is not an FGVC-Aircraft folder: expected {SPLIT_FILES['train']}, "
                       f"{SPLIT_FILES['test']}, variants.txt and images/ in it or in {root / 'data'} "
                       f"(obtain it from {AIRCRAFT_SOURCE})")


class FGVCAircraft(FileDataset):
    """FGVC-Aircraft 2013b, variant level."""

    name = "fgvc-aircraft"

    def __init__(self, root: Any, split: str = "train") -> None:
        self.split = check_split(self.name, split)
        self.root = find_aircraft_data(require_root(self.name, root, AIRCRAFT_SOURCE))
        path = self.root / SPLIT_FILES[split]
        if not path.is_file():
            raise DatasetError(f"missing {path} (the {split} list of FGVC-Aircraft; obtain it from {AIRCRAFT_SOURCE})")
        rows = read_table(path, 2, "FGVC-Aircraft list")  # "<image id> <variant name, may contain spaces>"
        variants_path = self.root / "variants.txt"
        if variants_path.is_file():
            self.classes = [r[0] for r in read_table(variants_path, 1, "FGVC-Aircraft variants")]
        else:  # without variants.txt: the sorted union of both lists, so train and test agree
            names = {r[1] for r in rows}
            other = self.root / SPLIT_FILES["test" if split == "train" else "train"]
            if other.is_file():
                names |= {r[1] for r in read_table(other, 2, "FGVC-Aircraft list")}
            self.classes = sorted(names)
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = [r[1] for r in rows if r[1] not in index]
        if unknown:
            raise DatasetError(f"{path}: variant {unknown[0]!r} is not in {variants_path} "
                               f"({len(unknown)} rows with unknown variants)")
        self.image_ids = [r[0] for r in rows]
        self._set_items([self.root / "images" / f"{r[0]}.jpg" for r in rows], [index[r[1]] for r in rows], path)

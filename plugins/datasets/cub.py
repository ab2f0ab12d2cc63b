"""CUB-200-2011 in its official layout, with the separately downloaded segmentations and the attribute tables.

Root: the ``CUB_200_2011`` folder (holding images.txt, image_class_labels.txt, train_test_split.txt, classes.txt,
images/) or the folder above it. Masks come from ``segmentations/<class folder>/<image stem>.png`` inside the root or
beside it (where ``segmentations.tgz`` unpacks). Labels are 0-based (class id - 1).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

from qpmcli.contracts import Sample
from qpmcli.errors import DatasetError, ImageError

from ._common import CUB_SOURCE, FileDataset, check_split, read_table, require_file, require_root, to_int

LISTS = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
CROPS = ("none", "bbox")


def find_cub_root(root: Path) -> Path:
    """``root`` itself or its ``CUB_200_2011`` child, whichever holds images.txt."""
    for candidate in (root, root / "CUB_200_2011"):
        if (candidate / "images.txt").is_file():
            return candidate
    raise DatasetError(f"{root} is not a CUB-200-2011 folder: expected {', '.join(LISTS)} and images/ in it or in "
                       f"{root / 'CUB_200_2011'} (obtain it from {CUB_SOURCE})")


class CUB200(FileDataset):
    """CUB-200-2011 birds: 5994 train / 5794 test images, 200 classes, optional masks, class and image attributes."""

    name = "cub200"

    def __init__(self, root: Any, split: str = "train", *, crop: str | None = "none") -> None:
        self.split = check_split(self.name, split)
        crop = "none" if crop in (None, False, "", "none") else str(crop)
        if crop not in CROPS:
            raise DatasetError(f"cub200: crop must be one of {', '.join(CROPS)}, not {crop!r}")
        self.crop = crop
        self.root = find_cub_root(require_root(self.name, root, CUB_SOURCE))
        base = self.root
        for name in LISTS:
            require_file(base / name, f"CUB file {name}", f"in the official CUB_200_2011 layout; {CUB_SOURCE}")

        images = {to_int(i, base / "images.txt", "images.txt"): rel
                  for i, rel in read_table(base / "images.txt", 2, "CUB list")}
        labels = self._id_column(base / "image_class_labels.txt", images)
        is_train = self._id_column(base / "train_test_split.txt", images)
        class_rows = read_table(base / "classes.txt", 2, "CUB list")
        class_ids = [to_int(i, base / "classes.txt", "classes.txt") for i, _ in class_rows]
        if class_ids != list(range(1, len(class_ids) + 1)):
            raise DatasetError(f"{base / 'classes.txt'}: class ids must run 1..{len(class_ids)} in order")
        self.class_folders = [folder for _, folder in class_rows]
        self.classes = [folder.split(".", 1)[-1].replace("_", " ") for folder in self.class_folders]

        want = 1 if split == "train" else 0
        self.ids = [i for i in sorted(images) if is_train[i] == want]
        if not self.ids:
            raise DatasetError(f"{base / 'train_test_split.txt'}: no {split} images (expected 1 = train, 0 = test)")
        self.relpaths = [images[i] for i in self.ids]
        self._set_items([base / "images" / rel for rel in self.relpaths], [labels[i] - 1 for i in self.ids],
                        base / "image_class_labels.txt")

        self.segmentations = next((d for d in (base / "segmentations", base.parent / "segmentations") if d.is_dir()),
                                  None)
        self._boxes: dict[int, tuple[float, float, float, float]] | None = None
        if crop == "bbox":
            path = require_file(base / "bounding_boxes.txt", "CUB bounding boxes",
                                f"bounding_boxes.txt from CUB_200_2011.tgz, needed for crop='bbox'; {CUB_SOURCE}")
            boxes = {}
            for row in read_table(path, 5, "CUB list"):
                try:
                    boxes[int(row[0])] = tuple(float(v) for v in row[1:5])
                except ValueError as exc:
                    raise DatasetError(f"{path}: malformed row {' '.join(row)!r}") from exc
            missing = [i for i in self.ids if i not in boxes]
            if missing:
                raise DatasetError(f"{path}: no bounding box for image id {missing[0]} ({len(missing)} missing)")
            self._boxes = boxes

    @staticmethod
    def _id_column(path: Path, images: dict[int, str]) -> dict[int, int]:
        """``<image id> <int>`` rows covering exactly the ids of images.txt."""
        values = {to_int(i, path, path.name): to_int(v, path, path.name) for i, v in read_table(path, 2, "CUB list")}
        missing = [i for i in images if i not in values]
        if missing:
            raise DatasetError(f"{path}: no entry for image id {missing[0]} of images.txt ({len(missing)} missing)")
        return values

    # ------------------------------------------------------------------------------------------------ items and masks
    @property
    def has_masks(self) -> bool:
        return self.segmentations is not None

    @property
    def mask_paths(self) -> list[Path] | None:
        if self.segmentations is None:
            return None
        return [self.segmentations / Path(rel).with_suffix(".png") for rel in self.relpaths]

    def load_mask(self, index: int):
        """The object mask (bool [H, W], any annotated pixel) of item ``index`` at full resolution, before cropping."""
        import numpy as np
        from PIL import Image

        path = self.segmentations / Path(self.relpaths[index]).with_suffix(".png")
        if not path.is_file():
            raise DatasetError(f"missing CUB segmentation {path} (the segmentations/ folder is incomplete; "
                               f"re-extract segmentations.tgz from {CUB_SOURCE})")
        try:
            with Image.open(path) as im:
                im.load()
                return np.asarray(im.convert("L")) > 0
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"cannot read CUB segmentation {path}: {exc}") from exc

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for cub200 {self.split} ({len(self)} items)")
        index = index % len(self)
        image = self.load_image(index)
        mask = None
        if self.segmentations is not None:
            mask = self.load_mask(index)
            if mask.shape != (image.height, image.width):
                raise DatasetError(f"CUB segmentation for {self.paths[index]} is {mask.shape[1]}x{mask.shape[0]}, "
                                   f"but the image is {image.width}x{image.height}")
        if self._boxes is not None:
            x, y, w, h = self._boxes[self.ids[index]]
            box = (max(0, math.floor(x)), max(0, math.floor(y)), min(image.width, math.ceil(x + w)),
                   min(image.height, math.ceil(y + h)))
            if box[2] <= box[0] or box[3] <= box[1]:
                raise DatasetError(f"bounding box {x, y, w, h} of image id {self.ids[index]} lies outside "
                                   f"{self.paths[index]} ({image.width}x{image.height})")
            image = image.crop(box)
            if mask is not None:
                mask = mask[box[1]:box[3], box[0]:box[2]]
        return Sample(image=image, label=self.targets[index], mask=mask, path=str(self.paths[index]))

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "crop": self.crop}

    # ------------------------------------------------------------------------------------------------- attributes
    def _attribute_file(self, name: str) -> Path | None:
        return next((p for p in (self.root / "attributes" / name, self.root.parent / "attributes" / name,
                                 self.root.parent / name) if p.is_file()), None)

    def class_attributes(self):
        """``[200, 312]`` float: attributes/class_attribute_labels_continuous.txt (percent of images showing each)."""
        path = self._attribute_file("class_attribute_labels_continuous.txt")
        return None if path is None else _class_attributes(path, len(self.classes)).copy()

    def attribute_names(self) -> list[str] | None:
        """The 312 attribute names (attributes.txt, inside attributes/ or beside the CUB folder), or None."""
        path = self._attribute_file("attributes.txt")
        return None if path is None else [name for _, name in read_table(path, 2, "CUB attribute list")]

    @property
    def has_image_attributes(self) -> bool:
        return self._attribute_file("image_attribute_labels.txt") is not None

    def image_attributes(self):
        """bool ``[N, 312]`` for this split: attribute present (``is_present = 1``) with certainty >= 3 (METHOD §8)."""
        present, _ = self._image_attribute_tables()
        return present

    def image_attribute_known(self):
        """bool ``[N, 312]``: certainty >= 3: the entries the alignment metric uses (present or absent)."""
        _, known = self._image_attribute_tables()
        return known

    def _image_attribute_tables(self):
        path = self._attribute_file("image_attribute_labels.txt")
        if path is None:
            raise DatasetError(f"missing {self.root / 'attributes' / 'image_attribute_labels.txt'} (it ships in "
                               f"CUB_200_2011.tgz; {CUB_SOURCE})")
        ids, attrs, present, certainty = _image_attribute_rows(path)
        import numpy as np

        n_attr = int(attrs.max()) if len(attrs) else 0
        row_of = np.full(int(max(ids.max(initial=0), max(self.ids))) + 1, -1, dtype=np.int64)
        row_of[np.asarray(self.ids)] = np.arange(len(self.ids))
        rows = row_of[ids]
        keep = (rows >= 0) & (certainty >= 3)
        out_present = np.zeros((len(self.ids), n_attr), dtype=bool)
        out_known = np.zeros((len(self.ids), n_attr), dtype=bool)
        out_known[rows[keep], attrs[keep] - 1] = True
        hit = keep & (present == 1)
        out_present[rows[hit], attrs[hit] - 1] = True
        return out_present, out_known


@functools.cache
def _class_attributes(path: Path, n_classes: int):
    import numpy as np

    try:
        matrix = np.loadtxt(path, dtype=np.float32, ndmin=2)
    except ValueError as exc:
        raise DatasetError(f"{path} is not a whitespace-separated number table: {exc}") from exc
    if matrix.shape[0] != n_classes:
        raise DatasetError(f"{path} has {matrix.shape[0]} rows; expected one per class ({n_classes})")
    return matrix


@functools.cache
def _image_attribute_rows(path: Path):
    """``(image id, attribute id, is_present, certainty)`` columns. Some official rows carry an extra field; only the
    first four are read (the reference's pandas reader skips those rows instead)."""
    import numpy as np

    try:
        table = np.loadtxt(path, usecols=(0, 1, 2, 3), dtype=np.int64, ndmin=2)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {path} as '<image id> <attribute id> <is_present> <certainty id> <time>' "
                           f"rows: {exc}") from exc
    return table[:, 0], table[:, 1], table[:, 2], table[:, 3]

"""Datasets that need no download: ``digits`` (scikit-learn's real handwritten digits) and ``shapes`` (synthetic).

``shapes`` exists so that interpretability can be measured offline: every class is an object made of a few coloured
parts from a shared vocabulary, each image has an exact object mask and a part map, and the class x part matrix is the
ground truth for structural grounding. Images are rendered on the fly from ``(seed, split, index)``.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any

from qpmcli.contracts import Dataset, Sample
from qpmcli.errors import DatasetError

from ._common import check_split

# ------------------------------------------------------------------------------------------------------------ digits


@functools.cache
def _digits_arrays():
    """The 1797 8x8 images (0..16) and labels shipped inside scikit-learn."""
    import numpy as np
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.asarray(bunch.images, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


def _stratified_split(labels, test_fraction: float, seed: int):
    """Per class, a seeded permutation; the first round(n * test_fraction) go to test. Stable across numpy versions."""
    import numpy as np

    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(len(idx) * test_fraction))
        test.extend(idx[:n_test].tolist())
        train.extend(idx[n_test:].tolist())
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(test, dtype=np.int64))


class Digits(Dataset):
    """scikit-learn's handwritten digits (1797 real 8x8 scans), upscaled to RGB; masks = the ink (intensity >= 1/4)."""

    name = "digits"

    def __init__(self, root: Any = None, split: str = "train", *, image_size: int = 64, test_fraction: float = 0.25,
                 seed: int = 0) -> None:
        self.split = check_split(self.name, split)
        if not 8 <= int(image_size) <= 1024:
            raise DatasetError(f"digits: image_size must be between 8 and 1024, not {image_size}")
        if not 0.0 < float(test_fraction) < 1.0:
            raise DatasetError(f"digits: test_fraction must be between 0 and 1 (exclusive), not {test_fraction}")
        self.image_size = int(image_size)
        self.test_fraction = float(test_fraction)
        self.seed = int(seed)
        images, labels = _digits_arrays()
        train, test = _stratified_split(labels, self.test_fraction, self.seed)
        self._indices = train if split == "train" else test
        self._images = images
        self._labels = labels
        self.classes = [str(d) for d in range(10)]

    def __len__(self) -> int:
        return len(self._indices)

    def label(self, index: int) -> int:
        return int(self._labels[self._indices[_check_index(index, len(self))]])

    def __getitem__(self, index: int) -> Sample:
        import numpy as np
        from PIL import Image

        j = int(self._indices[_check_index(index, len(self))])
        grey = Image.fromarray(np.round(self._images[j] * (255.0 / 16.0)).astype(np.uint8), "L")
        grey = grey.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        mask = np.asarray(grey) >= 64
        return Sample(image=grey.convert("RGB"), label=int(self._labels[j]), mask=mask, path=self.path(index))

    def path(self, index: int) -> str:
        return f"sklearn-digits:{int(self._indices[_check_index(index, len(self))])}"

    @property
    def has_masks(self) -> bool:
        return True

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "image_size": self.image_size, "test_fraction": self.test_fraction,
                "seed": self.seed, "version": 1}


def _check_index(index: int, n: int) -> int:
    index = int(index)
    if index < 0:
        index += n
    if not 0 <= index < n:
        raise IndexError(f"index {index} out of range for a dataset of {n} items")
    return index


# ------------------------------------------------------------------------------------------------------------ shapes

PART_SHAPES = ("circle", "square", "triangle", "hexagon", "star", "cross", "ring")
PART_COLOURS = {  # every colour has a channel < 100, so no object pixel can equal a background pixel (>= 120)
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 210, 20),
    "magenta": (210, 40, 200), "cyan": (20, 200, 210), "orange": (245, 130, 20), "black": (20, 20, 20),
}
BODY_COLOUR = (85, 85, 85)
PARTS = [f"{colour} {shape}" for shape, colour in itertools.product(PART_SHAPES, PART_COLOURS)]  # the vocabulary
BACKGROUND_RANGE = (120, 235)
CUE_COLOUR = (255, 255, 255)  # the spurious cue: no part colour and no background pixel (<= 235) is white
CUE_SIDE = 0.16  # its side, as a fraction of the image side


class Shapes(Dataset):
    """Synthetic objects: a grey body with ``parts_per_class`` coloured parts around it, on a textured background.

    A class is a set of parts (shape + colour) from a vocabulary of 56; sets are unique per class, so a classifier
    must look at the parts. The object (body and parts) is placed, scaled and rotated at random per image; the mask is
    exactly the drawn object and :meth:`part_map` says which part each pixel belongs to.

    A spurious cue for shortcut experiments (``qpm edit``): ``cue_classes=N`` draws a white square (``CUE_SIDE`` of
    the image side) in the image corner farthest from the object, behind it, on every training image of the first N
    classes;
    ``cue_test=true`` draws it on their test images too, so the same test images can be scored with and without the
    cue. The cue is drawn last, on top of an otherwise identical image, and is not part of the object mask.
    ``cue_twins=true`` makes cued class i a near twin of class N + i (the same parts but one, which differs only in
    colour), so that the real evidence is hard and the cue is the easy path: without twins a model on a good backbone
    tells the parts apart anyway and barely uses the cue. With the defaults (``cue_classes=0``) images, classes and
    fingerprints are those of earlier versions.
    """

    name = "shapes"
    VERSION = 2  # bump whenever rendering changes, so token caches of older images are never reused

    def __init__(self, root: Any = None, split: str = "train", *, n_classes: int = 10, per_class: int = 40,
                 test_per_class: int = 20, image_size: int = 128, parts_per_class: int = 3, seed: int = 0,
                 cue_classes: int = 0, cue_test: bool = False, cue_twins: bool = False) -> None:
        self.split = check_split(self.name, split)
        n_classes, per_class, test_per_class = int(n_classes), int(per_class), int(test_per_class)
        image_size, parts_per_class = int(image_size), int(parts_per_class)
        if not 2 <= parts_per_class <= 6:
            raise DatasetError(f"shapes: parts_per_class must be between 2 and 6, not {parts_per_class}")
        n_sets = math.comb(len(PARTS), parts_per_class)
        if not 2 <= n_classes <= min(n_sets, 10_000):
            raise DatasetError(f"shapes: n_classes must be between 2 and {min(n_sets, 10_000)} "
                               f"(with parts_per_class={parts_per_class}), not {n_classes}")
        if per_class < 1 or test_per_class < 1:
            raise DatasetError(f"shapes: per_class and test_per_class must be >= 1, not {per_class}/{test_per_class}")
        if not 32 <= image_size <= 1024:
            raise DatasetError(f"shapes: image_size must be between 32 and 1024, not {image_size}")
        if not 0 <= int(cue_classes) <= n_classes:
            raise DatasetError(f"shapes: cue_classes must be between 0 and n_classes ({n_classes}), not {cue_classes}")
        self.cue_classes, self.cue_test, self.cue_twins = int(cue_classes), bool(cue_test), bool(cue_twins)
        if self.cue_twins and 2 * self.cue_classes > n_classes:
            raise DatasetError(f"shapes: cue_twins needs n_classes >= 2 * cue_classes ({2 * self.cue_classes}), not "
                               f"{n_classes}")
        self.n_classes, self.per_class, self.test_per_class = n_classes, per_class, test_per_class
        self.image_size, self.parts_per_class, self.seed = image_size, parts_per_class, int(seed)
        self.class_parts = _class_parts(self.seed, n_classes, parts_per_class)  # [C][P] vocabulary indices
        if self.cue_twins:
            self.class_parts = _twin_parts(self.class_parts, self.cue_classes)
        self.classes = [" + ".join(PARTS[p] for p in parts) for parts in self.class_parts]
        self.part_names = list(PARTS)

    def __len__(self) -> int:
        return self.n_classes * (self.per_class if self.split == "train" else self.test_per_class)

    def label(self, index: int) -> int:
        return _check_index(index, len(self)) % self.n_classes

    def __getitem__(self, index: int) -> Sample:
        from PIL import Image

        index = _check_index(index, len(self))
        image, parts = self.render(index)
        return Sample(image=Image.fromarray(image, "RGB"), label=index % self.n_classes, mask=parts > 0,
                      path=self.path(index))

    def part_map(self, index: int):
        """uint8 ``[H, W]``: 0 background, 1 body, ``2 + v`` where vocabulary part ``v`` (``part_names``) is."""
        return self.render(_check_index(index, len(self)))[1]

    def render(self, index: int, with_background: bool = False):
        """``(image uint8 [H, W, 3], part map uint8 [H, W])`` (and the bare background when asked), from the seed."""
        import numpy as np
        from PIL import Image, ImageDraw

        size = self.image_size
        rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, index])
        background = _background(rng, size)
        parts = self.class_parts[index % self.n_classes]

        body_r = size * rng.uniform(0.13, 0.18)
        part_r = size * rng.uniform(0.075, 0.10)
        extent = body_r + 1.7 * part_r
        cx, cy = rng.uniform(extent, size - extent, size=2)
        angle0 = rng.uniform(0.0, 2 * math.pi)
        aspect = rng.uniform(0.85, 1.15)

        label_map = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(label_map)
        draw.ellipse([cx - body_r * aspect, cy - body_r / aspect, cx + body_r * aspect, cy + body_r / aspect], fill=1)
        for j, part in enumerate(parts):
            theta = angle0 + 2 * math.pi * j / len(parts)
            dist = body_r + 0.55 * part_r
            px, py = cx + dist * math.cos(theta), cy + dist * math.sin(theta)
            _draw_part(draw, PART_SHAPES[part // len(PART_COLOURS)], px, py, part_r, 2 + part)
        label = np.asarray(label_map)

        shade = rng.uniform(0.85, 1.0)
        lut = np.zeros((2 + len(PARTS), 3), dtype=np.float64)
        lut[1] = BODY_COLOUR
        lut[2:] = [PART_COLOURS[name.split(" ")[0]] for name in PARTS]
        lut = np.round(lut * shade).astype(np.uint8)
        image = np.where((label > 0)[..., None], lut[label], background)
        if self.has_cue(index):
            image = _draw_cue(image, label, cx, cy)
        if with_background:
            return image, label, background
        return image, label

    def has_cue(self, index: int) -> bool:
        """Whether image ``index`` of this split carries the spurious cue (``cue_classes``, ``cue_test``)."""
        cued_split = self.split == "train" or self.cue_test
        return cued_split and index % self.n_classes < self.cue_classes

    def cue_box(self, index: int) -> tuple[int, int, int, int] | None:
        """The cue's pixel box ``(x0, y0, x1, y1)`` (exclusive ends) in image ``index``, or ``None`` without a cue
        (found as the image's pure white pixels: no part and no background pixel is white)."""
        import numpy as np

        if not self.has_cue(_check_index(index, len(self))):
            return None
        ys, xs = np.nonzero((self.render(index)[0] == CUE_COLOUR).all(-1))
        return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)

    @property
    def has_masks(self) -> bool:
        return True

    def class_attributes(self):
        """``[C, 56]`` float: 1 where the class's object has that part (ground truth for structural grounding)."""
        import numpy as np

        matrix = np.zeros((self.n_classes, len(PARTS)), dtype=np.float32)
        for c, parts in enumerate(self.class_parts):
            matrix[c, list(parts)] = 1.0
        return matrix

    @property
    def has_image_attributes(self) -> bool:
        return True

    def image_attributes(self):
        """bool ``[N, 56]``: the parts drawn in each image (every part of its class is always drawn)."""
        import numpy as np

        return self.class_attributes()[np.asarray(self.labels())] > 0

    def attribute_names(self) -> list[str]:
        """The 56 part names (``part_names``): "red circle", ..."""
        return list(self.part_names)

    def path(self, index: int) -> str:
        return f"shapes:{self.split}:{_check_index(index, len(self))}"

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "n_classes": self.n_classes, "per_class": self.per_class,
                "test_per_class": self.test_per_class, "image_size": self.image_size,
                "parts_per_class": self.parts_per_class, "seed": self.seed, "version": self.VERSION,
                **self._cue_fingerprint()}

    def _cue_fingerprint(self) -> dict[str, Any]:
        """The cue options, only where they change this split's images (so existing caches stay valid)."""
        if self.cue_classes == 0:
            return {}
        if self.split == "test" and not self.cue_test:
            return {"cue_twins": True} if self.cue_twins else {}
        out: dict[str, Any] = {"cue_classes": self.cue_classes}
        if self.split == "test":
            out["cue_test"] = self.cue_test
        if self.cue_twins:
            out["cue_twins"] = True
        return out


@functools.cache
def _class_parts(seed: int, n_classes: int, parts_per_class: int) -> tuple[tuple[int, ...], ...]:
    """Unique part sets, drawn in sequence (so the first k classes do not depend on n_classes)."""
    import numpy as np

    rng = np.random.default_rng([seed, 7, parts_per_class])
    seen: set[tuple[int, ...]] = set()
    out: list[tuple[int, ...]] = []
    while len(out) < n_classes:
        parts = tuple(sorted(int(p) for p in rng.choice(len(PARTS), size=parts_per_class, replace=False)))
        if parts not in seen:
            seen.add(parts)
            out.append(parts)
    return tuple(out)


def _twin_parts(parts: tuple[tuple[int, ...], ...], n: int) -> tuple[tuple[int, ...], ...]:
    """Class i < n gets class n + i's parts with its last part in the next colour that gives an unused set."""
    out = list(parts)
    used = set(parts[n:])
    n_col = len(PART_COLOURS)
    for i in range(n):
        base = list(parts[n + i])
        shape, colour = divmod(base[-1], n_col)
        for step in range(1, n_col):
            cand = tuple(sorted(base[:-1] + [shape * n_col + (colour + step) % n_col]))
            if len(set(cand)) == len(cand) and cand not in used:
                break
        out[i] = cand
        used.add(cand)
    return tuple(out)


def _background(rng, size: int):
    """A muted texture (stripes, checks or blotches) with every channel in BACKGROUND_RANGE (float32, separable)."""
    import numpy as np

    lo, hi = BACKGROUND_RANGE
    base = rng.uniform(lo + 20, hi - 20, size=3).astype(np.float32)
    coords = np.arange(size, dtype=np.float32)
    kind = int(rng.integers(3))
    if kind == 0:
        theta, period = rng.uniform(0, math.pi), rng.uniform(6, 20)
        phase = (coords[None, :] * math.cos(theta) + coords[:, None] * math.sin(theta)) * (2 * math.pi / period)
        pattern = np.sin(phase)
    elif kind == 1:
        cell = int(rng.integers(6, 20))
        cells = coords // cell
        pattern = ((cells[None, :] + cells[:, None]) % 2) * 2.0 - 1.0
    else:
        from PIL import Image

        coarse = rng.uniform(-1, 1, size=(6, 6))
        up = Image.fromarray(((coarse + 1) * 127.5).astype(np.uint8), "L").resize((size, size),
                                                                                 Image.Resampling.BICUBIC)
        pattern = np.asarray(up, dtype=np.float32) * (1 / 127.5) - 1.0
    amplitude = rng.uniform(8, 20, size=3).astype(np.float32)
    image = rng.standard_normal((size, size, 3), dtype=np.float32)
    image *= 4.0
    image += base
    image += pattern[..., None].astype(np.float32) * amplitude
    np.clip(image, lo, hi, out=image)
    return np.rint(image).astype(np.uint8)


def _draw_cue(image, label, cx: float, cy: float):
    """``image`` with the white cue square in the corner farthest from the object centre ``(cx, cy)``, behind the
    object (only background pixels of ``label`` change, so the object and its mask stay exact)."""
    size = image.shape[0]
    side = max(2, int(round(CUE_SIDE * size)))
    inset = max(1, int(round(0.04 * size)))
    x0 = inset if cx > size / 2 else size - inset - side
    y0 = inset if cy > size / 2 else size - inset - side
    out = image.copy()
    region = out[y0:y0 + side, x0:x0 + side]
    region[label[y0:y0 + side, x0:x0 + side] == 0] = CUE_COLOUR
    return out


def _draw_part(draw, shape: str, x: float, y: float, r: float, value: int) -> None:
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=value)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([x - s, y - s, x + s, y + s], fill=value)
    elif shape == "triangle":
        draw.regular_polygon((x, y, r), 3, fill=value)
    elif shape == "hexagon":
        draw.regular_polygon((x, y, r), 6, fill=value)
    elif shape == "star":
        pts = [(x + (r if k % 2 == 0 else r * 0.45) * math.cos(math.pi * k / 5 - math.pi / 2),
                y + (r if k % 2 == 0 else r * 0.45) * math.sin(math.pi * k / 5 - math.pi / 2)) for k in range(10)]
        draw.polygon(pts, fill=value)
    elif shape == "cross":
        t = r * 0.35
        draw.rectangle([x - r, y - t, x + r, y + t], fill=value)
        draw.rectangle([x - t, y - r, x + t, y + r], fill=value)
    elif shape == "ring":
        draw.ellipse([x - r, y - r, x + r, y + r], outline=value, width=max(2, int(round(r * 0.4))))
    else:  # pragma: no cover - PART_SHAPES is closed
        raise ValueError(shape)

"""Images in and out of the models: listing the user's inputs, reading them robustly, preprocessing.

- :func:`list_images`: files and folders as the user gave them -> image paths (the one listing rule of
  ``qpm predict``, ``qpm explain`` and ``qpm export --check-images``; :data:`IMAGE_SUFFIXES` for folders);
- :func:`open_image`: any PIL-readable file becomes an RGB ``PIL.Image`` or a clear :class:`ImageError`. Handles
  grayscale (L, I;16, I, F), palette (P with transparency), CMYK, alpha (composited on white), EXIF rotation, and
  refuses missing, empty, truncated or absurdly large files with a message naming the file;
- :func:`preprocess_array`: an image -> the model's float32 input, in numpy (no torch).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpmcli.errors import ImageError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

MAX_PIXELS = 300_000_000  # beyond this PIL's decompression-bomb guard would fire; we say so in our own words
RESAMPLE = {"bilinear": 2, "bicubic": 3, "nearest": 0}  # preprocessing "interpolation" -> PIL.Image.Resampling value
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def is_image_file(path: Path) -> bool:
    """A file whose suffix is one of :data:`IMAGE_SUFFIXES` (case-insensitive)."""
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def list_images(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The images named by ``inputs``, in order: a file as given (whatever its suffix), a folder as its image files
    (recursive, sorted).

    The missing-path rule: a path that does not exist is kept and reported per image when it is opened (like an
    unreadable file), so one bad path never stops a batch; but when not one listed image exists, or a folder holds no
    images, nothing can be done and an :class:`ImageError` says so before any work starts.
    """
    out: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if is_image_file(f))
            if not found:
                raise ImageError(f"folder {p} holds no images ({', '.join(IMAGE_SUFFIXES[:5])}, ...)")
            out += found
        else:
            out.append(p)
    if out and not any(p.is_file() for p in out):
        others = f" (nor any of the other {len(out) - 1} given)" if len(out) > 1 else ""
        raise ImageError(f"image not found: {out[0]}{others}")
    return out


def to_rgb(image):
    """Convert any PIL image to 8-bit RGB: alpha is composited on white, 16-bit/float grayscale is rescaled."""
    import numpy as np
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.round().astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


@contextmanager
def pixel_limit() -> Iterator[None]:
    """Inside: PIL's decompression-bomb guard is ours (:data:`MAX_PIXELS`) and says nothing on its own.

    PIL warns (``DecompressionBombWarning``, a raw warning on stderr) above ``Image.MAX_IMAGE_PIXELS`` and refuses
    above twice that; callers check ``MAX_PIXELS`` themselves right after ``Image.open`` (a header read), so the
    warning is silenced and PIL's refusal moved to our limit, where a :class:`PIL.Image.DecompressionBombError` is
    reworded by :func:`bomb_message`.
    """
    import warnings

    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None:
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS // 2  # PIL refuses beyond 2x its limit: exactly beyond ours
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def too_large(path: object, width: int, height: int) -> ImageError | None:
    """Our error for an image over :data:`MAX_PIXELS`, or ``None``."""
    if width * height > MAX_PIXELS:
        return ImageError(f"image {path} is too large ({width}x{height} pixels; limit {MAX_PIXELS})")
    return None


MIN_TRAIN_SIDE = 8  # pixels: a training image thinner than this (1xN, Nx1) holds no pattern to learn or to show


def too_small(path: object, width: int, height: int) -> ImageError | None:
    """Our error for a training image under :data:`MIN_TRAIN_SIDE` pixels on a side, or ``None``. (Prediction takes
    any size: the image is resized to the model's input.)"""
    if min(width, height) < MIN_TRAIN_SIDE:
        return ImageError(f"image {path} is {width}x{height} pixels; training images need at least {MIN_TRAIN_SIDE} "
                          f"pixels on each side (remove or replace it)")
    return None


def bomb_message(path: object, exc: Exception) -> str:
    """PIL's decompression-bomb refusal in our words."""
    import re

    m = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(m.group(1))} pixels" if m else "too many pixels"
    return f"image {path} is too large ({size}; limit {MAX_PIXELS})"


def open_image(path: str | Path):
    """Open ``path`` fully (decoding now, not lazily) and return an RGB image, or raise :class:`ImageError`."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    try:
        with pixel_limit(), Image.open(path) as im:
            err = too_large(path, im.width, im.height)
            if err is not None:
                raise err
            im.load()
            return to_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(bomb_message(path, exc)) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot read image {path}: {exc}") from exc


def preprocess_array(image, config: dict[str, Any]) -> np.ndarray:
    """PIL image (any mode) -> float32 ``[3, H, W]`` following a preprocessing ``config`` (the ``preprocess`` entry of
    a model: ``size`` (H, W), ``mean``, ``std``, ``interpolation``, ``minmax``).

    Squash-resize to ``size`` with PIL (what torchvision's ``Resize`` does on PIL images), scale to [0, 1]
    (= ``ToTensor``), normalise with mean/std in float32 and, when ``minmax`` (the reference mode), rescale the image
    to [0, 1] by its own min and max. numpy only: the ONNX path and DataLoader workers use it without torch.
    """
    import numpy as np

    img = to_rgb(image)
    h, w = (int(v) for v in config["size"])
    if img.size != (w, h):
        img = img.resize((w, h), RESAMPLE[config.get("interpolation", "bilinear")])
    x = (np.asarray(img, dtype=np.float32) / np.float32(255.0)).transpose(2, 0, 1)
    mean = np.asarray(config["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(config["std"], dtype=np.float32)[:, None, None]
    x = (x - mean) / std
    if config.get("minmax"):
        lo, hi = x.min(), x.max()
        x = np.clip((x - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def synthetic_images(n: int, size: tuple[int, int], seed: int = 0) -> list[Any]:
    """Deterministic natural-ish images: smooth gradients plus a few filled ellipses/rectangles."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for _ in range(n):
        base = np.stack([rng.uniform(0, 255) * (1 - xx) + rng.uniform(0, 255) * yy for _ in range(3)], -1)
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x0, y0 = rng.uniform(0, w * 0.7), rng.uniform(0, h * 0.7)
            box = [x0, y0, x0 + rng.uniform(w * 0.1, w * 0.5), y0 + rng.uniform(h * 0.1, h * 0.5)]
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        out.append(img)
    return out

"""Reading images robustly: any PIL-readable file becomes an RGB ``PIL.Image`` or a clear :class:`ImageError`.

Handles grayscale (L, I;16, I, F), palette (P with transparency), CMYK, alpha (composited on white), EXIF rotation,
and refuses empty, truncated or absurdly large files with a message naming the file.
"""

from __future__ import annotations

from pathlib import Path

from qpmcli.errors import ImageError

MAX_PIXELS = 300_000_000  # beyond this PIL's decompression-bomb guard would fire; we say so in our own words


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


def open_image(path: str | Path):
    """Open ``path`` fully (decoding now, not lazily) and return an RGB image, or raise :class:`ImageError`."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ImageError(f"image {path} is too large ({im.width}x{im.height} pixels; limit {MAX_PIXELS})")
            im.load()
            return to_rgb(im)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot read image {path}: {exc}") from exc

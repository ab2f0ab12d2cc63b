"""Object masks at the token grid's resolution (METHOD.md §8): OpenCV's fixed-point bilinear resize, reproduced in
numpy so that the reference's masks come out bit for bit without OpenCV, and the 3x3 dilation of the ``*_dilated``
overlap variants. :func:`to_numpy` is the array view every metric module uses."""

from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(x: Any) -> np.ndarray:
    """A numpy view of a numpy array or (CPU/GPU) torch tensor, without importing torch."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)



# OpenCV's fixed-point bilinear resize for 8-bit images (imgproc/src/resize.cpp): 11 fractional bits per axis.
_COEF_BITS = 11
_COEF_SCALE = 1 << _COEF_BITS



def _linear_taps(src: int, dst: int, clamp_low: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source index pairs and 11-bit weights of OpenCV INTER_LINEAR along one axis.

    Mirrors `cv::hal::resize`: fx = float((d + 0.5) * scale - 0.5), sx = floor(fx), weights rounded with cvRound
    (half to even) from float32, the x axis clamped at both borders, the y axis only by clipping the row index.
    """
    scale = 1.0 / (dst / src)
    f = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s.astype(np.float32)).astype(np.float32)
    if clamp_low:
        low = s < 0
        f[low], s[low] = 0.0, 0
        high = s >= src - 1
        f[high], s[high] = 0.0, src - 1
    w0 = np.rint((np.float32(1.0) - f) * np.float32(_COEF_SCALE)).astype(np.int64)
    w1 = np.rint(f * np.float32(_COEF_SCALE)).astype(np.int64)
    i0 = np.clip(s, 0, src - 1)
    i1 = np.clip(s + 1, 0, src - 1)
    return i0, i1, np.stack([w0, w1])


def _cv2_resize_linear_u8(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bit-exact numpy emulation of `cv2.resize(img_u8, (out_w, out_h), interpolation=INTER_LINEAR)` (1 channel)."""
    h, w = img.shape
    if (h, w) == (out_h, out_w):
        return img.copy()
    if h == 2 * out_h and w == 2 * out_w:
        # OpenCV switches an exact 2x INTER_LINEAR shrink to INTER_AREA's fast path: (sum of 2x2 + 2) >> 2.
        blocks = img.astype(np.int64).reshape(out_h, 2, out_w, 2).sum(axis=(1, 3))
        return ((blocks + 2) >> 2).astype(np.uint8)
    src = img.astype(np.int64)
    x0, x1, wx = _linear_taps(w, out_w, clamp_low=True)
    y0, y1, wy = _linear_taps(h, out_h, clamp_low=False)
    rows = np.unique(np.concatenate([y0, y1]))
    lut = np.zeros(h, dtype=np.int64)
    lut[rows] = np.arange(rows.size)
    horiz = src[rows][:, x0] * wx[0] + src[rows][:, x1] * wx[1]  # HResizeLinear, int32 in OpenCV
    top, bottom = horiz[lut[y0]] >> 4, horiz[lut[y1]] >> 4
    # VResizeLinear<uchar>: ((b0*(S0>>4))>>16) + ((b1*(S1>>4))>>16) + 2) >> 2, identical in its SIMD path.
    out = ((wy[0][:, None] * top) >> 16) + ((wy[1][:, None] * bottom) >> 16)
    return np.clip((out + 2) >> 2, 0, 255).astype(np.uint8)


def patch_mask(mask: Any, grid: tuple[int, int] = (16, 16)) -> np.ndarray:
    """Object mask at patch resolution, by the reference's rule (METHOD.md §13 C1).

    The full-resolution mask is turned into a uint8 0/255 image, resized straight to the patch grid with OpenCV's
    INTER_LINEAR (emulated bit-exactly here, no OpenCV needed) and thresholded at > 0. INTER_LINEAR does not
    anti-alias when shrinking, so a patch is foreground iff the bilinear sample near its centre is non-zero: this is
    *not* "any annotated pixel in the patch".

    mask: bool (or 0/non-0) array [H, W]; grid: (h, w) patch rows and columns. Returns bool [h, w].
    """
    arr = to_numpy(mask)
    if arr.ndim != 2:
        raise ValueError(f"patch_mask expects one [H, W] mask, got shape {tuple(arr.shape)}")
    out_h, out_w = int(grid[0]), int(grid[1])
    if out_h <= 0 or out_w <= 0 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"patch_mask needs a non-empty mask and a positive grid, got {arr.shape} -> {grid}")
    img = np.where(arr.astype(bool), np.uint8(255), np.uint8(0))
    return _cv2_resize_linear_u8(img, out_h, out_w) > 0


def dilate(mask: Any) -> np.ndarray:
    """`cv2.dilate(mask, np.ones((3, 3)), iterations=1)`: grow a bool mask by one cell in all 8 directions.

    Works on [h, w] or batched [..., h, w] masks; cells outside the border count as background.
    """
    m = to_numpy(mask).astype(bool)
    padded = np.pad(m, [(0, 0)] * (m.ndim - 2) + [(1, 1), (1, 1)])
    h, w = m.shape[-2:]
    out = np.zeros_like(m)
    for dy in range(3):
        for dx in range(3):
            out |= padded[..., dy : dy + h, dx : dx + w]
    return out

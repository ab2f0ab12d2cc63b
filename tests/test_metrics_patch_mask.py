"""patch_mask reproduces OpenCV INTER_LINEAR + `> 0` (METHOD.md §13 C1); dilate is a 3x3 cv2.dilate."""

from __future__ import annotations

import numpy as np
import pytest

from qpmcli.metrics import dilate, patch_mask


def _test_mask(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    m = ((yy - 0.4 * h) ** 2 / (0.3 * h) ** 2 + (xx - 0.55 * w) ** 2 / (0.25 * w) ** 2) < 1
    m |= (yy % 23 == 5) & (xx % 17 == 3)  # isolated pixels, mostly missed by centre sampling
    return m


# Produced by cv2.resize(m.astype(uint8) * 255, (gw, gh), interpolation=cv2.INTER_LINEAR) > 0 (OpenCV 4.14 and 5.0).
GOLDEN = {
    (375, 500, (16, 16)): ['0000000000000000', '0000000000000000', '0000001111100000', '0000001111110000',
                           '0000011111110000', '0000011111111000', '0000011111111000', '0000011111111000',
                           '0000011111110000', '0000001111110000', '0000000111100000', '0000000000000000',
                           '0000000000000000', '0000000000000000', '0000000000000000', '0000000000000000'],
    (61, 45, (16, 16)): ['0000000000000000', '0100000100000100', '0000001111110000', '0000001111110000',
                         '0000011111111000', '0000011111111000', '0000011111111000', '0100011111111100',
                         '0000011111111000', '0000001111110000', '0000001111110000', '0000000000000000',
                         '0000000000000000', '0100000100000100', '0000000000000000', '0000000000000000'],
    # exactly 2x: OpenCV uses INTER_AREA's fast path, so any pixel of the 2x2 block counts
    (32, 32, (16, 16)): ['0000000000000000', '0000000000000000', '0100001111110000', '0000001111110000',
                         '0000011111111000', '0000011111111000', '0000011111111000', '0000011111111000',
                         '0000011111111000', '0000011111111000', '0000001111110000', '0000000011000000',
                         '0000000000000000', '0000000000000000', '0100000000100000', '0000000000000000'],
    (40, 56, (8, 12)): ['000000000000', '000001111000', '000011111100', '000011111100', '000011111000',
                        '000001110000', '000000000000', '000000000000'],
}


@pytest.mark.parametrize("key", list(GOLDEN))
def test_patch_mask_matches_opencv_golden_outputs(key):
    h, w, grid = key
    got = patch_mask(_test_mask(h, w), grid)
    assert got.dtype == bool and got.shape == grid
    assert ["".join("1" if v else "0" for v in row) for row in got] == GOLDEN[key]


def test_patch_mask_samples_patch_centres_not_any_pixel():
    # 224 -> 16: patch i is sampled between source pixels 14i+6 and 14i+7 (weights 1/2 each).
    m = np.zeros((224, 224), bool)
    m[14 * 3 + 0, 14 * 3 + 0] = True      # corner pixel of patch (3,3): missed
    m[14 * 5 + 6, 14 * 5 + 6] = True      # pixel next to the centre of patch (5,5): weight 1/4 -> kept
    m[14 * 8: 14 * 8 + 6, 14 * 8: 14 * 9] = True   # top 43 % of patch (8,8), centre rows uncovered: missed
    m[14 * 10: 14 * 10 + 7, 14 * 10: 14 * 11] = True  # top half incl. row 6 of patch (10,10): kept
    got = patch_mask(m, (16, 16))
    assert np.argwhere(got).tolist() == [[5, 5], [10, 10]]


def test_patch_mask_edge_cases():
    assert not patch_mask(np.zeros((100, 90), bool)).any()
    assert patch_mask(np.ones((100, 90), bool)).all()
    same = np.eye(16, dtype=bool)
    assert np.array_equal(patch_mask(same, (16, 16)), same)  # equal size: a plain copy
    with pytest.raises(ValueError):
        patch_mask(np.zeros((2, 3, 4), bool))


def test_patch_mask_agrees_with_opencv_when_installed():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    for _ in range(200):
        h, w = rng.integers(5, 400, size=2)
        m = rng.random((h, w)) < 0.02
        ref = cv2.resize(m.astype(np.uint8) * 255, (16, 16), interpolation=cv2.INTER_LINEAR) > 0
        assert np.array_equal(patch_mask(m, (16, 16)), ref)


def test_dilate_grows_one_ring_and_clips_at_the_border():
    m = np.zeros((5, 6), bool)
    m[0, 0] = m[3, 3] = True
    got = dilate(m)
    expected = np.zeros((5, 6), bool)
    expected[0:2, 0:2] = True
    expected[2:5, 2:5] = True
    assert np.array_equal(got, expected)
    batch = dilate(np.stack([m, np.zeros_like(m)]))
    assert np.array_equal(batch[0], expected) and not batch[1].any()

"""Each metric of METHOD.md §8 against hand-computed values on tiny tensors, edge cases and invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qpmcli import metrics as M


# ------------------------------------------------------------------------------------------------------- accuracy
def test_accuracy_uses_first_maximal_logit_on_ties():
    logits = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 0.0, 0.0]])
    assert M.accuracy(logits, [0, 1, 0]) == 1.0
    assert M.accuracy(logits, [1, 2, 0]) == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------------------------------ SID
def _one_hot_maps(k: int) -> np.ndarray:
    """k maps on a 1 x k grid, map j = 1 at position j."""
    return np.eye(k, dtype=np.float32).reshape(1, k, 1, k)


def test_sid_of_disjoint_peaks_matches_hand_value():
    # mean|M_j| = 1/5, so M~_j = 5 * onehot; softmax peak = e^5 / (e^5 + 4) at each position
    maps = _one_hot_maps(5)
    got = M.sid_per_image(maps, np.arange(5)[None])
    assert float(got[0]) == pytest.approx(math.exp(5) / (math.exp(5) + 4), rel=1e-6)


def test_sid_of_identical_or_zero_maps_is_one_over_k():
    same = np.tile(np.array([0.0, 1.0, 3.0, 0.5], np.float32), (5, 1)).reshape(1, 5, 2, 2)
    assert float(M.sid_per_image(same, np.arange(5)[None])[0]) == pytest.approx(0.2, rel=1e-6)
    zeros = np.zeros((1, 5, 2, 2), np.float32)  # mean|M| floored at 1e-5 -> uniform softmax
    assert float(M.sid_per_image(zeros, np.arange(5)[None])[0]) == pytest.approx(0.2, rel=1e-6)


def test_sid_range_is_between_one_over_k_and_one():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(64, 8, 4, 4)).astype(np.float32) * rng.random((64, 8, 1, 1)) * 10
    vals = M.sid_per_image(maps, np.stack([rng.permutation(8)[:5] for _ in range(64)])).numpy()
    assert vals.min() >= 0.2 - 1e-6 and vals.max() <= 1 + 1e-6


def test_sid_uses_top_k_raw_weights_and_skips_classes_with_fewer_than_k():
    # class 0: six non-zero weights, the negative one is not among its top 5; class 1: four -> not eligible
    w = np.array([[1, 1, 1, 1, 1, -3, 0], [1, 1, 1, 1, 0, 0, 0]], np.float32)
    top, eligible = M.top_k_features(w, 5)
    assert top[0].tolist() == [0, 1, 2, 3, 4] and eligible.tolist() == [True, False]
    maps = np.zeros((2, 7, 1, 7), np.float32)
    maps[:, :, 0, :] = np.eye(7)
    logits_only_class1 = np.array([[0, 1], [0, 1]], np.float32)
    res = M.compute_metrics(train_features=np.ones((2, 7)), train_labels=[0, 1], test_logits=logits_only_class1,
                            test_labels=[0, 1], test_maps=maps, weight=w, which=["SID@5"])
    assert res == {"SID@5": 0.0}  # METHOD B8: no eligible image -> 0
    res = M.compute_metrics(train_features=np.ones((2, 7)), train_labels=[0, 1],
                            test_logits=logits_only_class1[:, ::-1], test_labels=[0, 1], test_maps=maps, weight=w,
                            which="sid")
    # mean|M_j| = 1/7, so each chosen map peaks at e^7 / (e^7 + 6) on its own position
    # positions 5, 6 are not peaks of any chosen map: each chosen map gives 1/(e^7+6) there
    expected = (5 * math.exp(7) + 2) / (math.exp(7) + 6) / 5
    assert res["SID@5"] == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------------- class independence
def test_class_independence_hand_value():
    f = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    # G col0 = [1, 0, 3]: P = [1/4, 3/4]; col1 = [0, 2, 0]: P = [0, 1]  ->  1 - (3/4 + 1) / 2
    assert M.class_independence(f, [0, 1, 1]) == pytest.approx(0.125)


def test_class_independence_is_zero_for_class_specific_and_one_for_dead_features():
    f = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    assert M.class_independence(f, [0, 0, 1], n_classes=3) == pytest.approx(0.0)
    dead = np.full((4, 1), 7.0)  # G = 0 everywhere -> P = 0 -> counts as independent
    assert M.class_independence(dead, [0, 1, 0, 1]) == pytest.approx(1.0)


def test_class_independence_is_shift_invariant():
    rng = np.random.default_rng(2)
    f, y = rng.random((50, 6)), rng.integers(0, 4, 50)
    assert M.class_independence(f + 10, y) == pytest.approx(M.class_independence(f, y))


# ------------------------------------------------------------------------------------------------------ correlation
def test_correlation_hand_values():
    assert M.correlation(np.eye(2)) == pytest.approx(0.0)
    assert M.correlation(np.ones((3, 2))) == pytest.approx(1.0)
    f = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    assert M.correlation(f) == pytest.approx(1 / math.sqrt(2))
    with_dead = np.array([[1.0, 0.0], [2.0, 0.0]])  # zero column: norm floored, cosine 0
    assert M.correlation(with_dead) == pytest.approx(0.0)
    assert M.correlation(np.ones((3, 1))) == 0.0


# --------------------------------------------------------------------------------------------------- contrastiveness
def test_contrastiveness_separated_clusters_near_one_and_dead_zero_feature_zero():
    rng = np.random.default_rng(3)
    two = np.r_[rng.normal(0, 0.1, 300), rng.normal(10, 0.1, 300)][:, None]
    assert M.contrastiveness(two) > 0.999
    assert M.contrastiveness(np.zeros((50, 1))) == pytest.approx(0.0)  # both components at 0: OVL 1


def test_contrastiveness_fast_backend_equals_seeded_sklearn_gmm():
    rng = np.random.default_rng(4)
    n = 800
    f = np.stack([np.abs(rng.normal(size=n)) * (rng.random(n) < 0.3),
                  np.r_[rng.normal(0, 1, n // 2), rng.normal(4, 0.5, n - n // 2)],
                  rng.exponential(size=n), rng.gamma(2.0, size=n)], axis=1)
    fast = M.contrastiveness(f)
    assert fast == M.contrastiveness(f)  # deterministic
    # bimodal / sparse features: sklearn's Lloyd ends at the same split, so the fits are identical
    assert M.contrastiveness(f[:, :2]) == pytest.approx(M.contrastiveness(f[:, :2], backend="sklearn"), abs=1e-9)
    # skewed unimodal features: the k-means init decides where EM stops; we stay inside sklearn's seed spread
    seeded = [M.contrastiveness(f, seed=s, backend="sklearn") for s in range(5)]
    assert min(seeded) - 1e-9 <= fast <= max(seeded) + 1e-9
    with pytest.raises(ValueError):
        M.contrastiveness(f, backend="nope")


# -------------------------------------------------------------------------------------------- structural grounding
def test_structural_grounding_hand_value():
    w = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    attrs = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    # GT cos: (0,1) = (1,2) = 1/sqrt2, (0,2) = 0; W cos: (0,1) = 1, (1,2) = 0; top 4 = both pairs twice
    assert M.structural_grounding(w, attrs, top=4) == pytest.approx(2 / (4 / math.sqrt(2)))
    w_same = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert M.structural_grounding(w_same, np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])) == pytest.approx(1.0)


def test_structural_grounding_is_undefined_when_no_classes_share_attributes():
    assert math.isnan(M.structural_grounding(np.eye(3), np.eye(3)))
    p = _random_problem(c=3)
    res = M.compute_metrics(**p, which="structural_grounding", class_attributes=np.eye(3))
    assert res == {"Structural-Grounding": None}


def test_structural_grounding_rejects_attributes_of_another_class_count():
    with pytest.raises(ValueError, match="one row per class|C=3"):
        M.structural_grounding(np.eye(3), np.ones((4, 2)))


# ----------------------------------------------------------------------------------------------------- alignment
def test_alignment_hand_value_with_an_attribute_everywhere():
    f = np.array([[1.0], [1.0], [0.0], [0.0]])
    att = np.array([[1, 1, 0], [1, 1, 0], [0, 1, 1], [0, 1, 0]], bool)
    # attr 0: (1 - 0) / mean(f - min f) = 1 / 0.5 = 2;  attr 1 (everywhere: no "without" group, its mean is 0 as in
    # the reference): 0.5 / 0.5 = 1;  attr 2: (0 - 2/3) / 0.5
    np.testing.assert_allclose(M.alignment_matrix(f, att), [[2.0, 1.0, -4 / 3]])
    assert M.alignment(f, att) == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------- segmentation overlap
def _seg_case():
    maps = np.zeros((1, 2, 2, 2), np.float32)
    maps[0, 0, 0, 0] = 1.0
    maps[0, 1, 0, 1] = 2.0
    mask = np.array([[[True, False], [False, False]]])
    return maps, np.array([[1.0, 1.0]], np.float32), mask


@pytest.mark.parametrize("variant,expected", [("gradcam", 1 / 3), ("gradcam_max", 0.5), ("max", 0.5)])
def test_segmentation_overlap_hand_values(variant, expected):
    maps, w, mask = _seg_case()
    got = M.segmentation_overlap_per_image(maps, w, mask, variant)
    assert float(got[0]) == pytest.approx(expected)
    full = M.segmentation_overlap_per_image(maps, w, M.dilate(mask), variant)  # dilation covers the 2x2 grid
    assert float(full[0]) == pytest.approx(1.0)


def test_segmentation_overlap_edge_cases_score_zero():
    maps, w, mask = _seg_case()
    empty = np.zeros_like(mask)
    for v in ("gradcam", "gradcam_max", "max"):
        assert float(M.segmentation_overlap_per_image(maps, w, empty, v)[0]) == 0.0
        flat = np.ones_like(maps)  # G - min G = 0 everywhere
        if v != "max":
            assert float(M.segmentation_overlap_per_image(flat, w, mask, v)[0]) == 0.0
    negative = -np.ones_like(maps)  # max M_j <= 0 -> 0
    assert float(M.segmentation_overlap_per_image(negative, w, mask, "max")[0]) == 0.0
    # only non-zero-weight features count in "max": feature 1 has weight 0 here
    assert float(M.segmentation_overlap_per_image(maps, np.array([[1.0, 0.0]]), mask, "max")[0]) == 1.0


# --------------------------------------------------------------------------------------------------- compute_metrics
def _random_problem(seed=0, n=120, m=90, c=6, k=12, grid=(4, 4)):
    rng = np.random.default_rng(seed)
    w = np.zeros((c, k), np.float32)
    for i in range(c):
        w[i, rng.choice(k - 1, 5, replace=False)] = 1.0  # feature k-1 is never used
    return dict(
        train_features=np.abs(rng.normal(size=(n, k))).astype(np.float32),
        train_labels=rng.integers(0, c, n),
        test_logits=rng.normal(size=(m, c)).astype(np.float32),
        test_labels=rng.integers(0, c, m),
        test_maps=np.abs(rng.normal(size=(m, k, *grid))).astype(np.float16),
        weight=w,
        test_masks=rng.random((m, *grid)) < 0.3,
    )


def test_compute_metrics_marks_missing_inputs_none_and_keeps_all_keys():
    p = _random_problem()
    res = M.compute_metrics(**p)
    assert list(res) == list(M.ALL_KEYS)
    assert res["Structural-Grounding"] is None and res["Alignment"] is None
    assert res["Plausibility"] == res["SegOverlap-gradcam_dilated"]
    assert res["NFeatures"] == 11.0 and res["PerClass"] == 5.0
    for key, val in res.items():
        if val is not None and key not in ("NFeatures", "PerClass", "Pooling-Ratio"):
            assert 0.0 <= val <= 1.0, key
    p["test_masks"] = None
    assert M.compute_metrics(**p, which="segmentation_overlap")["Plausibility"] is None


def test_compute_metrics_uses_only_relevant_features_for_train_metrics():
    p = _random_problem(1)
    p["train_features"][:, -1] = 5.0  # unused feature: would count as a dead, independent feature
    res = M.compute_metrics(**p, which="essential")
    rel = M.relevant_features(p["weight"])
    assert rel.tolist() == list(range(11))
    assert res["Class-Independence"] == pytest.approx(
        M.class_independence(p["train_features"][:, rel], p["train_labels"], 6))
    assert res["Correlation"] == pytest.approx(M.correlation(p["train_features"][:, rel]))
    assert set(res) == {"Accuracy", "Class-Independence", "Correlation", "NFeatures", "PerClass"}


def test_compute_metrics_map_metrics_equal_per_image_definitions():
    p = _random_problem(2)
    res = M.compute_metrics(**p, which=["sid", "segmentation_overlap"])
    pred = M.predictions(p["test_logits"])
    maps = p["test_maps"].astype(np.float32)
    top, ok = M.top_k_features(p["weight"], 5)
    assert res["SID@5"] == pytest.approx(float(M.sid_per_image(maps, top[pred]).mean()), rel=1e-6)
    for v in M.SEG_VARIANTS:
        mask = M.dilate(p["test_masks"]) if v.endswith("_dilated") else p["test_masks"]
        ref = M.segmentation_overlap_per_image(maps, p["weight"][pred], mask, v.replace("_dilated", ""))
        assert res[f"SegOverlap-{v}"] == pytest.approx(float(ref.mean()), rel=1e-6), v


def test_pooling_baseline_applies_the_standardised_head():
    # two classes, one feature each; avg-pooled features predict the label, max-pooled ones always class 1
    maps = np.zeros((2, 2, 1, 4), np.float32)
    maps[0, 0] = 1.0                       # image 0: feature 0 avg 1, max 1
    maps[0, 1, 0, 0] = 3.0                 # feature 1 avg 0.75, max 3
    maps[1, 1] = 2.0                       # image 1: feature 1 avg 2, max 2
    w = np.eye(2, dtype=np.float32)
    res = M.compute_metrics(train_features=np.ones((2, 2)), train_labels=[0, 1], test_logits=np.eye(2),
                            test_labels=[0, 1], test_maps=maps, weight=w, which="pooling_baseline",
                            head_mean=[0.0, 0.0], head_std=[1.0, 1.0])
    assert res == {"Pooling-Avg-Accuracy": 1.0, "Pooling-Max-Accuracy": 0.5, "Pooling-Ratio": 1.0}
    # mean 2.5 on feature 1: image 0 max-pooled (1, 0.5) -> class 0 (right), image 1 (0, -0.5) -> class 0 (wrong)
    res = M.compute_metrics(train_features=np.ones((2, 2)), train_labels=[0, 1], test_logits=np.eye(2),
                            test_labels=[0, 1], test_maps=maps, weight=w, which="pooling_baseline",
                            head_mean=[0.0, 2.5], head_std=[1.0, 1.0])
    assert res == {"Pooling-Avg-Accuracy": 0.5, "Pooling-Max-Accuracy": 0.5, "Pooling-Ratio": 0.5}


def test_metric_names_resolve_presets_ids_keys_and_reject_unknown():
    assert M.resolve_metric_names("SID@5,Plausibility") == ["SID@5", "Plausibility"]
    assert "Contrastiveness" not in M.resolve_metric_names("fast")
    assert M.resolve_metric_names(["class_independence"]) == ["Class-Independence"]
    with pytest.raises(ValueError, match="unknown metric 'bogus'"):
        M.resolve_metric_names("bogus")


def test_tokens_to_maps_gives_dino_gradcam_maps():
    tokens = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)  # CLS + 2x2 patches, D = 3
    maps = M.tokens_to_maps(tokens, (2, 2))
    assert maps.shape == (2, 3, 2, 2)
    assert maps[1, 2, 1, 0] == tokens[1, 1 + 2, 2]


def test_public_test_set_functions_match_compute_metrics():
    p = _random_problem(3)
    res = M.compute_metrics(**p)
    pred = M.predictions(p["test_logits"])
    assert M.sid_at_k(p["test_maps"], p["weight"], p["test_logits"]) == pytest.approx(res["SID@5"])
    assert M.sid_at_k(p["test_maps"], p["weight"], pred, k=3) >= 1 / 3
    assert M.plausibility(p["test_maps"], p["weight"], pred, p["test_masks"]) == pytest.approx(res["Plausibility"])
    assert M.segmentation_overlap(p["test_maps"], p["weight"], pred, p["test_masks"], "max") == pytest.approx(
        res["SegOverlap-max"])
    pool = M.pooling_baseline(p["test_maps"], p["weight"], p["test_labels"], p["test_logits"])
    assert pool == {k: pytest.approx(res[k]) for k in pool}

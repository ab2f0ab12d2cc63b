"""Split conformal prediction (``qpmcli.conformal``): the exact threshold, the three scores, exact coverage on
synthetic model outputs (mean and law), class-conditional coverage, and one image's set with its feature tree."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from qpmcli import conformal as C
from qpmcli.errors import ConfigError
from qpmcli.modelfile import ClassifierMetadata

N_CAL, N_TEST, N_CLASSES, SPLITS = 500, 1000, 20, 300


@pytest.fixture(scope="module")
def pool():
    """One pool of synthetic outputs (20 classes, 50 features, 5 per class) and every score matrix of every score,
    computed once: a score is a fixed function s(x, c), so a split only chooses rows."""
    data = C.synthetic_outputs(N_CAL + N_TEST, N_CLASSES, 50, 5, seed=3)
    data["scores"] = {s: C.level_scores(s, data["logits"], values=data["values"], weight=data["weight"])
                      for s in C.SCORES}
    return data


def _covered(pool, score, alpha, split, cal, test, per_class=False):
    """Calibrate on rows ``cal`` and return which rows of ``test`` have their true class in their set."""
    scores, y = pool["scores"][score], pool["labels"]
    entry = C.calibrate_scores(score, {lv: m[cal] for lv, m in scores.items()}, y[cal], alpha,
                               per_class=per_class, seed=split)
    member = scores[entry["level"]][test] <= C.limits(entry, N_CLASSES)[None]
    return entry, member[np.arange(test.size), y[test]]


# ------------------------------------------------------------------------------------------------- the threshold
def test_the_threshold_is_the_exact_order_statistic_of_19_scores_at_alpha_0_1():
    assert C.conformal_rank(19, 0.1) == 18  # ceil(20 * 0.9) = 18 exactly (no float rounding to 19)
    assert C.exact_threshold(np.arange(1, 20, dtype=float), 0.1) == 18.0
    assert C.exact_threshold(np.arange(19, 0, -1, dtype=float), 0.1) == 18.0  # order of the input does not matter


def test_too_few_calibration_scores_give_no_threshold_and_every_class():
    assert C.minimum_calibration(0.1) == 9 and C.minimum_calibration(0.05) == 19
    assert C.exact_threshold(np.arange(8.0), 0.1) is None and C.exact_threshold(np.arange(9.0), 0.1) == 8.0
    data = C.synthetic_outputs(8, 4, 12, 3, seed=0)
    entry = C.calibrate("lac", data["logits"], data["labels"], 0.1)
    assert entry["too_few"] and entry["threshold"] is None and entry["minimum_n"] == 9
    assert C.set_members(entry, data["logits"]).all()


# --------------------------------------------------------------------------------------------------- the scores
def test_lac_keeps_resolution_for_confident_images_and_aps_is_the_cumulative_mass():
    logits = np.array([[40.0, 0.0, -1.0], [1.0, 2.0, 0.5]])
    lac = C.class_scores("lac", logits)
    p = C.probabilities(logits)
    assert lac[0, 0] == pytest.approx(p[0, 1] + p[0, 2], rel=1e-12) and lac[0, 0] > 0  # 1 - p would be 0.0
    assert lac[1, 1] == pytest.approx(1 - p[1, 1]) and lac[0, 1] == pytest.approx(1 - p[0, 1])
    aps = C.class_scores("aps", logits)
    assert aps[1].tolist() == pytest.approx([p[1, 1] + p[1, 0], p[1, 1], 1.0])


def test_hier_scores_a_node_member_below_every_outsider_and_ranks_by_contribution():
    # 4 classes over 6 features, 3 each; on this image the predicted class 0 ranks its features 2 > 0 > 1
    weight = np.array([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0], [1, 0, 1, 0, 0, 1], [0, 1, 0, 1, 0, 1]], float)
    values = np.array([[1.0, 0.5, 3.0, -1.0, 0.2, 0.4]])
    logits = values @ weight.T
    ranked = C.feature_rankings(values, weight)[0]
    assert ranked[0].tolist() == [2, 0, 1] and ranked[2].tolist() == [2, 0, 5] and ranked[1].tolist() == [2, 4, 3]
    assert C.shared_prefix(values, weight, [0])[0].tolist() == [3, 1, 2, 0]
    level2 = C.class_scores("hier", logits, values=values, weight=weight, level=2)[0]
    inside = level2 < 1.0
    assert inside.tolist() == [True, False, True, False]  # class 2 shares features 2, 0 with the prediction
    assert level2[inside].max() < level2[~inside].min()
    margin = C.margins(logits)[0]
    assert margin[0] < 0 and margin[2] == pytest.approx(logits[0, 0] - logits[0, 2])
    assert level2[2] == pytest.approx(margin[2] / (1 + margin[2]))
    assert np.all(C.class_scores("hier", logits, values=values, weight=weight, level=0)[0] < 1.0)


def test_calibrate_equals_calibrate_scores_on_level_scores(pool):
    rows = np.arange(N_CAL)
    for score in C.SCORES:
        direct = C.calibrate(score, pool["logits"][rows], pool["labels"][rows], 0.1, values=pool["values"][rows],
                             weight=pool["weight"], seed=4)
        staged = C.calibrate_scores(score, {lv: m[rows] for lv, m in pool["scores"][score].items()},
                                    pool["labels"][rows], 0.1, seed=4)
        assert direct == staged
        member = C.set_members(direct, pool["logits"][N_CAL:], values=pool["values"][N_CAL:], weight=pool["weight"])
        assert np.array_equal(member, pool["scores"][score][direct["level"]][N_CAL:] <= C.limits(direct, 20))


# ----------------------------------------------------------------------------------------------- exact coverage
@pytest.mark.parametrize("score", C.SCORES)
def test_split_conformal_coverage_is_exact_and_follows_the_beta_binomial_law(pool, score):
    """300 random splits of one pool into 500 calibration and 1000 test images, alpha in {0.05, 0.1, 0.2}.

    For continuous scores split conformal's law is exact: the number of covered test images T is the number of the m
    test scores that fall below the k-th smallest of the n calibration scores in a uniformly random arrangement of
    all n + m scores, which is Beta-Binomial(m, k, n + 1 - k) with k = ceil((n + 1)(1 - alpha)) (mean
    k / (n + 1)). For hier, n is the half of the calibration images that sets the threshold: the other half chose
    the level, and given that half the rest is still a uniformly random arrangement. The KS test uses the
    randomized probability integral transform F(T - 1) + V * P(T) (V uniform), which is exactly uniform under the
    law, so scipy's continuous KS test applies. A threshold 10 ranks too high must fail the same test."""
    rng = np.random.default_rng(11)
    jitter = np.random.default_rng(12)
    n_total = N_CAL + N_TEST
    for alpha in (0.05, 0.1, 0.2):
        counts, off = np.empty(SPLITS), np.empty(SPLITS)
        for split in range(SPLITS):
            perm = rng.permutation(n_total)
            cal, test = perm[:N_CAL], perm[N_CAL:]
            entry, covered = _covered(pool, score, alpha, split, cal, test)
            counts[split] = covered.sum()
            if score != "hier":  # the negative control: the (k + 10)-th smallest score instead of the k-th
                s, y, k = pool["scores"][score][None], pool["labels"], C.conformal_rank(N_CAL, alpha)
                wrong = np.partition(s[cal, y[cal]], k + 9)[k + 9]
                off[split] = (s[test, y[test]] <= wrong).sum()
        n = entry["n"]
        k = C.conformal_rank(n, alpha)
        assert n == (N_CAL if score != "hier" else N_CAL - N_CAL // 2)
        assert abs(counts.mean() / N_TEST - k / (n + 1)) <= 0.005, (alpha, counts.mean() / N_TEST, k / (n + 1))
        law = stats.betabinom(N_TEST, k, n + 1 - k)
        u = law.cdf(counts - 1) + jitter.random(SPLITS) * law.pmf(counts)
        assert stats.kstest(u, "uniform").pvalue > 0.01, alpha
        if score != "hier":
            u_off = law.cdf(off - 1) + jitter.random(SPLITS) * law.pmf(off)
            assert stats.kstest(u_off, "uniform").pvalue < 0.01


@pytest.mark.parametrize("score", C.SCORES)
def test_per_class_calibration_covers_every_class_with_100_images_each(score):
    """Mondrian calibration with 100 calibration images per class: averaged over 60 random splits, the worst of 20
    classes (their difficulty differs) is covered at least 1 - alpha - 0.02 of the time; one marginal threshold
    leaves the hardest class far below that."""
    alpha, per_cal, per_test, splits = 0.1, 100, 150, 60
    data = C.synthetic_outputs(20 * (per_cal + per_test) * 2, N_CLASSES, 50, 5, seed=5)
    by_class = [np.flatnonzero(data["labels"] == c)[: per_cal + per_test] for c in range(N_CLASSES)]
    rows = np.concatenate(by_class)
    data = {k: (v[rows] if k != "weight" else v) for k, v in data.items()}
    data["scores"] = {score: C.level_scores(score, data["logits"], values=data["values"], weight=data["weight"])}
    y = data["labels"]
    rng = np.random.default_rng(6)
    hits = {True: np.zeros(N_CLASSES), False: np.zeros(N_CLASSES)}
    for split in range(splits):
        cal = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_cal] for c in range(N_CLASSES)])
        test = np.setdiff1d(np.arange(y.size), cal)
        for mondrian in (True, False):
            _, covered = _covered(data, score, alpha, split, cal, test, per_class=mondrian)
            hits[mondrian] += np.bincount(y[test], weights=covered, minlength=N_CLASSES) / per_test
    worst = hits[True].min() / splits
    assert worst >= 1 - alpha - 0.02, worst
    assert hits[False].min() / splits < 1 - alpha - 0.05


# ------------------------------------------------------------------------------------------------ one image's set
def test_one_images_set_lists_members_best_first_with_shared_features_and_divergence():
    weight = np.array([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0], [1, 0, 1, 0, 0, 1], [0, 1, 0, 1, 0, 1]], np.float32)
    meta = ClassifierMetadata.from_head({"weight": weight, "features": [10, 11, 12, 13, 14, 15],
                                         "class_names": ["gull a", "tern", "gull b", "crow"]})
    values = np.array([1.0, 0.5, 3.0, -1.0, 0.2, 0.4])
    logits = weight.astype(float) @ values
    entry = {"alpha": 0.1, "coverage": 0.9, "score": "hier", "per_class": False, "level": 2, "threshold": 0.9,
             "source": {"held_out": True}}
    got = C.prediction_set(entry, meta, logits, values)
    assert got["set"] == ["gull a", "gull b"] and got["size"] == 2 and got["guarantee"]
    assert got["shared_features"] == [12, 10]
    assert [(m["class"], m["diverges_at"]) for m in got["members"]] == [("gull a", 11), ("gull b", 15)]
    assert got["members"][0]["ranking"] == [12, 10, 11]
    everything = C.prediction_set({**entry, "threshold": None}, meta, logits, values)
    assert everything["size"] == 4 and everything["shared_features"] == []


def test_a_sets_features_are_printed_by_the_models_labels(tmp_path):
    """Feature ids in a set (its line, its tree) go through ``ClassifierMetadata.feature_label``: a named feature
    shows its name (``qpm name-features``), the others their id."""
    from qpmcli.commands._common import set_line
    from qpmcli.setview import render_set_tree

    weight = np.array([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0], [1, 0, 1, 0, 0, 1], [0, 1, 0, 1, 0, 1]], np.float32)
    meta = ClassifierMetadata.from_head({"weight": weight, "features": [10, 11, 12, 13, 14, 15],
                                         "class_names": ["gull a", "tern", "gull b", "crow"]})
    meta.feature_names = {12: {"names": ["white head"], "user": True}}
    values = np.array([1.0, 0.5, 3.0, -1.0, 0.2, 0.4])
    entry = {"alpha": 0.1, "coverage": 0.9, "score": "hier", "per_class": False, "level": 2, "threshold": 0.9}
    got = C.prediction_set(entry, meta, weight.astype(float) @ values, values)
    assert got["feature_labels"] == {"10": "f10", "11": "f11", "12": "f12 white head", "15": "f15"}
    assert C.set_feature_label(got, 12) == "f12 white head" and C.set_feature_label(got, 99) == "f99"
    line = set_line(got)
    assert "all rank f12 white head, f10 first, then f11 for gull a; f15 for gull b" in line
    # members whose rankings go on with the same feature are named together (the set's tree in words)
    same_next = {**got, "members": [{**m, "diverges_at": 11} for m in got["members"]]}
    assert set_line(same_next).endswith("then f11 for gull a, gull b")
    assert render_set_tree(got, tmp_path / "named.png", title="named").stat().st_size > 0


@pytest.mark.parametrize("score", C.SCORES)
def test_one_images_set_equals_its_row_of_the_vectorised_sets(pool, score):
    """``prediction_set`` (predict, explain) and ``set_members`` / ``evaluate_sets`` (calibration, evaluate)
    give every image the same set, per class thresholds included."""
    rows = np.arange(N_CAL)
    meta = ClassifierMetadata.from_head({"weight": pool["weight"], "mu": np.zeros(50), "sigma": np.ones(50),
                                         "class_names": [f"c{i}" for i in range(N_CLASSES)]})
    for per_class in (False, True):
        entry = C.calibrate(score, pool["logits"][rows], pool["labels"][rows], 0.2, values=pool["values"][rows],
                            weight=pool["weight"], per_class=per_class, seed=1)
        test = np.arange(N_CAL, N_CAL + 60)
        member = C.set_members(entry, pool["logits"][test], values=pool["values"][test], weight=pool["weight"])
        for i, row in zip(test, member, strict=True):
            got = C.prediction_set(entry, meta, pool["logits"][i], pool["values"][i])
            assert sorted(got["set"]) == sorted(f"c{c}" for c in np.flatnonzero(row))
        covered = member[np.arange(test.size), pool["labels"][test]].mean()
        assert C.evaluate_sets(entry, pool["logits"][test], pool["labels"][test], values=pool["values"][test],
                               weight=pool["weight"])["coverage"] == covered


def test_select_calibration_finds_the_last_matching_entry_or_names_the_command():
    doc = {"calibrations": [{"alpha": 0.1, "coverage": 0.9, "score": "lac"},
                            {"alpha": 0.2, "coverage": 0.8, "score": "aps"},
                            {"alpha": 0.1, "coverage": 0.9, "score": "hier"}]}
    assert C.select_calibration(doc, 0.9)["score"] == "hier"
    assert C.select_calibration(doc, 0.9, "lac")["score"] == "lac"
    with pytest.raises(ConfigError, match=r"no calibration for coverage 0.95 .*qpm conformal runs/x --alpha 0.05"):
        C.select_calibration(doc, 0.95, model="runs/x")
    with pytest.raises(ConfigError, match="qpm export RUN --onnx"):
        C.select_calibration(None, 0.9, model="m.onnx", onnx=True)
    for bad in (0.0, 1.0, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="--coverage"):
            C.select_calibration(doc, bad)


def test_the_calibration_split_is_stratified_seeded_and_keeps_a_fitting_image_per_class():
    labels = np.repeat(np.arange(5), [10, 20, 1, 4, 30])
    fit, cal = C.calibration_split(labels, 0.2, seed=3)
    assert np.array_equal(np.sort(np.concatenate([fit, cal])), np.arange(labels.size))
    assert np.bincount(labels[cal], minlength=5).tolist() == [2, 4, 0, 1, 6]
    assert np.array_equal(cal, C.calibration_split(labels, 0.2, seed=3)[1])
    assert not np.array_equal(cal, C.calibration_split(labels, 0.2, seed=4)[1])
    with pytest.raises(ConfigError, match="--cal-fraction"):
        C.calibration_split(labels, 1.0, seed=0)


def test_the_set_tree_draws_empty_single_and_crowded_sets(tmp_path):
    """The tree grows with the set (one row per member, at most MAX_BRANCHES drawn) and an empty set is a figure too."""
    from PIL import Image

    from qpmcli.setview import MAX_BRANCHES, render_set_tree

    data = C.synthetic_outputs(1, 30, 60, 5, seed=2)
    meta = ClassifierMetadata.from_head({"weight": data["weight"], "mu": np.zeros(60), "sigma": np.ones(60)})
    heights = {}
    for name, threshold in (("empty", -2.0), ("crowded", None), ("some", 0.95)):
        entry = {"alpha": 0.1, "coverage": 0.9, "score": "hier", "level": 1, "threshold": threshold}
        detail = C.prediction_set(entry, meta, data["logits"][0], data["values"][0])
        path = render_set_tree(detail, tmp_path / f"{name}.png", title=name)
        with Image.open(path) as im:
            heights[name] = (detail["size"], im.height)
    assert heights["empty"][0] == 0 and heights["crowded"][0] == 30 and 0 < heights["some"][0] < 30
    assert heights["empty"][1] < heights["some"][1] < heights["crowded"][1]
    assert heights["crowded"][1] < 100 * (1.45 + 0.62 * (MAX_BRANCHES + 1)) + 2

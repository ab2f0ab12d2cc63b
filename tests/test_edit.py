"""`qpm edit` and `qpm add-class`: the operations, the objective's refill, refit, verify, bit-identical logits,
reproducible weights, derived runs that every command accepts, and hostile input that changes nothing.

Edits run on a private copy of the session's ``trained_run`` (a real pipeline run on ``shapes``: 6 classes, 8 of 24
dense features selected, 3 per class); the new class of add-class is ``shapes``' 7th class, which the run never saw.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_run

from qpmcli import artifact
from qpmcli.addclass import best_row, fit_bias
from qpmcli.childrun import model_digest, read_head, weights_digest
from qpmcli.edit import EditPlan, Objective, logits_digest, refill


# ---------------------------------------------------------------------------------------------------- helpers
def tree(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder`` (byte identity of a whole run)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_logits(run: Path, cache) -> np.ndarray:
    from qpmcli.evaluate import collect_outputs

    model, _ = artifact.load_model(run)
    return collect_outputs(model, cache)["logits"]


test_logits.__test__ = False  # a helper, not a test


def rows(head) -> list[set[int]]:
    return [set(head.row(c)) for c in range(head.n_classes)]


@pytest.fixture(scope="module")
def parent(trained_run, tmp_path_factory) -> dict:
    """A private copy of the trained run (the parent of every edit here) and its test cache."""
    run = copy_run(trained_run["run"], tmp_path_factory.mktemp("edit-parent") / "run")
    return {"run": run, "test_cache": trained_run["test_cache"], "train": trained_run["train"],
            "head": read_head(run), "tree": tree(run)}


@pytest.fixture(scope="module")
def new_class_images(tmp_path_factory) -> dict:
    """Five training and eight test images of shapes' 7th class (the run knows the first 6)."""
    from builders import SHAPES

    from qpmcli.data import load_dataset

    root = tmp_path_factory.mktemp("new-class")
    opts = {**SHAPES, "n_classes": 7}
    out = {}
    for split, n in (("train", 5), ("test", 8)):
        ds = load_dataset("shapes", split=split, **opts)
        (root / split).mkdir()
        for j in range(n):
            ds[6 + 7 * j].image.save(root / split / f"{j}.png")
        out[split] = root / split
    return out


# ---------------------------------------------------------------------------------------------- the refill
def objective(n_f: int, C: int, seed: int = 0, penalty: float = 0.0) -> Objective:
    rng = np.random.default_rng(seed)
    P = np.triu(rng.uniform(0, penalty, (n_f, n_f)), 1)
    return Objective(coef=rng.normal(size=(n_f, C)), P=P + P.T, threshold=0.5, threshold_rule="reference")


def brute_force_refill(plan: EditPlan, obj: Objective, allow: bool) -> float:
    """The best Z over every joint choice of one replacement per affected class (an unselected feature takes the
    freed column; two classes may share it)."""
    free = int(np.flatnonzero(plan.features == plan.dropped[0])[0])
    pool = [g for g in range(obj.coef.shape[0]) if g not in plan.dropped and (allow or g in plan.features)]
    best = -math.inf
    for combo in itertools.product(pool, repeat=len(plan.affected)):
        W, f = plan.weight.copy(), plan.features.copy()
        ok = True
        for c, g in zip(plan.affected, combo, strict=True):
            if g in f:
                j = int(np.flatnonzero(f == g)[0])
            elif f[free] in plan.dropped:
                j, f[free] = free, g
            else:
                ok = False
                break
            ok = ok and not W[c, j]
            W[c, j] = True
        if ok and len({bytes(r) for r in W}) == len(W):
            best = max(best, obj.value(f, W))
    return best


def test_refill_is_the_joint_optimum_of_the_objective_on_both_paths():
    features = np.array([0, 2, 4, 6, 8])
    W = np.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 0, 0, 1, 1]], bool)
    plan_W = W.copy()
    plan_W[:, 1] = False  # drop feature 2 (column 1): classes 0 and 1 lose it
    for seed in range(6):
        obj = objective(10, 4, seed=seed, penalty=0.3)
        for allow in (False, True):
            plan = EditPlan(weight=plan_W, features=features, dropped=[2], affected=[0, 1], per_class=3)
            W1, f1, choices, exact = refill(plan, obj, allow_unselected=allow, allow_redundant=True)
            assert exact and (W1.sum(1) == 3).all() and len({bytes(r) for r in W1}) == 4
            assert 2 not in {int(f1[j]) for j in np.flatnonzero(W1.any(0))}
            assert obj.value(f1, W1) == pytest.approx(brute_force_refill(plan, obj, allow))
            if not allow:
                assert set(f1) <= set(features)  # only the model's own features
    # an unselected feature that beats every selected one takes the dropped feature's column
    obj.coef[9, 0] = 100.0
    W2, f2, ch, _ = refill(EditPlan(plan_W, features, [2], [0, 1], 3), obj, allow_unselected=True,
                           allow_redundant=True)
    assert ch[0] == {**ch[0], "feature": 9, "column": 1, "source": "unselected", "replaces_column_of": 2}
    assert f2[1] == 9 and W2[0, 1]


def test_refill_excludes_features_redundant_with_a_dropped_one():
    features = np.array([0, 2, 4, 6, 8])
    W = np.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 0, 0, 1, 1]], bool)
    plan_W = W.copy()
    plan_W[:, 1] = False  # drop feature 2
    obj = objective(10, 4)
    obj.coef[9, :] = 100.0  # the objective's favourite everywhere ...
    obj.P[9, 2] = obj.P[2, 9] = 0.5  # ... is a disallowed pair with the dropped feature: the same information
    plan = EditPlan(plan_W, features, [2], [0, 1], 3)
    _, f1, ch, _ = refill(plan, obj)
    assert 9 not in f1 and all(c["feature"] != 9 for c in ch)
    _, f2, ch, _ = refill(plan, obj, allow_redundant=True)
    assert 9 in f2 and ch[0]["feature"] == 9


def test_refill_finds_the_completion_a_greedy_choice_would_block():
    # classes 0 and 1 lose column 1; class 0's favourite (column 3) would leave class 1 only rows that exist
    features = np.array([0, 2, 4, 6, 8])
    W = np.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 0, 0, 1, 1]], bool)
    plan_W = W.copy()
    plan_W[:, 1] = False
    obj = objective(10, 4)
    obj.coef[:] = 0.0
    obj.coef[6, 0] = 5.0
    W1, _, _, _ = refill(EditPlan(plan_W, features, [2], [0, 1], 3), obj, allow_unselected=False)
    assert len({bytes(r) for r in W1}) == 4 and W1[0, 4] and W1[1, 0]


def test_refill_never_makes_two_rows_equal():
    features = np.arange(4)
    W = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0]], bool)
    obj = objective(4, 3)
    obj.coef[:] = 0.0
    obj.coef[2, 0] = 5.0  # class 0's favourite would copy class 1's row {0, 2}
    plan_W = W.copy()
    plan_W[:, 1] = False  # drop feature 1 (classes 0 and 2)
    W1, _, _, _ = refill(EditPlan(plan_W, features, [1], [0, 2], 2), obj, allow_unselected=False)
    assert len({bytes(r) for r in W1}) == 3 and set(np.flatnonzero(W1[0])) == {0, 3}


# ------------------------------------------------------------------------------------------------- the CLI
def test_drop_feature_refills_verifies_and_keeps_unedited_logits_bit_identical(qpm, parent, tmp_path):
    head = parent["head"]
    counts = head.weight.sum(0)
    fid = int(head.features[int(np.argmax(counts))])  # the feature most classes use
    users = [head.class_names[c] for c in np.flatnonzero(head.weight[:, int(np.argmax(counts))])]
    out = tmp_path / "child"
    res = qpm(["edit", parent["run"], "-o", out, "--drop-feature", f"f{fid}", "--verify", "--json"])
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    assert tree(parent["run"]) == parent["tree"]  # the parent is never written
    assert {d["class"] for d in s["diff"]} == set(users)
    assert all(d["removed"] == [fid] and len(d["added"]) == 1 for d in s["diff"])
    child = read_head(out)
    assert (child.weight.sum(1) == head.per_class).all() and len({bytes(r) for r in child.weight}) == head.n_classes
    assert fid not in {f for r in rows(child) for f in r}
    doc = json.loads((out / artifact.EDIT).read_text())
    assert doc["parent"]["digest"] == model_digest(parent["run"]) and doc["kind"] == "edit"
    assert doc["weights_digest"] == weights_digest(out / artifact.MODEL)
    assert not (out / "model.onnx").exists() and (out / artifact.SELECTION).is_file()
    v = s["verify"]
    assert v["unedited_logits"]["identical"] and v["unedited_logits"]["classes"] == head.n_classes - len(users)
    assert all(r["before"] > 0 and r["after"] == 0.0 for r in v["reliance"])
    assert s["metrics"]["Accuracy"] == pytest.approx(v["accuracy"]["after"])
    # the same check done independently: the unedited classes' logits over the test cache, hashed
    keep = [c for c in range(head.n_classes) if head.class_names[c] not in users]
    a, b = test_logits(parent["run"], parent["test_cache"]), test_logits(out, parent["test_cache"])
    assert logits_digest(a, keep) == logits_digest(b, keep)
    assert not np.array_equal(a, b)
    assert v["n_changed"] == int((a.argmax(1) != b.argmax(1)).sum())


def test_set_swap_and_no_refill_apply_in_order_and_keep_the_column_layout(qpm, parent, tmp_path):
    head = parent["head"]
    feats = [int(f) for f in head.features]
    r0, r1 = head.row(0), head.row(1)
    new_row = [*r0[:-1], next(f for f in feats if f not in r0)]
    swap_new = next(f for f in feats if f not in r1)
    expect = [set(r) for r in rows(head)]
    expect[0] = set(new_row)
    expect[1] = set(r1) - {r1[0]} | {swap_new}
    # a feature to drop without refill that leaves every row non-empty and distinct
    for drop in feats:
        after = [r - {drop} for r in expect]
        if drop not in new_row and drop != swap_new and any(drop in r for r in expect) and all(after) \
                and len({frozenset(r) for r in after}) == len(after):
            break
    else:
        pytest.fail("the trained run has no feature to drop without refill")
    out = tmp_path / "child"
    res = qpm(["edit", parent["run"], "-o", out, "--set", f"0={','.join(map(str, new_row))}",
               "--swap", "1", str(r1[0]), f"f{swap_new}", "--drop-feature", str(drop), "--no-refill",
               "--metrics", "none", "--json"])
    assert res.returncode == 0, res.stderr
    child = read_head(out)
    assert (child.features == head.features).all()  # columns unchanged: the dropped feature is a zero column
    assert rows(child) == after
    s = json.loads(res.stdout)
    assert drop in s["unused_features"] and s["metrics"] == {} and s["refill"] == []
    assert (out / artifact.PROTOTYPES).is_dir()  # adapter and features unchanged: prototypes carried over


def test_refit_with_the_same_seed_gives_the_same_weights(qpm, parent, tmp_path):
    head = parent["head"]
    fid = int(head.features[int(np.argmax(head.weight.sum(0)))])
    digests = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        t0 = time.perf_counter()
        res = qpm(["edit", parent["run"], "-o", tmp_path / name, "--drop-feature", fid, "--refill-from",
                   "selected", "--refit", "1", "--seed", seed, "--metrics", "none", "--json"])
        assert res.returncode == 0, res.stderr
        assert time.perf_counter() - t0 < 60
        s = json.loads(res.stdout)
        assert s["refit"]["epochs"] == 1 and s["refit"]["seed"] == seed and len(s["refit"]["history"]) == 1
        assert all(r["source"] == "selected" for r in s["refill"])
        digests.append(s["weights_digest"])
    assert digests[0] == digests[1] != digests[2]
    a, b = (artifact.read_safetensors(tmp_path / n / artifact.MODEL) for n in "ab")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    parent_state = artifact.read_safetensors(parent["run"] / artifact.MODEL)
    assert not a["mlp.0.weight"].equal(parent_state["mlp.0.weight"])  # the refit changed the adapter
    doc = json.loads((tmp_path / "a" / artifact.EDIT).read_text())
    assert doc["prototypes"] == "rebuilt"  # the adapter changed: the parent's prototypes describe another model
    proto = json.loads((tmp_path / "a" / artifact.PROTOTYPES / "prototypes.json").read_text())
    assert {int(f) for f in proto["features"]} == {int(f) for f in head.features}
    assert tree(parent["run"]) == parent["tree"]


def test_add_class_keeps_old_logits_bit_identical_and_chooses_a_free_row(qpm, parent, new_class_images, tmp_path):
    head = parent["head"]
    out = tmp_path / "plus"
    res = qpm(["add-class", "red triangle group", new_class_images["train"], parent["run"], "-o", out, "--json"])
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    assert tree(parent["run"]) == parent["tree"]
    child = read_head(out)
    assert child.class_names == [*head.class_names, "red triangle group"]
    assert (child.weight[:-1] == head.weight).all() and child.weight[-1].sum() == head.per_class
    assert len({bytes(r) for r in child.weight}) == head.n_classes + 1
    assert sorted(f["feature"] for f in s["features"]) == sorted(child.row(head.n_classes))
    shares = [len(set(child.row(head.n_classes)) & set(head.row(c))) for c in range(head.n_classes)]
    assert s["nearest"] == {"class": head.class_names[int(np.argmax(shares))], "shares": max(shares)}
    # the bias's quality is the benchmark's (bench_edit's hold-out): this parent is a tiny model (about 54 % test
    # accuracy, 3 features per class) whose free rows need not separate the new class, and on one torch build the
    # fewest-mistakes bias won none of the 5 given images; fit_bias itself is tested below
    assert s["old_classes"]["identical"] and 0.0 <= s["bias"]["given_recall"] <= 1.0
    assert s["bias"]["train_images"] > 0 and s["bias"]["train_images_taken"] <= s["bias"]["train_images"]
    old = list(range(head.n_classes))
    a, b = test_logits(parent["run"], parent["test_cache"]), test_logits(out, parent["test_cache"])
    assert logits_digest(a, old) == logits_digest(b[:, :-1], old)
    assert b.shape[1] == head.n_classes + 1
    assert (out / artifact.PROTOTYPES).is_dir() and json.loads((out / artifact.EDIT).read_text())["kind"] == \
        "add-class"
    text = qpm(["add-class", "other", new_class_images["train"], parent["run"], "-o", tmp_path / "p2", "--metrics",
                "none"])
    assert text.returncode == 0 and f"shares {max(shares)} with" in text.stdout


def test_derived_runs_work_with_every_command(qpm, parent, new_class_images, tmp_path):
    head = parent["head"]
    edited, added = tmp_path / "edited", tmp_path / "added"
    fid = int(head.features[0])
    assert qpm(["edit", parent["run"], "-o", edited, "--drop-feature", fid, "--metrics", "none"]).returncode == 0
    assert qpm(["add-class", "new", new_class_images["train"], parent["run"], "-o", added,
                "--metrics", "none"]).returncode == 0
    for run in (edited, added):
        res = qpm(["evaluate", run, "--metrics", "Accuracy", "--json", "-q"])
        assert res.returncode == 0, res.stderr
        res = qpm(["export", run, "--onnx", "--no-adapter", "--json", "-q"])
        assert res.returncode == 0, res.stderr
        res = qpm(["predict", new_class_images["test"], "-m", run / "model.onnx", "--json", "-q"])
        assert res.returncode == 0, res.stderr
        preds = json.loads(res.stdout)["predictions"]
        assert len(preds) == 8 and all("top_k" in p for p in preds)
        res = qpm(["explain", "-m", run, "--class", "0", "-o", tmp_path / f"ex-{run.name}", "-q"])
        assert res.returncode == 0, res.stderr
    rows_ = {r["name"]: r for r in json.loads(qpm(["runs", tmp_path, "--json"]).stdout)["runs"]}
    assert rows_["edited"]["edit"] == "edit" and rows_["added"]["edit"] == "add-class"
    assert rows_["edited"]["status"] == "complete" and rows_["added"]["parent"] == str(parent["run"].resolve())
    classes = {p["top_k"][0]["class"] for p in preds}
    assert classes <= {*head.class_names, "new"}


# ------------------------------------------------------------------------------------------- hostile input
HOSTILE = [
    (["--set", "no such class=1,3,4"], "no class matches"),
    (["--drop-feature", "99"], "out of range 0..23"),
    (["--drop-feature", "x"], "not a feature id"),
    (["--swap", "0", "FIRST", "UNSELECTED"], "is not one of the model's 8 selected features"),
    (["--set", "0=SECOND_ROW"], "use the same features"),
    (["--set", "0=1,3"], "exactly 3 different features"),
    ([], "nothing to edit"),
    (["--drop-feature", "FIRST", "--refill-from", "nowhere"], "--refill-from"),
]


@pytest.mark.parametrize("extra, needle", HOSTILE)
def test_hostile_edits_are_one_line_exit_2_and_write_nothing(qpm, parent, tmp_path, extra, needle):
    head = parent["head"]
    unselected = next(f for f in range(head.n_dense) if f not in set(head.features.tolist()))
    subst = {"FIRST": str(head.row(0)[0]), "UNSELECTED": str(unselected),
             "0=SECOND_ROW": "0=" + ",".join(map(str, head.row(1)))}
    args = [subst.get(a, a) for a in extra]
    out = tmp_path / "out"
    res = qpm(["edit", parent["run"], "-o", out, *args])
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and needle in res.stderr, res.stderr
    assert not out.exists() and tree(parent["run"]) == parent["tree"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder


def test_output_folders_that_would_lose_files_are_refused(qpm, parent, tmp_path, new_class_images):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    fid = str(parent["head"].row(0)[0])
    cases = [
        (["edit", parent["run"], "-o", user, "--drop-feature", fid], "not a run made by qpm edit"),
        (["edit", parent["run"], "-o", parent["run"], "--drop-feature", fid], "the parent run itself"),
        (["edit", parent["run"], "-o", parent["run"] / "sub", "--drop-feature", fid], "inside the parent run"),
        (["edit", parent["run"], "--drop-feature", fid], "NEW_RUN is required"),
        (["add-class", parent["head"].class_names[2].upper(), new_class_images["train"], parent["run"], "-o",
          tmp_path / "x"], "already exists"),
        (["add-class", "new", tmp_path / "missing", parent["run"], "-o", tmp_path / "x"], "does not exist"),
        (["add-class", "new", user, parent["run"], "-o", tmp_path / "x"], "holds no images"),
        (["add-class", "new", new_class_images["train"], parent["run"], "-o", user], "not a run made by qpm edit"),
    ]
    for args, needle in cases:
        res = qpm(args)
        assert res.returncode == 2 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, \
            (args, res.stderr)
    assert (user / "notes.txt").read_text() == "keep me" and sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "x").exists() and tree(parent["run"]) == parent["tree"]
    # --force replaces the folder; a folder that holds a derived run is replaced without it
    assert qpm(["edit", parent["run"], "-o", user, "--drop-feature", fid, "--force", "--metrics", "none"]) \
        .returncode == 0
    assert not (user / "notes.txt").exists() and (user / artifact.EDIT).is_file()
    assert qpm(["edit", parent["run"], "-o", user, "--drop-feature", fid, "--no-refill", "--metrics", "none"]) \
        .returncode == 0
    assert json.loads((user / artifact.EDIT).read_text())["operations"]["refill"] is False
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_a_failed_edit_leaves_the_existing_output_and_no_staging_folder(parent, tmp_path, monkeypatch):
    from qpmcli.edit import EditRequest, run_edit
    from qpmcli.settings import QpmSettings

    fid = str(parent["head"].row(0)[0])
    out = tmp_path / "child"
    settings = QpmSettings(device="cpu")
    run_edit(EditRequest(run=str(parent["run"]), out=str(out), drop=(fid,), metrics="none", device="cpu"), settings,
             progress=False)
    before = tree(out)

    def boom(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "save_model", boom)
    with pytest.raises(KeyboardInterrupt):
        run_edit(EditRequest(run=str(parent["run"]), out=str(out), drop=(fid,), refill=False, metrics="none",
                             device="cpu"), settings, progress=False)
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["child"]


# -------------------------------------------------------------------------------------------- add-class parts
def test_best_row_is_the_exact_best_free_subset():
    rng = np.random.default_rng(1)
    for K, k, C in ((8, 3, 20), (10, 4, 60), (7, 2, 12)):
        values = rng.normal(size=K)
        subsets = np.array(list(itertools.combinations(range(K), k)))
        sums = values[subsets].sum(1)
        taken = subsets[np.argsort(-sums)[:C - 2]]  # the best C - 2 subsets are taken, plus two random ones
        taken = np.concatenate([taken, subsets[rng.choice(len(subsets), 2, replace=False)]])
        W = np.zeros((len(taken), K), bool)
        W[np.arange(len(taken))[:, None], taken] = True
        free = [i for i, s in enumerate(map(frozenset, subsets)) if s not in set(map(frozenset, taken))]
        cols, skipped = best_row(values, W, k)
        assert sums[free].max() == pytest.approx(values[cols].sum())
        assert skipped >= C - 2
    # K = 50, k = 5 against 200 taken rows: a few hundred subsets visited, not C(50, 5) = 2.1 M
    values = rng.normal(size=50)
    W = np.zeros((200, 50), bool)
    combos = np.array(list(itertools.combinations(np.argsort(-values)[:12], 5)))
    for i, s in enumerate(combos[np.argsort(-values[combos].sum(1), kind="stable")[:200]]):
        W[i, s] = True  # the 200 best subsets are taken
    t0 = time.perf_counter()
    cols, skipped = best_row(values, W, 5)
    assert time.perf_counter() - t0 < 1.0 and 0 < skipped <= 200
    taken = {frozenset(np.flatnonzero(r)) for r in W}
    assert frozenset(cols) not in taken
    free_sums = [values[list(c)].sum() for c in combos if frozenset(c.tolist()) not in taken]
    assert values[cols].sum() >= max(free_sums) - 1e-12


def test_fit_bias_puts_the_threshold_in_the_middle_of_the_gap():
    pos = np.array([-3.0, -2.5, -2.0])
    neg = np.array([1.0, 2.0, 3.0, 4.0])
    b, facts = fit_bias(pos, neg)
    assert b == pytest.approx(-0.5) and facts["given_recall"] == 1.0 and facts["train_images_taken"] == 0
    assert facts["margin"] == pytest.approx(1.5)
    # overlapping: a given image is not won at the price of two old images, but one for one goes to the wider gap
    b, facts = fit_bias(np.array([0.0, 5.0]), np.array([4.0, 4.5, 6.0, 7.0]))
    assert 0.0 < b < 4.0 and facts["given_recall"] == 0.5 and facts["train_images_taken"] == 0

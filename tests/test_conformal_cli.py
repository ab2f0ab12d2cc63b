"""``qpm conformal`` and ``--coverage`` on a real trained run (``trained_run``: shapes, tiny ViT, test split, caches):
the calibration file, its numbers against an independent pass over the caches, determinism, predict from the run and
from its ONNX export, explain's set tree, evaluate's set metrics, ``qpm train --cal-fraction`` and every bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_run

from qpmcli import conformal as C


def _conformal(qpm, run: Path, *args: str):
    return qpm(["conformal", str(run), "--device", "cpu", *args])


def _one_error_line(res, *words: str) -> None:
    """Exit 2 and one line on stderr (commands run with -q print nothing else), naming ``words``."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert all(w in lines[0] for w in words), (words, lines[0])


@pytest.fixture(scope="module")
def outputs(trained_run):
    """The final model's outputs on the train and test caches, by evaluate's loop (not conformal's)."""
    from qpmcli.artifact import load_model
    from qpmcli.evaluate import collect_outputs
    from qpmcli.modelfile import metadata_from_run

    model, info = load_model(trained_run["run"], "final")
    return {"meta": metadata_from_run(model, info), "train": collect_outputs(model, trained_run["train_cache"]),
            "test": collect_outputs(model, trained_run["test_cache"])}


@pytest.fixture(scope="module")
def calibrated(trained_run, tmp_path_factory):
    """A copy of the run calibrated with lac and then hier at alpha 0.1, and exported to ONNX afterwards."""
    from conftest import invoke, isolated_environ

    root = tmp_path_factory.mktemp("calibrated")
    run = copy_run(trained_run["run"], root / "run")
    env = isolated_environ(root)
    for score in ("lac", "hier"):
        res = invoke(["conformal", str(run), "--alpha", "0.1", "--score", score, "--device", "cpu", "--json"], env,
                     root)
        assert res.returncode == 0, res.stderr
    res = invoke(["export", str(run), "--onnx", "--no-adapter", "-q", "--device", "cpu"], env, root)
    assert res.returncode == 0, res.stderr
    images = root / "images"
    images.mkdir()
    for i in range(6):
        trained_run["test"][i].image.save(images / f"test{i}.png")
    return {"run": run, "onnx": run / "model.onnx", "images": images}


# ------------------------------------------------------------------------------------------------ qpm conformal
def test_conformal_writes_the_exact_threshold_and_the_test_coverage(trained_run, outputs, qpm, tmp_path):
    run = copy_run(trained_run["run"], tmp_path / "run")
    res = _conformal(qpm, run, "--alpha", "0.1", "--score", "lac", "--seed", "5")
    assert res.returncode == 0, res.stderr
    assert "no guarantee" in res.stdout and "seen in training" in res.stdout
    doc = json.loads((run / "conformal.json").read_text())
    entry = doc["calibrations"][-1]
    assert doc["format"] == "qpm-conformal" and doc["model"]["classes"] == 6
    # 20 % of 20 training images per class, stratified and seeded: 4 per class
    _, rows = C.calibration_split(outputs["train"]["labels"], 0.2, 5)
    assert entry["n"] == rows.size == 24 and entry["rank"] == 23 and entry["seed"] == 5
    assert entry["source"] == {**entry["source"], "split": "train", "held_out": False, "n": 24}
    logits, labels = outputs["train"]["logits"][rows], outputs["train"]["labels"][rows]
    scores = C.class_scores("lac", logits)[np.arange(rows.size), labels]
    assert entry["threshold"] == pytest.approx(np.sort(scores)[22], rel=1e-5)
    test = outputs["test"]
    sets = C.class_scores("lac", test["logits"]) <= entry["threshold"]
    assert entry["test"]["n"] == 48
    assert entry["test"]["coverage"] == pytest.approx(sets[np.arange(48), test["labels"]].mean())
    assert entry["test"]["set_size"] == pytest.approx(sets.sum(1).mean())


def test_the_same_request_gives_byte_identical_json(trained_run, qpm, tmp_path):
    a = copy_run(trained_run["run"], tmp_path / "a")
    b = copy_run(trained_run["run"], tmp_path / "b")
    for score in ("aps", "hier"):
        assert _conformal(qpm, a, "--alpha", "0.2", "--score", score, "--seed", "3").returncode == 0
    res = _conformal(qpm, b, "--alpha", "0.2", "--score", "aps,hier", "--seed", "3", "--json")  # one pass, two
    assert res.returncode == 0 and [e["score"] for e in json.loads(res.stdout)["results"]] == ["aps", "hier"]
    first = (a / "conformal.json").read_bytes()
    assert first == (b / "conformal.json").read_bytes()
    assert _conformal(qpm, a, "--alpha", "0.2", "--score", "hier", "--seed", "3").returncode == 0  # replaces itself
    assert (a / "conformal.json").read_bytes() == first
    assert _conformal(qpm, a, "--alpha", "0.2", "--score", "aps", "--seed", "3").returncode == 0
    doc = json.loads((a / "conformal.json").read_text())
    assert [e["score"] for e in doc["calibrations"]] == ["hier", "aps"]  # the last calibrated is the default
    assert _conformal(qpm, a, "--alpha", "0.2", "--score", "hier", "--seed", "4").returncode == 0
    assert json.loads((a / "conformal.json").read_text())["calibrations"][-1]["seed"] == 4


def test_hier_and_per_class_calibrations_say_what_they_chose(trained_run, qpm, tmp_path):
    run = copy_run(trained_run["run"], tmp_path / "run")
    res = _conformal(qpm, run, "--score", "hier", "--json")
    assert res.returncode == 0, res.stderr
    entry = json.loads(res.stdout)["calibration"]
    assert entry["level"] in range(4) and entry["n_level"] == 12 and entry["n"] == 12
    assert [r["level"] for r in entry["level_search"]] == [0, 1, 2, 3]
    res = _conformal(qpm, run, "--score", "aps", "--per-class")  # 4 images per class < 9: every class in every set
    assert res.returncode == 0, res.stderr
    assert "too few calibration images for 6 class(es)" in res.stdout and "need 9 each" in res.stdout
    entry = json.loads((run / "conformal.json").read_text())["calibrations"][-1]
    assert entry["thresholds"] == [None] * 6 and entry["test"]["set_size"] == 6.0


# ------------------------------------------------------------------------------------------ --coverage everywhere
def test_predict_gives_the_same_sets_from_the_run_and_from_its_onnx_export(calibrated, qpm):
    got = {}
    for model in (calibrated["run"], calibrated["onnx"]):
        res = qpm(["predict", str(calibrated["images"]), "-m", str(model), "--coverage", "0.9", "--device", "cpu",
                   "--json"])
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["calibration"]["score"] == "hier" and doc["calibration"]["coverage"] == 0.9
        got[model.suffix] = [p["set"] for p in doc["predictions"]]
        for p in doc["predictions"]:
            detail = p["set_detail"]
            assert detail["set"] == p["set"] and detail["size"] == len(p["set"])
            if p["set"]:
                top = p["top_k"][0]["class"]
                assert p["set"][0] == top  # hier: the predicted class scores lowest, so it leads any set
                assert all(m["ranking"][: len(detail["shared_features"])] == detail["shared_features"]
                           for m in detail["members"])
    assert got[""] == got[".onnx"]
    res = qpm(["predict", str(calibrated["images"]), "-m", str(calibrated["onnx"]), "--coverage", "0.9",
               "--set-score", "lac", "--device", "cpu"])
    assert res.returncode == 0 and "90% set (lac)" in res.stdout and "no guarantee" in res.stdout


def test_predict_without_a_matching_calibration_names_the_command(calibrated, trained_run, qpm):
    res = qpm(["predict", str(calibrated["images"]), "-m", str(calibrated["run"]), "--coverage", "0.8",
               "--device", "cpu", "-q"])
    _one_error_line(res, f"run `qpm conformal {calibrated['run']} --alpha 0.2`", "it has: 0.9 (lac), 0.9 (hier)")
    res = qpm(["predict", str(calibrated["images"]), "-m", str(trained_run["onnx"]), "--coverage", "0.9",
               "--device", "cpu", "-q"])
    _one_error_line(res, "export again", "it has: none")
    for bad in (["--coverage", "1.5"], ["--coverage", "0"], ["--set-score", "lac"], ["--coverage", "0.9",
                                                                                    "--set-score", "best"]):
        res = qpm(["predict", str(calibrated["images"]), "-m", str(calibrated["onnx"]), "-q", *bad])
        _one_error_line(res)


def test_explain_draws_the_set_as_a_tree(calibrated, qpm, tmp_path):
    out = tmp_path / "ex"
    res = qpm(["explain", str(calibrated["images"] / "test0.png"), "-m", str(calibrated["onnx"]), "--coverage",
               "0.9", "--set-score", "lac", "-o", str(out), "--html", "--device", "cpu"])
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "explanations.json").read_text())
    from PIL import Image

    for item in summary["images"]:
        assert item["set"]["score"] == "lac" and Path(item["set"]["figure"]).name.endswith("_set.png")
        with Image.open(item["set"]["figure"]) as im:
            assert im.width >= 800 and im.height >= 150
        assert "90% set (lac)" in res.stdout
    assert "prediction set (lac)" in (out / "report.html").read_text()


def test_evaluate_reports_the_sets_of_the_last_calibration(calibrated, qpm):
    res = qpm(["evaluate", str(calibrated["run"]), "--metrics", "accuracy,coverage,set_size,set_coherence",
               "--device", "cpu", "--json", "-q"])
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    doc = json.loads((calibrated["run"] / "conformal.json").read_text())
    hier = doc["calibrations"][-1]["test"]
    assert got["calibration"]["score"] == "hier"
    assert got["metrics"]["Coverage"] == pytest.approx(hier["coverage"])
    assert got["metrics"]["Set-Size"] == pytest.approx(hier["set_size"])
    assert got["metrics"]["Set-Coherence"] == (None if hier["set_coherence"] is None
                                               else pytest.approx(hier["set_coherence"]))
    res = qpm(["evaluate", str(calibrated["run"]), "--metrics", "coverage", "--coverage", "0.9", "--set-score",
               "lac", "--device", "cpu", "--json", "-q"])
    assert json.loads(res.stdout)["metrics"]["Coverage"] == pytest.approx(doc["calibrations"][0]["test"]["coverage"])


# ------------------------------------------------------------------------------------ a held-out calibration split
def test_train_holds_the_calibration_split_out_and_conformal_uses_it(trained_run, qpm, tmp_path):
    from qpmcli.artifact import read_json, read_npz
    from qpmcli.train import train_run

    req = trained_run["request"]
    req = replace(req, cal_fraction=0.25, dense=replace(req.dense, epochs=1), finetune=replace(req.finetune, epochs=1))
    run = tmp_path / "run"
    summary = train_run(req, trained_run["settings"], run_dir=run, progress=False)  # the shared token cache
    rows = read_json(run / "config.json")["calibration_split"]["rows"]
    labels = np.asarray(trained_run["train_cache"].labels)
    assert summary["n_calibration"] == len(rows) == 30 and summary["n_train"] == 90
    assert np.bincount(labels[rows]).tolist() == [5] * 6
    dense = read_npz(run / "dense_features.npz")
    assert dense["features"].shape[0] == 90
    assert np.array_equal(dense["labels"], np.delete(labels, rows))
    res = _conformal(qpm, run, "--score", "lac")
    assert res.returncode == 0, res.stderr
    assert "held-out calibration images" in res.stdout and "no guarantee" not in res.stdout
    entry = json.loads((run / "conformal.json").read_text())["calibrations"][0]
    assert entry["source"]["held_out"] and entry["n"] == 30
    _one_error_line(_conformal(qpm, run, "--cal-fraction", "0.3", "-q"), "holds out a calibration split")


def _perturbed_calibration_copies(trained_run, root: Path) -> tuple[Path, Path]:
    """Two copies of the run whose config.json holds out the same calibration split (interior rows of the cache's
    chunks, whose probes stay valid); the second one's train cache differs from the first's only in those rows."""
    import shutil

    cache = trained_run["train_cache"]
    edges = {r for rec in cache.manifest["chunks"] for r in (rec["rows"][0], rec["rows"][1] - 1)}
    rows = [r for r in range(len(cache)) if r % 4 == 1 and r not in edges]
    runs = []
    for name in ("a", "b"):
        run = copy_run(trained_run["run"], root / name)
        config = json.loads((run / "config.json").read_text())
        config["calibration_split"] = {"fraction": 0.25, "seed": 0, "rows": rows}
        if name == "b":
            shutil.copytree(cache.path, root / "cache-b")
            tokens = np.load(root / "cache-b" / "tokens.npy", mmap_mode="r+")
            tokens[rows] = np.random.default_rng(0).normal(size=tokens[rows].shape).astype(tokens.dtype)
            tokens.flush()
            del tokens
            config["caches"]["train"] = str(root / "cache-b")
        (run / "config.json").write_text(json.dumps(config))
        runs.append(run)
    return runs[0], runs[1]


@pytest.mark.parametrize("command", [
    ["edit", "--drop-feature", "FID", "--refill-from", "all", "--refit", "1", "--seed", "3", "--metrics", "none"],
    ["add-class", "new shape", "IMAGES", "--metrics", "none"]], ids=["edit-refit", "add-class"])
def test_edit_and_add_class_never_fit_on_the_runs_calibration_split(trained_run, qpm, tmp_path, command):
    """A child run inherits its parent's config.json and hence its calibration split: `qpm conformal` of the child
    claims the guarantee, so the refit, a new feature's statistics, the new row and its bias must not see those
    images. Changing only their tokens leaves the child's weights bit-identical."""
    from qpmcli import artifact
    from qpmcli.childrun import read_head
    from qpmcli.data import load_dataset

    run_a, run_b = _perturbed_calibration_copies(trained_run, tmp_path)
    head = read_head(run_a)
    if command[0] == "add-class":
        images = tmp_path / "new-class"
        images.mkdir()
        ds = load_dataset("shapes", split="train", **{**trained_run["request"].dataset_options, "n_classes": 7})
        for k, i in enumerate([i for i in range(len(ds)) if ds[i].label == 6][:5]):
            ds[i].image.save(images / f"{k}.png")
        command = [str(images) if a == "IMAGES" else a for a in command]
    fid = str(int(head.features[int(np.argmax(head.weight.sum(0)))]))
    command = [fid if a == "FID" else a for a in command]
    weights, fitted = [], []
    for run in (run_a, run_b):
        at = 3 if command[0] == "add-class" else 1  # where RUN goes: add-class NAME IMAGES RUN, edit RUN
        args = [*command[:at], str(run), *command[at:]]
        res = qpm([*args, "-o", str(run.parent / f"{run.name}-child"), "--json", "-q"])
        assert res.returncode == 0, res.stderr
        weights.append(artifact.read_safetensors(run.parent / f"{run.name}-child" / artifact.MODEL))
        summary = json.loads(res.stdout)  # add-class: the row's alignment values (A over the train images) and bias
        fitted.append([summary.get("features"), summary.get("bias"), summary.get("refill")])
    a, b = weights
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert fitted[0] == fitted[1] and (command[0] != "add-class" or fitted[0][0])


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args", [["--alpha", "0"], ["--alpha", "1"], ["--alpha", "1.5"], ["--alpha", "nan"],
                                  ["--alpha", "-0.1"], ["--score", "best"], ["--cal-fraction", "1.2"],
                                  ["--cal-fraction", "0"]])
def test_bad_options_are_one_line_and_write_nothing(trained_run, qpm, tmp_path, args):
    run = copy_run(trained_run["run"], tmp_path / "run")
    _one_error_line(_conformal(qpm, run, "-q", *args), args[0])
    assert not (run / "conformal.json").exists()


def test_a_run_without_a_test_split_is_refused_before_any_work(trained_run, qpm, tmp_path):
    run = copy_run(trained_run["run"], tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    del config["caches"]["test"]
    (run / "config.json").write_text(json.dumps(config))
    _one_error_line(_conformal(qpm, run, "-q"), "no test token cache")  # evaluate.open_run_caches says so
    assert not (run / "conformal.json").exists()


def test_swapped_caches_are_refused_like_evaluate_refuses_them(trained_run, qpm, tmp_path):
    """Calibrating on the test split (caches swapped in config.json) would report a false coverage: the caches are
    checked against the run (evaluate.open_run_caches) before any output is computed."""
    run = copy_run(trained_run["run"], tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["caches"] = {"train": config["caches"]["test"], "test": config["caches"]["train"]}
    (run / "config.json").write_text(json.dumps(config))
    _one_error_line(_conformal(qpm, run, "-q"), "does not belong to this run")
    assert not (run / "conformal.json").exists()


def test_a_foreign_or_broken_calibration_file_is_refused_and_left_as_it_was(calibrated, trained_run, qpm, tmp_path):
    run = copy_run(trained_run["run"], tmp_path / "run")
    doc = json.loads((calibrated["run"] / "conformal.json").read_text())
    doc["model"]["fingerprint"] = "0" * 24  # another model's calibration
    for text, why in ((json.dumps(doc), "belongs to another model"), ("{not json", "not readable JSON"),
                      (json.dumps({**doc, "format": "other"}), "not a valid qpm calibration")):
        (run / "conformal.json").write_text(text)
        before = (run / "conformal.json").read_bytes()
        for args in (["conformal", str(run), "--device", "cpu", "-q"],
                     ["predict", str(calibrated["images"]), "-m", str(run), "--coverage", "0.9", "--device", "cpu",
                      "-q"]):
            _one_error_line(qpm(args), "conformal.json", why)
            assert (run / "conformal.json").read_bytes() == before


# ------------------------------------------------------------------------------------------------------- the demo
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_demo_sets_cover_90_percent_of_its_held_out_test_images(readme_demo):
    """`qpm demo`'s shapes run at alpha 0.1: calibrated on held-out training images, each score's sets cover
    between 0.87 and 0.95 of the 1,000 test images; the ONNX export carries the three calibrations and the
    explanation has its set tree."""
    from qpmcli.modelfile import read_onnx_metadata

    summary = readme_demo["summary"]
    assert summary is not None, readme_demo["result"].stderr[-3000:]
    assert [c["score"] for c in summary["conformal"]] == ["lac", "aps", "hier"]
    for c in summary["conformal"]:
        assert 0.87 <= c["coverage"] <= 0.95, c
        assert c["n"] in (1200, 600)  # 120 held-out images per class; hier sets its threshold on one half
    doc = json.loads((Path(summary["runs"]["qpm"]) / "conformal.json").read_text())
    assert all(e["source"]["held_out"] and e["test"]["n"] == 1000 for e in doc["calibrations"])
    meta, _ = read_onnx_metadata(summary["onnx"])
    assert [e["score"] for e in meta.conformal["calibrations"]] == ["lac", "aps", "hier"]
    item = summary["explanations"]["images"][0]
    assert item["set"]["score"] == "hier" and Path(item["set"]["figure"]).stat().st_size > 10_000

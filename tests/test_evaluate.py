"""evaluate_model / evaluate_run / `qpm evaluate` on real token caches built from the synthetic shapes dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qpmcli import metrics as M

SHAPES = dict(n_classes=4, per_class=12, test_per_class=6, image_size=56)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Real train/test TokenCaches (tiny random DINOv2, 4x4 grid, patch masks) plus the dataset's attributes."""
    from qpmcli.backbone import load_backbone
    from qpmcli.cache import build_cache
    from qpmcli.data import load_dataset
    from qpmcli.settings import resolve_settings

    settings, _ = resolve_settings()
    root = tmp_path_factory.mktemp("tokens")
    bb = load_backbone("dinov2-vits14", weights="random", settings=settings, arch={"depth": 1}, image_size=56)
    out = {}
    for split in ("train", "test"):
        ds = load_dataset("shapes", split=split, settings=settings, **SHAPES)
        out[split] = build_cache(bb, ds, split, root, progress=False)
        if split == "train":
            # the shapes' own attributes may share no part between 4 classes; these overlap, so SG is defined
            out["class_attributes"] = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]], np.float32)
            out["image_attributes"] = ds.image_attributes()[out[split].indices]
    return out


def _sparse_model(cache, seed=0):
    import torch

    from qpmcli.model import QPMModel

    torch.manual_seed(seed)
    model = QPMModel(cache.tokens.shape[-1], 4, cache.grid, n_layers=1, n_features=12, hidden_size=0)
    w = torch.zeros(4, 6)
    for c in range(4):
        w[c, [c, (c + 1) % 6, 4 + c % 2]] = 1.0  # 3 features per class, feature 5 shared
    model.set_selection([0, 2, 3, 5, 7, 11], w, torch.rand(6), torch.rand(6) + 0.5)
    return model.eval()


def test_evaluate_model_equals_compute_metrics_on_collected_outputs(caches):
    from qpmcli.evaluate import collect_outputs, evaluate_model, head_parameters

    model = _sparse_model(caches["train"])
    got = evaluate_model(model, caches["train"], caches["test"], class_attributes=caches["class_attributes"],
                         image_attributes=caches["image_attributes"], batch_size=7, progress=False)
    train = collect_outputs(model, caches["train"], batch_size=16)
    test = collect_outputs(model, caches["test"], batch_size=16, maps=True)
    assert test["maps"].shape == (24, 6, 4, 4) and test["maps"].dtype == np.float16
    head = head_parameters(model)
    ref = M.compute_metrics(train_features=train["features"], train_labels=train["labels"],
                            test_logits=test["logits"], test_labels=test["labels"],
                            test_maps=test["maps"].astype(np.float32), test_masks=caches["test"].masks,
                            class_attributes=caches["class_attributes"],
                            image_attributes=caches["image_attributes"], **head)
    assert list(got) == list(M.ALL_KEYS)
    for key in M.ALL_KEYS:
        assert got[key] is not None, key
        assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    assert got["NFeatures"] == 6.0 and got["PerClass"] == 3.0
    assert got["Accuracy"] == pytest.approx(float(np.mean(test["logits"].argmax(1) == test["labels"])))


def test_evaluate_model_without_masks_or_attributes_reports_not_applicable(caches):
    from qpmcli.evaluate import evaluate_model

    model = _sparse_model(caches["train"], seed=1)
    test = caches["test"]
    no_masks = type(test)(test.path, test.tokens, test.labels, None, test.indices, test.manifest)
    got = evaluate_model(model, caches["train"], no_masks, which="all", progress=False)
    assert got["Plausibility"] is None and got["SegOverlap-max"] is None
    assert got["Structural-Grounding"] is None and got["Alignment"] is None
    assert got["SID@5"] == 0.0  # every class has 3 < 5 features: no eligible image (METHOD B8)
    fast = evaluate_model(model, caches["train"], test, which="fast", progress=False)
    assert "Contrastiveness" not in fast and "SID@5" not in fast and fast["Accuracy"] == got["Accuracy"]


def test_linear_probe_maps_are_the_raw_patch_tokens(caches):
    """The "DINO GradCAM" baseline: no MLP, CLS probe; its maps are the backbone's patch tokens."""
    from qpmcli.evaluate import collect_outputs, evaluate_model
    from qpmcli.model import QPMModel, linear_probe_config

    test = caches["test"]
    model = QPMModel(**linear_probe_config(test.tokens.shape[-1], 4, test.grid)).eval()
    out = collect_outputs(model, test, batch_size=10, maps=True)
    np.testing.assert_array_equal(out["maps"], M.tokens_to_maps(np.asarray(test.tokens), test.grid))
    np.testing.assert_allclose(out["features"], np.asarray(test.tokens[:, 0], np.float32))
    got = evaluate_model(model, caches["train"], test, which="segmentation_overlap,sparsity", progress=False)
    assert got["NFeatures"] == 384.0 and 0.0 <= got["Plausibility"] <= 1.0


def _write_run(run: Path, caches, model) -> None:
    from qpmcli import artifact

    artifact.save_model(model, run, "final", info={"class_names": ["a", "b", "c", "d"], "dataset": "shapes"})
    artifact.atomic_write_json(run / artifact.CONFIG, {
        "request": {"dataset": "shapes", "dataset_options": SHAPES, "seed": 0, "data_root": None},
        "caches": {"train": str(caches["train"].path), "test": str(caches["test"].path)}})


def test_qpm_evaluate_cli_prints_json_and_merges_metrics_json(caches, qpm, tmp_path):
    from qpmcli.data import load_dataset

    run = tmp_path / "run"
    model = _sparse_model(caches["train"], seed=2)
    _write_run(run, caches, model)
    sg = M.structural_grounding(model.head_weight().numpy(), load_dataset("shapes", **SHAPES).class_attributes())
    (run / "metrics.json").write_text(json.dumps({"dense": {"Accuracy": 0.5}, "final": {"Old": 1.0}}))
    res = qpm(["evaluate", str(run), "--metrics", "Accuracy,Plausibility,Structural-Grounding", "--json",
               "--device", "cpu"])
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out["metrics"]) == {"Accuracy", "Plausibility", "Structural-Grounding"}
    assert isinstance(out["metrics"]["Accuracy"], float) and isinstance(out["metrics"]["Plausibility"], float)
    # the run's dataset supplies the class attributes (None when no two shapes classes share a part)
    assert out["metrics"]["Structural-Grounding"] == (None if np.isnan(sg) else pytest.approx(sg))
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["dense"] == {"Accuracy": 0.5}
    assert saved["final"] == {"Old": 1.0, **out["metrics"]}
    table = qpm(["evaluate", str(run), "--metrics", "essential", "--device", "cpu"])
    assert table.returncode == 0 and "Class-Independence" in table.stdout and "%" in table.stdout


def test_qpm_evaluate_user_errors_are_one_line_exit_2(caches, qpm, tmp_path):
    res = qpm(["evaluate", str(tmp_path / "missing")])
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    run = tmp_path / "run"
    _write_run(run, caches, _sparse_model(caches["train"]))
    res = qpm(["evaluate", str(run), "--metrics", "bogus"])
    assert res.returncode == 2 and "unknown metric 'bogus'" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_qpm_train_then_qpm_evaluate_reproduces_the_training_metrics(qpm, tmp_path):
    """End to end on a trained tiny run: `qpm evaluate` recomputes exactly what `qpm train` stored."""
    run = tmp_path / "run"
    opts = ["--backbone", "dinov2-vits14", "--weights", "random", "--backbone-option", "image_size=56",
            "--backbone-option", 'arch={"depth": 1}', "--dataset", "shapes"]
    for key, val in SHAPES.items():
        opts += ["--dataset-option", f"{key}={val}"]
    res = qpm(["train", *opts, "--layers", "1", "--hidden-size", "16", "--dense-features", "12", "--features", "6",
               "--per-class", "2", "--dense-epochs", "2", "--finetune-epochs", "1", "--time-limit", "5",
               "--run-dir", str(run), "--device", "cpu", "--quiet", "--json"])
    assert res.returncode == 0, res.stderr
    trained = json.loads((run / "metrics.json").read_text())
    res = qpm(["evaluate", str(run), "--json", "--device", "cpu"])
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert any("SID@5" in n for n in out["notes"]) and out["metrics"]["SID@5"] == 0.0
    for key, val in out["metrics"].items():
        if key in trained["final"]:
            assert val == (None if trained["final"][key] is None else pytest.approx(trained["final"][key])), key
    assert out["metrics"]["NFeatures"] == 6.0 and out["metrics"]["PerClass"] == 2.0
    assert out["metrics"]["Plausibility"] is not None and out["metrics"]["Alignment"] is not None

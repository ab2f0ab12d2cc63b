"""A third-party plugin package (tests/thirdparty_plugin, written only from the hook docstrings) installed with pip
into a temporary folder, as a user would install it: its backbone, dataset and selector work through ``qpm``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Entry points are read once per interpreter: the installed package is seen by `qpm` processes started with it on
# PYTHONPATH, so these tests run real processes (their own CI step).
pytestmark = pytest.mark.e2e

SOURCE = Path(__file__).resolve().parent / "thirdparty_plugin"
TRAIN = ["train", "--backbone", "stripes-cnn", "--weights", "random", "--backbone-option", "width=6",
         "--dataset", "stripes", "--dataset-option", "n_classes=3", "--dataset-option", "per_class=8",
         "--selector", "stripes-greedy", "--features", "4", "--per-class", "2", "--dense-features", "8",
         "--hidden-size", "16", "--dense-epochs", "1", "--finetune-epochs", "1", "--batch-size", "8",
         "--device", "cpu", "--metrics", "fast", "--quiet", "--json"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """``pip install --target``: a built wheel with its ``qpm`` entry point in a dist-info, on no sys.path yet."""
    work = tmp_path_factory.mktemp("thirdparty")
    src = work / "src"
    shutil.copytree(SOURCE, src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    target = work / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                          "--no-build-isolation", "--target", str(target), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    (info,) = target.glob("qpm_stripes-*.dist-info")
    assert "[qpm]" in (info / "entry_points.txt").read_text()
    return target


def test_the_installed_package_provides_a_backbone_a_dataset_and_a_selector(qpm_process, site):
    qpm = qpm_process
    res = qpm(["plugins", "--json"], env_extra={"PYTHONPATH": str(site)})
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    rows = {(kind, row["name"]): row for kind in ("backbones", "datasets", "selectors") for row in data[kind]}
    for key in (("backbones", "stripes-cnn"), ("datasets", "stripes"), ("selectors", "stripes-greedy")):
        assert rows[key]["package"] == "qpm-stripes", key


def test_the_backbone_factory_is_called_exactly_as_documented(site, tmp_path):
    """The hook docstring's keyword-only signature (no **kwargs) receives every documented keyword and its option."""
    code = f"""
import json, sys
sys.path.insert(0, {str(site)!r})
import torch
from qpmcli.backbone import load_backbone
from qpmcli.settings import QpmSettings
import qpm_stripes

settings = QpmSettings(cache_dir={str(tmp_path / "cache")!r}, weights_dir={str(tmp_path / "w")!r}, device="cpu")
bb = load_backbone("stripes-cnn", weights="random", settings=settings, dataset="stripes", width=4)
cls, patches = bb(torch.zeros(2, 3, 32, 32))
print(json.dumps({{"calls": qpm_stripes.CALLS, "cls": list(cls.shape), "patches": list(patches.shape),
                  "grid": list(bb.grid), "digest": bb.weights_digest, "mean": bb.preprocess_config["mean"]}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["calls"] == [{"name": "stripes-cnn", "weights": "random", "preprocess": "official",
                             "dataset": "stripes", "amp": False, "width": 4}]
    assert out["cls"] == [2, 4] and out["patches"] == [2, 16, 4] and out["grid"] == [4, 4]
    assert out["digest"] == "random-width4" and out["mean"] == [0.485, 0.456, 0.406]


def test_qpm_trains_with_the_third_party_backbone_dataset_and_selector(qpm_process, site, tmp_path):
    qpm = qpm_process
    run = tmp_path / "run"
    res = qpm([*TRAIN, "--run-dir", str(run)], env_extra={"PYTHONPATH": str(site)}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert summary["n_classes"] == 3 and len(summary["selection"]["features"]) == 4
    selection = json.loads((run / "selection.json").read_text())
    assert selection["solver"] == "stripes-greedy"
    model = json.loads((run / "model.json").read_text())
    assert model["backbone"] == "stripes-cnn" and model["weights_digest"] == "random-width6"
    assert model["grid"] == [4, 4] and model["class_names"] == ["period-2", "period-4", "period-6"]

"""`qpm train` end to end as a real subprocess: run files, resume, bad input, and (slow) kill/resume and accuracy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qpmcli.errors import DatasetError

TINY = ["--backbone", "dinov2-vits14", "--weights", "random", "--backbone-option", "image_size=56",
        "--backbone-option", 'arch={"depth": 1, "embed_dim": 32, "num_heads": 2}',
        "--dataset", "shapes", "--dataset-option", "n_classes=4", "--dataset-option", "per_class=12",
        "--dataset-option", "test_per_class=6", "--dataset-option", "image_size=56",
        "--selector", "topk", "--features", "6", "--per-class", "2", "--dense-features", "16", "--hidden-size", "32",
        "--dense-epochs", "2", "--finetune-epochs", "2", "--batch-size", "8", "--device", "cpu",
        "--metrics", "fast", "--quiet"]


def test_train_writes_every_run_file_and_a_loadable_model(qpm, tmp_path):
    run = tmp_path / "run"
    res = qpm(["train", *TINY, "--run-dir", str(run), "--json"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    for name in ("config.json", "dense.safetensors", "dense.json", "selection.json", "model.safetensors",
                 "model.json", "metrics.json", "log.jsonl", "log.csv", "dense_features.npz"):
        assert (run / name).is_file(), name
    assert not list((run / "checkpoints").iterdir())  # finished phases leave no checkpoint behind
    protos = json.loads((run / "prototypes" / "prototypes.json").read_text())
    assert summary["prototypes"]["written"] and protos["format"] == "qpm-prototypes"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in log] == [("dense", 1), ("dense", 2), ("finetune", 1), ("finetune", 2)]
    assert (run / "log.csv").read_text().splitlines()[0].startswith("phase,epoch,loss,train_acc")
    feats = np.load(run / "dense_features.npz", allow_pickle=False)
    assert feats["features"].shape == (48, 16) and feats["labels"].tolist() == [i % 4 for i in range(48)]
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["final"]["Accuracy"] <= 1.0 and "Accuracy" in metrics["dense"]
    assert summary["metrics"] == metrics and summary["selection"]["features"] == json.loads(
        (run / "selection.json").read_text())["features"]

    from qpmcli.artifact import load_model

    model, info = load_model(run)
    assert info["selection"]["features"] == summary["selection"]["features"]
    assert info["backbone"] == "dinov2-vits14" and info["grid"] == [4, 4] and len(info["class_names"]) == 4
    assert info["image_size"] == [56, 56] and info["preprocess"]["mode"] == "official"
    assert info["weights_digest"].startswith("random") and info["metrics"]["Accuracy"] == metrics["final"]["Accuracy"]
    assert model.head_weight().sum(1).tolist() == [2.0] * 4
    config = json.loads((run / "config.json").read_text())
    assert config["request"]["dense"]["epochs"] == 2 and Path(config["caches"]["train"]).is_dir()

    again = qpm(["train", *TINY, "--run-dir", str(run)], timeout=120)
    assert again.returncode == 2 and "--resume" in again.stderr


@pytest.mark.parametrize("changes, message", [
    ({"backbone": "nope"}, "unknown backbone 'nope'; available: "),
    ({"dataset": "nope"}, "unknown dataset 'nope'; available: "),
    ({"selector": "nope"}, "unknown selector 'nope'; available: "),
    ({"selector_options": {"bound": "lp"}}, "selector 'topk' has no option 'bound'"),
    ({"selector": "qpm", "selector_options": {"bound": "best"}}, "option 'bound' must be one of lp, sdp, auto"),
    ({"n_selected": 3, "per_class": 4}, "--per-class 4 exceeds --features 3"),
    ({"n_selected": 40}, "--features 40 exceeds the 16 features of the dense model"),
    ({"n_features": 100000}, "--dense-features 100000 cannot be trained"),
    ({"head": "svm"}, "--head 'svm' is not one of qpm, linear-probe"),
    ({"metrics": "accuracy,bogus"}, "unknown metric 'bogus'"),
    ({"pooling": "median"}, "--pooling 'median' is not one of avg, max, cls, mean-avg"),
    ({"time_limit": float("nan")}, "--time-limit must be a positive finite number of seconds, got nan"),
    ({"time_limit": float("inf")}, "--time-limit must be a positive finite number of seconds, got inf"),
])
def test_bad_train_requests_fail_before_any_work(tmp_path, changes, message):
    from dataclasses import replace

    from qpmcli.errors import QpmError
    from qpmcli.settings import QpmSettings
    from qpmcli.train import TrainRequest, train_run

    req = replace(TrainRequest(backbone="dinov2-vits14", dataset="shapes", selector="topk", n_selected=6,
                               per_class=2, n_features=16), **changes)
    run = tmp_path / "bad"
    settings = QpmSettings(cache_dir=tmp_path / "cache", runs_dir=tmp_path / "runs", device="cpu")
    with pytest.raises(QpmError) as err:
        train_run(req, settings, run_dir=run, progress=False)
    assert message in str(err.value)
    assert not run.exists() and not (tmp_path / "cache").exists()


def test_an_empty_training_class_is_named():
    from qpmcli.train import _check_classes

    with pytest.raises(DatasetError, match="1 class\\(es\\) have no training images \\(b\\)"):
        _check_classes(np.array([0, 0, 2]), ["a", "b", "c"], "train")


def _digest(path: Path) -> dict[str, bytes]:
    from safetensors.numpy import load_file

    return {k: v.tobytes() for k, v in load_file(str(path)).items()}


FINETUNE_EPOCHS = "30"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_killed_run_resumes_to_the_uninterrupted_result(qpm, isolated_env, tmp_path):
    # enough finetune steps (6 per epoch) that the poll below sees a checkpoint before the run ends, however the
    # machine schedules it (at 3 epochs the whole finetune took about 0.1 s and a loaded machine missed it)
    full = tmp_path / "full"
    res = qpm(["train", *TINY, "--finetune-epochs", FINETUNE_EPOCHS, "--run-dir", str(full)], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    killed = tmp_path / "killed"
    env = {**isolated_env, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "qpmcli.cli", "train", *TINY, "--finetune-epochs", FINETUNE_EPOCHS,
                             "--checkpoint-steps", "2", "--run-dir", str(killed)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "checkpoints" / "finetune.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if marker.is_file() and json.loads(marker.read_text())["step"] > 0:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.json").exists()
    res = qpm(["train", *TINY, "--finetune-epochs", FINETUNE_EPOCHS, "--checkpoint-steps", "2",
               "--run-dir", str(killed), "--resume"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _digest(killed / "model.safetensors") == _digest(full / "model.safetensors")

    def rows(run):
        lines = (run / "log.jsonl").read_text().splitlines()
        return [(r["phase"], r["epoch"], r["loss"]) for r in map(json.loads, lines)]

    assert rows(killed) == rows(full)
    assert json.loads((killed / "selection.json").read_text())["features"] == json.loads(
        (full / "selection.json").read_text())["features"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_backbone_learns_shapes_well_above_chance(qpm, tmp_path):
    run = tmp_path / "effnet"
    res = qpm(["train", "--backbone", "efficientnet-lite0", "--dataset", "shapes", "--dataset-option", "n_classes=6",
               "--dataset-option", "per_class=20", "--dataset-option", "test_per_class=10", "--selector", "topk",
               "--features", "12", "--per-class", "3", "--dense-features", "64", "--hidden-size", "256",
               "--dense-epochs", "8", "--finetune-epochs", "5", "--dense-lr", "3e-3", "--device", "cpu",
               "--metrics", "fast", "--quiet", "--run-dir", str(run), "--json"], timeout=1700)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads(res.stdout)["metrics"]
    # measured: dense 0.90, final 0.85 (chance = 1/6)
    assert metrics["dense"]["Accuracy"] > 0.6 and metrics["final"]["Accuracy"] > 0.5


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_qsenn_runs_its_four_iterations_with_its_schedule(qpm, tmp_path):
    run = tmp_path / "qsenn"
    res = qpm(["train", *TINY, "--selector", "qsenn", "--time-limit", "20", "--run-dir", str(run)], timeout=1700)
    assert res.returncode == 0, res.stderr[-3000:]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    epochs = {p: max(r["epoch"] for r in log if r["phase"] == p) for p in {r["phase"] for r in log}}
    assert epochs == {"dense": 2, "finetune-1": 10, "finetune-2": 10, "finetune-3": 10, "finetune-4": 40}
    lrs = [next(r["lr"] for r in log if r["phase"] == f"finetune-{i}") for i in (1, 2, 3, 4)]
    assert lrs == pytest.approx([5e-3 * 0.9 ** i for i in range(4)])
    from qpmcli.artifact import load_model

    model, info = load_model(run)
    assert info["selection"]["trainable_norm"] and info["selection"]["has_bias"] and model.dropout.p == 0.1
    assert not list((run / "checkpoints").iterdir())


@pytest.mark.slow
def test_linear_probe_trains_only_a_head_on_the_cls_token(qpm, tmp_path):
    run = tmp_path / "probe"
    res = qpm(["train", *TINY, "--head", "linear-probe", "--run-dir", str(run), "--json"], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert summary["selection"] is None and summary["metrics"]["final"] == summary["metrics"]["dense"]
    from qpmcli.artifact import load_model

    model, info = load_model(run)
    assert info["model"]["n_layers"] == 0 and info["model"]["pooling"] == "cls" and model.n_features == 32
    assert [n for n, _ in model.named_parameters()] == ["linear.weight", "linear.bias"]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in log} == {"dense"} and "fdl" not in log[0]


def test_a_run_resumes_with_another_work_limit_but_not_with_other_selector_options(tmp_path):
    """The qpm selector's work_limit says how long the selection runs, like --time-limit: a run made before selector
    options existed (no selector_options in config.json), e.g. an earlier demo, resumes with the demo's work limit;
    another certified bound is another run."""
    from qpmcli.errors import ArtifactError
    from qpmcli.train import TrainRequest, _check_run_dir

    old = TrainRequest(selector="qpm", time_limit=20.0).to_dict()
    old.pop("selector_options")
    (tmp_path / "config.json").write_text(json.dumps({"request": old}))
    _check_run_dir(tmp_path, TrainRequest(selector="qpm", selector_options={"work_limit": 2}, time_limit=300.0),
                   resume=True)
    with pytest.raises(ArtifactError, match=r"\(selector_options differ\)"):
        _check_run_dir(tmp_path, TrainRequest(selector="qpm", selector_options={"bound": "lp"}), resume=True)

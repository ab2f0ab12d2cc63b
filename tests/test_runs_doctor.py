"""`qpm runs` and `qpm doctor` as real subprocesses: statuses read from run files, --json shapes, exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


def write_run(folder: Path, *, head: str = "qpm", stages: tuple[str, ...] = ("dense", "select", "finetune", "evaluate"),
              reselected: bool = False, checkpoint: bool = False, accuracy: float = 0.8) -> Path:
    """A run folder with the JSON files `qpm train` writes after each stage (weights are not needed by `qpm runs`)."""
    folder.mkdir(parents=True)
    req = {"backbone": "dinov2-vits14", "dataset": "shapes", "selector": "qpm", "head": head}
    (folder / "config.json").write_text(json.dumps({"request": req}))
    feats = [1, 3, 5, 7]
    if "dense" in stages:
        (folder / "dense.json").write_text(json.dumps({"format": "qpm-model", "stage": "dense"}))
    if "select" in stages:
        (folder / "selection.json").write_text(json.dumps({"features": feats, "weight": [[1, 1, 0, 0]]}))
    if "finetune" in stages:
        (folder / "model.json").write_text(json.dumps({"format": "qpm-model", "stage": "final",
                                                       "selection": {"features": feats}}))
        if "select" in stages:
            os.utime(folder / "selection.json", (1e9, 1e9))  # selected before finetuning
        if reselected:  # a selection.json written after the model (e.g. by hand)
            os.utime(folder / "selection.json", (2e9, 2e9))
    if "evaluate" in stages:
        (folder / "metrics.json").write_text(json.dumps({"dense": {"Accuracy": 0.9},
                                                         "final": {"Accuracy": accuracy, "SID@5": 0.5}}))
    if checkpoint:
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "finetune.json").write_text("{}")
    return folder


def test_runs_reads_statuses_from_run_files(qpm, tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "a-complete")
    write_run(runs / "b-dense-only", stages=("dense",))
    write_run(runs / "c-finetuning", stages=("dense", "select"), checkpoint=True)
    write_run(runs / "d-extracted", stages=())
    write_run(runs / "e-stale", reselected=True)
    write_run(runs / "f-probe", head="linear-probe", stages=("dense", "finetune", "evaluate"))
    (runs / "g-broken").mkdir()
    (runs / "g-broken" / "config.json").write_text("{not json")
    (runs / "not-a-run").mkdir()
    other = write_run(tmp_path / "elsewhere" / "h-other", accuracy=0.5)
    state = tmp_path / "xdg-cache" / "qpm"
    state.mkdir(parents=True)
    (state / "current-run.json").write_text(json.dumps({"format": "qpm-current-run", "run": str(runs / "a-complete"),
                                                        "onnx": None}))
    (runs / "a-complete" / "model.onnx").write_bytes(b"onnx")

    out = qpm(["runs", "--json", str(tmp_path / "elsewhere")], env_extra={"QPM_RUNS_DIR": str(runs)})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    rows = {r["name"]: r for r in data["runs"]}
    assert set(rows) == {"a-complete", "b-dense-only", "c-finetuning", "d-extracted", "e-stale", "f-probe",
                         "g-broken", "h-other"}
    assert rows["a-complete"]["status"] == "complete" and rows["a-complete"]["current"]
    assert rows["a-complete"]["onnx"] == str(runs / "a-complete" / "model.onnx")
    assert rows["a-complete"]["accuracy"] == 0.8 and rows["a-complete"]["sid5"] == 0.5
    assert rows["b-dense-only"]["status"] == "interrupted at select"
    assert rows["c-finetuning"]["status"] == "interrupted at finetune (checkpoint)"
    assert rows["d-extracted"]["status"] == "interrupted at dense"
    assert rows["e-stale"]["status"].startswith("stale")
    assert rows["f-probe"]["status"] == "complete" and rows["f-probe"]["selector"] is None
    assert rows["g-broken"]["status"].startswith("unreadable")
    assert rows["h-other"]["path"] == str(other) and not rows["h-other"]["current"]
    assert sum(r["current"] for r in rows.values()) == 1 and data["current"] == str(runs / "a-complete")

    text = qpm(["runs", str(tmp_path / "elsewhere")], env_extra={"QPM_RUNS_DIR": str(runs), "COLUMNS": "250"})
    assert text.returncode == 0 and "interrupted at finetune" in text.stdout and "h-other" in text.stdout


def test_runs_without_runs_and_with_a_bad_folder(qpm, tmp_path):
    out = qpm(["runs"], env_extra={"QPM_RUNS_DIR": str(tmp_path / "none")})
    assert out.returncode == 0 and "no runs under" in out.stdout and "qpm train" in out.stdout
    assert json.loads(qpm(["runs", "--json"]).stdout)["runs"] == []
    out = qpm(["runs", str(tmp_path / "missing")])
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_runs_imports_no_torch(isolated_env, tmp_path):
    import subprocess
    import sys

    write_run(tmp_path / "runs" / "r")
    code = ("import sys\nfrom qpmcli.cli import app\ntry:\n    app(['runs', '--json', sys.argv[1]], prog_name='qpm')\n"
            "except SystemExit:\n    pass\n"
            "print('HEAVY=' + ','.join(m for m in ('torch', 'numpy', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "runs")], env=isolated_env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY="


def _names(report):
    return {c["name"]: c for c in report["checks"]}


def test_doctor_json_reports_everything_and_exit_code_follows_the_defaults(qpm, tmp_path):
    # the paper defaults need DINOv2 weights and a CUB root, which this clean home does not have
    out = qpm(["doctor", "--json"], timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    report = json.loads(out.stdout)
    checks = _names(report)
    assert not report["ready"] and "backbone dinov2-vitb14-reg" in report["missing"]
    assert "dataset cub200" in report["missing"]
    assert "dinov2_vitb14_reg4_pretrain.pth" in checks["backbone dinov2-vitb14-reg"]["detail"]
    for name in ("python", "torch", "cudnn", "gpu", "onnxruntime", "ortools", "cache dir"):
        assert name in checks, name
    assert checks["torch"]["ok"] and checks["onnxruntime"]["ok"] and checks["ortools"]["ok"]
    assert checks["backbone efficientnet-lite0"]["ok"] and checks["backbone efficientnet-lite0"]["detail"].endswith(
        ".pth")
    for provider in ("onnxruntime CUDA", "onnxruntime TensorRT"):
        c = checks[provider]
        assert c["ok"] in (True, False)
        if not c["ok"]:  # the reason ONNX Runtime gives, not a bare "unavailable"
            assert c["reason"] and len(c["reason"]) > 10
    assert "GiB free" in checks["cache dir"]["detail"] and checks["cache dir"]["ok"]

    # what the demo needs is all here: exit 0
    out = qpm(["doctor", "--json", "-b", "efficientnet-lite0", "-d", "shapes"], timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    report = json.loads(out.stdout)
    assert report["ready"] and report["missing"] == [] and _names(report)["dataset shapes"]["ok"]
    text = qpm(["doctor", "-b", "efficientnet-lite0", "-d", "shapes"], env_extra={"COLUMNS": "200"}, timeout=300)
    assert text.returncode == 0 and "ready" in text.stdout and "onnxruntime" in text.stdout


@pytest.mark.parametrize("good", [True, False])
def test_doctor_runs_the_data_check_of_the_configured_root(qpm, tmp_path, good):
    from PIL import Image

    root = tmp_path / "data"
    for split in ("train", "test"):
        for cls in ("ant", "bee"):
            (root / split / cls).mkdir(parents=True)
            if good or split == "train":
                Image.new("RGB", (16, 16), (200, 10, 10)).save(root / split / cls / "0.png")
    out = qpm(["doctor", "--json", "-b", "efficientnet-lite0", "-d", "imagefolder", "--data-root", str(root)],
              timeout=300)
    report = json.loads(out.stdout)
    checks = _names(report)
    assert checks["dataset imagefolder"]["ok"] is good and (out.returncode == 0) is good
    assert str(root) in checks["dataset imagefolder"]["detail"]
    assert checks["dataset cub200"]["ok"] is False and not checks["dataset cub200"]["needed"]

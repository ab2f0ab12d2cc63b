"""int8 export (``qpm export RUN --onnx --int8``): ONNX Runtime quantization verified against fp32.

Runs are built directly like in test_export (a real QPMModel + a valid binary W, saved with the info keys train.py
writes): the demo backbone EfficientNet-Lite0 with its shipped ImageNet weights at 128x128 (4x4 grid), and tiny ViTs
(2 blocks, random weights) of every ViT family that exports. Everything runs for real: the quantizer, ONNX Runtime,
the CLI as a subprocess.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from builders import CLASS_NAMES, FEATURES, W, make_demo_run
from builders import make_tiny_run as make_run
from conftest import invoke as run_qpm


def cli_env(tmp: Path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("QPM_")}
    for key, sub in (("XDG_CONFIG_HOME", "xdg-config"), ("XDG_CACHE_HOME", "xdg-cache"), ("HOME", "home")):
        env[key] = str(tmp / sub)
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory):
    """``qpm export RUN --onnx --int8 --json`` on the demo backbone, as a subprocess."""
    root = tmp_path_factory.mktemp("int8-demo")
    run = make_demo_run(root / "run", seed=2)  # smallest top-2 logit margin on the test split ~0.2
    env = cli_env(root)
    res = run_qpm(["export", str(run), "--onnx", "--int8", "--no-adapter", "--json"], env=env, cwd=root)
    assert res.returncode == 0, res.stderr
    return run, json.loads(res.stdout), env


def test_export_int8_verifies_and_writes_next_to_fp32(demo_export):
    run, report, _ = demo_export
    fp32, int8 = run / "model.onnx", run / "model.int8.onnx"
    assert report["files"]["full"] == str(fp32) and report["files"]["full_int8"] == str(int8)
    assert fp32.is_file() and int8.is_file()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # nothing staged is left behind
    q = report["int8"]
    assert q["method"] == "dynamic" and q["passed"] is True
    v = q["verify"]
    assert v["n"] == 100 and q["verify_set"] == "100 images of shapes (test split)"
    assert v["top1_agreement"] >= 0.99
    assert 0 < v["max_prob_diff"] < 0.3 and v["top_feature_agreement"] >= 0.95
    assert v["contribution_rank_correlation"] > 0.8
    assert 0 < v["max_abs_diff"]["logits"]  # it really ran in int8


def test_int8_metadata_records_precision_and_agreement(demo_export):
    from qpmcli.modelfile import read_onnx_metadata, read_onnx_props

    run, report, _ = demo_export
    props = read_onnx_props(run / "model.int8.onnx")
    assert json.loads(props["qpm.precision"]) == "int8"
    doc = json.loads(props["qpm.quantization"])
    assert doc["method"] == "dynamic" and doc["op_types"] == ["MatMul", "Gemm"]
    for key in ("top1_agreement", "max_prob_diff", "top_feature_agreement", "contribution_rank_correlation", "n"):
        assert doc[key] == report["int8"]["verify"][key]
    assert doc["min_agreement"] == 0.99 and doc["verify_set"] == "100 images of shapes (test split)"
    meta, graph = read_onnx_metadata(run / "model.int8.onnx")
    assert graph == "full" and meta.extra["precision"] == "int8"
    assert meta.class_names == CLASS_NAMES and meta.features == FEATURES
    np.testing.assert_array_equal(meta.weight, W)
    fp32_meta, _ = read_onnx_metadata(run / "model.onnx")
    assert fp32_meta.extra["precision"] == "fp32"
    np.testing.assert_array_equal(meta.sigma, fp32_meta.sigma)


def test_int8_graph_keeps_pooling_and_head_in_fp32(demo_export):
    """Inspect the quantized graph: integer MatMuls in the adapter, but the pooling, standardisation and the binary
    class-feature layer are the fp32 graph's nodes with float inputs and the exact W."""
    import onnx
    from onnx import numpy_helper

    from qpmcli.quantize import fp32_nodes, precision_report

    run, _, _ = demo_export
    q = onnx.load(str(run / "model.int8.onnx"))
    f = onnx.load(str(run / "model.onnx"))
    rep = precision_report(q)
    assert rep["head_fp32"] is True and rep["quantized_nodes"] > 0
    assert rep["op_types"].get("MatMulInteger", 0) + rep["op_types"].get("DynamicQuantizeMatMul", 0) > 0
    keep = fp32_nodes(q)
    assert keep == fp32_nodes(f)  # the same nodes, untouched
    by_name = {n.name: n for n in q.graph.node}
    assert by_name[keep[0]].op_type == "ReduceMean" and by_name[keep[0]].output[0] == "features"
    (head,) = [by_name[k] for k in keep if "logits" in by_name[k].output]
    assert head.op_type in ("MatMul", "Gemm")
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    w = next(inits[i] for i in head.input if i in inits)
    assert w.dtype == np.float32
    np.testing.assert_array_equal(w.T if w.shape == W.T.shape else w, W)
    assert rep["fp32_ops"]["ReduceMean"] >= 1
    assert "QuantizeLinear" not in rep["op_types"]  # dynamic: no static Q/DQ pairs


def test_predict_and_explain_run_from_the_int8_file_alone(demo_export, tmp_path):
    from PIL import Image

    from qpmcli.data import load_dataset

    run, _, env = demo_export
    alone = tmp_path / "deploy"
    alone.mkdir()
    model = alone / "model.int8.onnx"
    shutil.copy(run / "model.int8.onnx", model)
    ds = load_dataset("shapes", split="test", n_classes=5, test_per_class=2, image_size=96)
    img = tmp_path / "img.png"
    ds[3].image.save(img)
    Image.open(img).verify()
    res = run_qpm(["predict", str(img), "--model", str(model), "--device", "cpu", "--json"], env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["precision"] == "int8" and doc["kind"] == "onnx" and doc["provider"] == "CPUExecutionProvider"
    (pred,) = doc["predictions"]
    assert pred["top_k"][0]["class"] in CLASS_NAMES and len(pred["features"]) == 3
    res = run_qpm(["predict", str(img), "--model", str(model), "--device", "cpu", "-q"], env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "(CPUExecutionProvider, int8)" in res.stdout
    out = tmp_path / "expl"
    res = run_qpm(["explain", str(img), "--model", str(model), "--device", "cpu", "--out", str(out), "--json", "-q"],
                  env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["precision"] == "int8" and doc["provider"] == "CPUExecutionProvider"
    (item,) = doc["images"]
    assert Path(item["figure"]).is_file() and item["class_name"] in CLASS_NAMES
    res = run_qpm(["explain", str(img), "--model", str(model), "--device", "cpu", "--out", str(out), "-q"],
                  env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "CPUExecutionProvider, int8" in res.stdout


def test_failing_agreement_leaves_no_int8_file_and_fp32_byte_identical(tmp_path):
    """A real failure (an outlier weight wrecks per-tensor int8): the export must fail with one line, write no int8
    file and leave the existing fp32 model byte for byte as it was."""
    run = make_demo_run(tmp_path / "run", outlier=1e4)
    env = cli_env(tmp_path)
    res = run_qpm(["export", str(run), "--onnx", "--no-adapter", "-q"], env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    before = (run / "model.onnx").read_bytes()
    listing = sorted(p.name for p in run.iterdir())
    res = run_qpm(["export", str(run), "--onnx", "--no-adapter", "--int8"], env=env, cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    progress = ("exporting", "quantizing to int8:", "int8:")  # the export's log lines
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith(progress)]
    assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr
    assert "int8 verification failed: top-1 agreement with fp32" in lines[0]
    assert "< --min-agreement 99.00%" in lines[0] and "no int8 file was written" in lines[0]
    assert not (run / "model.int8.onnx").exists()
    assert (run / "model.onnx").read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == listing  # no staged or temporary files left


@pytest.mark.parametrize("args, message", [
    (["--int8", "--min-agreement", "1.5"], "--min-agreement must be between 0 and 1"),
    (["--calibrate", "train"], "--calibrate needs --int8"),
    (["--int8", "--calibrate", "no/such/folder"], "--calibrate no/such/folder: expected 'train' or"),
    (["--int8", "--calibrate-n", "0"], "--calibrate-n must be at least 1"),
])
def test_bad_int8_flags_are_one_line_errors(args, message, tmp_path):
    run = make_run(tmp_path / "run")
    res = run_qpm(["export", str(run), "--onnx", "--no-adapter", *args], env=cli_env(tmp_path), cwd=tmp_path)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (run / "model.onnx").exists() and not (run / "model.int8.onnx").exists()


VIT_FAMILIES = ["dinov2-vits14-reg", "dinov2-vits14", "dino-vits16"]


@pytest.mark.parametrize("backbone", VIT_FAMILIES)
def test_int8_of_every_vit_family(backbone, tmp_path):
    """DINOv2 with and without registers and DINO: dynamic int8 of the blocks' projections and MLPs, LayerNorm and
    attention softmax left alone, verified on the run's test split."""
    import onnx

    from qpmcli.export import export_onnx
    from qpmcli.quantize import precision_report

    size = 64 if backbone.startswith("dino-") else 56
    run = make_run(tmp_path / "run", backbone, {"image_size": size, "arch": {"depth": 2}})
    report = export_onnx(run, adapter=False, int8={})
    q = report["int8"]
    assert q["passed"] and q["verify"]["top1_agreement"] >= 0.99 and q["verify"]["n"] == 20
    fp = precision_report(run / "model.onnx")
    rep = precision_report(run / "model.int8.onnx")
    assert rep["head_fp32"]
    # every LayerNorm and attention softmax of the fp32 graph is still there, in float
    assert rep["fp32_ops"]["LayerNormalization"] == fp["fp32_ops"]["LayerNormalization"] == 5
    assert rep["fp32_ops"]["Softmax"] == fp["fp32_ops"]["Softmax"] == 2
    # 2 blocks x (qkv, proj, fc1, fc2) + the adapter's Linear layers, all with int8 weights
    int8_weights = [i for i in onnx.load(str(run / "model.int8.onnx")).graph.initializer
                    if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(int8_weights) == q["quantization"]["quantized_nodes"] >= 8
    assert q["size_ratio"] < 0.45


def test_calibrate_builds_static_qdq_and_says_which_it_kept(tmp_path):
    """--calibrate: a static QDQ model is built from the run's train split and measured against the dynamic one; the
    decision (and why) is in the report and the metadata, and the kept model satisfies its claim."""
    from qpmcli.export import export_onnx
    from qpmcli.modelfile import read_onnx_props

    run = make_run(tmp_path / "run")
    report = export_onnx(run, adapter=False, int8={"calibrate": "train", "n_calibrate": 8})
    q = report["int8"]
    cal = q["calibration"]
    assert cal["set"] == "8 images of shapes (train split)"
    assert set(cal["candidates"]) == {"dynamic", "static-qdq"}
    speed, res = cal["images_per_second"], cal["candidates"]
    if q["method"] == "static-qdq":
        assert speed["static-qdq"] > speed["dynamic"]
        assert res["static-qdq"]["top1_agreement"] >= res["dynamic"]["top1_agreement"]
        assert cal["decision"].startswith("kept static QDQ")
    else:
        assert cal["decision"].startswith("kept dynamic (static QDQ was not faster") or \
            cal["decision"].startswith("kept dynamic (static QDQ was less accurate")
    doc = json.loads(read_onnx_props(run / "model.int8.onnx")["qpm.quantization"])
    assert doc["method"] == q["method"] and doc["calibration"] == cal["decision"]


def test_int8_verify_images_and_calibrate_folders_through_the_cli(tmp_path):
    """`--verify-images DIR` and `--calibrate DIR` (both crashed with an ImportError of a removed helper): the int8
    model is compared with fp32 on the folder's images and calibrated on the other folder's."""
    from PIL import Image

    run = make_run(tmp_path / "run")
    rng = np.random.default_rng(0)
    for folder, n in (("check", 6), ("calib", 5)):
        (tmp_path / folder / "sub").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / folder / "sub" /
                                                                                     f"{i}.png")
    (tmp_path / "check" / "notes.txt").write_text("not an image: left out of the folder's images\n")
    res = run_qpm(["export", str(run), "--onnx", "--no-adapter", "--int8", "--verify-images", str(tmp_path / "check"),
                   "--calibrate", str(tmp_path / "calib"), "--calibrate-n", "4", "--min-agreement", "0", "--json",
                   "-q"], env=cli_env(tmp_path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    q = json.loads(res.stdout)["int8"]
    assert q["verify_set"] == "6 images from --verify-images" and q["verify"]["n"] == 6
    assert q["calibration"]["set"] == "4 images from --calibrate"
    assert (run / "model.int8.onnx").is_file()


def test_quantize_module_imports_no_torch():
    import subprocess

    code = ("import sys, qpmcli.quantize; "
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'torch imported'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr

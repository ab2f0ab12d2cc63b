"""ONNX export: graphs, dynamic batch, baked position embedding, metadata round trip, parity with PyTorch, CLI.

Runs are built directly (a real QPMModel with random weights + a valid binary W, saved with artifact.save_model and
the info keys train.py writes) on a real DINOv2-with-registers architecture: a 2-block ViT-S/14 at 56x56 here, the
full ViT-S/14 shape at 224x224 in the slow test.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from builders import CLASS_NAMES, FEATURES, W
from builders import make_tiny_run as make_run

from qpmcli.errors import ArtifactError, WeightsError


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One tiny run exported with fp16 + verification (the default check set: the run's shapes test split)."""
    from qpmcli.export import export_onnx

    root = tmp_path_factory.mktemp("export")
    run = make_run(root / "run")
    report = export_onnx(run, root / "out" / "model.onnx", fp16=True, verify=True)
    return run, report


def test_export_writes_full_adapter_and_fp16_graphs(exported):
    run, report = exported
    files = {k: Path(v) for k, v in report["files"].items()}
    assert set(files) == {"full", "adapter", "full_fp16", "adapter_fp16"}
    assert [p.name for p in files.values()] == ["model.onnx", "model.adapter.onnx", "model.fp16.onnx",
                                                "model.fp16.adapter.onnx"]
    assert all(p.is_file() and p.stat().st_size > 1000 for p in files.values())
    # fp16 weights halve the file (the backbone dominates)
    assert report["sizes_mb"]["model.fp16.onnx"] < 0.6 * report["sizes_mb"]["model.onnx"]


def test_full_graph_has_dynamic_batch_and_expected_outputs(exported):
    import onnxruntime as ort

    _, report = exported
    sess = ort.InferenceSession(report["files"]["full"], providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "image" and inp.shape[1:] == [3, 56, 56] and isinstance(inp.shape[0], str)
    assert [o.name for o in sess.get_outputs()] == ["logits", "maps", "features"]
    for b in (1, 5):
        logits, maps, feats = sess.run(None, {"image": np.zeros((b, 3, 56, 56), np.float32)})
        assert logits.shape == (b, 5) and maps.shape == (b, 6, 4, 4) and feats.shape == (b, 6)
        # the pooled features are the spatial mean of the maps (average pooling), non-negative after ReLU
        np.testing.assert_allclose(feats, maps.mean(axis=(2, 3)), atol=1e-6)
        assert feats.min() >= 0


def test_adapter_graph_takes_cls_first_tokens(exported):
    import onnxruntime as ort

    _, report = exported
    sess = ort.InferenceSession(report["files"]["adapter"], providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "tokens" and inp.shape[1:] == [17, 384]
    logits, maps, feats = sess.run(None, {"tokens": np.random.default_rng(0).normal(size=(3, 17, 384))
                                          .astype(np.float32)})
    assert logits.shape == (3, 5) and maps.shape == (3, 6, 4, 4) and feats.shape == (3, 6)


def test_position_embedding_is_baked_no_resize_in_graph(exported):
    """The DINOv2-register export failure came from exporting the runtime pos-embed interpolation: none is left."""
    import onnx

    _, report = exported
    proto = onnx.load(report["files"]["full"])
    ops = {n.op_type for n in proto.graph.node}
    assert "Resize" not in ops and "Upsample" not in ops
    pos = [i for i in proto.graph.initializer if "pos_embed" in i.name]
    # 4x4 patch positions at 56x56 (the 37x37 checkpoint grid was resized before export; timm keeps no CLS entry
    # for the register models)
    assert pos and list(pos[0].dims) == [1, 16, 384]


def test_verify_meets_parity_targets_on_real_inputs(exported):
    _, report = exported
    assert report["verified"] is True
    assert report["check_set"] == "16 images of shapes (test split)"
    v32, v16, vad = report["verify"]["fp32"], report["verify"]["fp16"], report["verify"]["adapter_fp32"]
    assert v32["n"] == 16 and v32["provider"] == "CPUExecutionProvider"
    assert v32["max_abs_diff"]["logits"] <= 1e-4 and v32["top1_agreement"] == 1.0 and v32["passed"]
    assert vad["max_abs_diff"]["logits"] <= 1e-4 and vad["passed"]
    assert v16["max_abs_diff"]["logits"] <= 1e-2 and v16["top1_agreement"] == 1.0 and v16["passed"]
    assert v16["max_abs_diff"]["logits"] > v32["max_abs_diff"]["logits"]  # it really ran in half precision


def test_metadata_round_trip(exported):
    from qpmcli import __version__
    from qpmcli.artifact import load_model
    from qpmcli.modelfile import metadata_from_run, read_onnx_metadata

    run, report = exported
    model, info = load_model(run)
    want = metadata_from_run(model, info)
    for key in ("full", "adapter", "full_fp16"):
        meta, graph = read_onnx_metadata(report["files"][key])
        assert graph == ("adapter" if key == "adapter" else "full")
        assert meta.class_names == CLASS_NAMES and meta.features == FEATURES
        np.testing.assert_array_equal(meta.weight, W)
        np.testing.assert_array_equal(meta.mu, want.mu)
        np.testing.assert_array_equal(meta.sigma, want.sigma)
        assert meta.bias is None
        assert meta.preprocess == info["preprocess"] and meta.preprocess["mean"] == [0.485, 0.456, 0.406]
        assert meta.preprocess["size"] == [56, 56] and meta.preprocess["mode"] == "official"
        assert meta.backbone == "dinov2-vits14-reg" and meta.weights_digest == info["weights_digest"]
        assert meta.weights_digest.startswith("random-")
        assert meta.image_size == (56, 56) and meta.grid == (4, 4) and meta.qpm_version == __version__
        assert meta.extra["precision"] == ("fp16" if key == "full_fp16" else "fp32")


def test_export_refuses_weights_with_another_digest(tmp_path, exported):
    """A weights file that is not the run's (here: a real checkpoint vs a random-weight run) is a clear error."""
    import timm
    import torch

    from qpmcli.export import export_onnx

    run, _ = exported
    net = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=518, depth=2)
    ckpt = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(net.state_dict(), ckpt)
    with pytest.raises(WeightsError, match="does not match the run's random-"):
        export_onnx(run, tmp_path / "x.onnx", weights=str(ckpt))
    assert not (tmp_path / "x.onnx").exists()


def test_failed_verification_removes_files_and_raises(tmp_path, monkeypatch, exported):
    """A mismatch fails the export; forced here with a negative tolerance (the real comparison still runs)."""
    from qpmcli import export as export_mod

    run, _ = exported
    monkeypatch.setitem(export_mod.TOLERANCE, "fp32", -1.0)
    out = tmp_path / "m.onnx"
    pattern = r"ONNX verification failed \(fp32: max \|logit diff\| [0-9.e-]+ \(limit -1.0\)"
    with pytest.raises(ArtifactError, match=pattern):
        export_mod.export_onnx(run, out, verify=True, adapter=False, n_check=4)
    assert not out.exists() and list(tmp_path.glob("*.onnx")) == []


def test_prototypes_are_embedded_in_metadata(tmp_path, exported):
    import shutil

    from PIL import Image

    from qpmcli.export import export_onnx
    from qpmcli.modelfile import read_onnx_metadata

    run = tmp_path / "run"
    shutil.copytree(exported[0], run)
    folder = run / "prototypes"
    folder.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    (folder / "f3_0.png").write_bytes(buf.getvalue())
    doc = {"format": "qpm-prototypes", "format_version": 1,
           "features": {"3": [{"file": "f3_0.png", "class": "square", "activation": 0.75, "patch_box": [0, 0, 8, 8]}]}}
    (folder / "prototypes.json").write_text(json.dumps(doc))
    report = export_onnx(run, tmp_path / "m.onnx", adapter=False)
    assert report["prototypes_embedded"] is True
    meta, _ = read_onnx_metadata(tmp_path / "m.onnx")
    (entry,) = meta.prototypes["3"]
    assert entry["class"] == "square" and entry["activation"] == 0.75
    assert base64.b64decode(entry["png_b64"]) == buf.getvalue()
    from qpmcli.predict import load_classifier

    assert load_classifier(run, "cpu").metadata.prototypes == meta.prototypes  # run dir and ONNX file agree


def test_exported_graph_computes_only_the_selected_features(exported):
    """The last adapter layer is cut to the 6 selected of 16 features; the CLS token skips the MLP (avg pooling)."""
    import onnx
    from onnx import numpy_helper

    _, report = exported
    assert report["pruned_to_selection"] is True
    proto = onnx.load(report["files"]["adapter"])
    shapes = sorted(numpy_helper.to_array(i).shape for i in proto.graph.initializer
                    if numpy_helper.to_array(i).ndim == 2)
    assert (32, 6) in shapes or (6, 32) in shapes  # the last Linear: 32 hidden -> 6 selected
    assert (32, 16) not in shapes and (16, 32) not in shapes


def test_unpruned_and_dense_and_cls_pooled_models_export_with_parity(tmp_path, exported):
    """Every head/pooling path exports and verifies: unpruned sparse, dense (linear-probe-like), CLS pooling."""
    from qpmcli.export import export_onnx
    from qpmcli.modelfile import read_onnx_metadata

    run, _ = exported
    rep = export_onnx(run, tmp_path / "u.onnx", prune=False, adapter=False, verify=True, n_check=4)
    assert rep["pruned_to_selection"] is False and rep["verify"]["fp32"]["passed"]
    dense = make_run(tmp_path / "dense", sparse=False, pooling="mean-avg")
    rep = export_onnx(dense, tmp_path / "d.onnx", verify=True, n_check=4)
    assert rep["pruned_to_selection"] is False and rep["features"] == 16
    assert rep["verify"]["fp32"]["passed"] and rep["verify"]["adapter_fp32"]["passed"]
    meta, _ = read_onnx_metadata(tmp_path / "d.onnx")
    assert meta.features == list(range(16)) and meta.bias is not None and meta.weight.shape == (5, 16)
    assert meta.mu.tolist() == [0.0] * 16 and meta.sigma.tolist() == [1.0] * 16
    cls_run = make_run(tmp_path / "cls", pooling="cls")
    rep = export_onnx(cls_run, tmp_path / "c.onnx", verify=True, adapter=False, n_check=4)
    assert rep["pruned_to_selection"] is True and rep["verify"]["fp32"]["max_abs_diff"]["logits"] <= 1e-4


def test_cli_export_verify_json(qpm, exported, tmp_path):
    run, _ = exported
    out = tmp_path / "cli" / "m.onnx"
    res = qpm(["export", str(run), "--onnx", "--out", str(out), "--verify", "--no-adapter", "--json"])
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["files"] == {"full": str(out)} and out.is_file()
    assert report["verify"]["fp32"]["passed"] and report["verify"]["fp32"]["max_abs_diff"]["logits"] <= 1e-4


def test_cli_export_needs_format_flag(qpm, tmp_path):
    res = qpm(["export", str(tmp_path)])
    assert res.returncode == 2 and "--onnx" in res.stderr and "Traceback" not in res.stderr


def test_export_of_missing_run_is_a_clear_error(tmp_path):
    from qpmcli.export import export_onnx

    with pytest.raises(ArtifactError, match="does not exist"):
        export_onnx(tmp_path / "nope")


@pytest.mark.slow
def test_export_vit_s14_shape_at_224_parity(tmp_path):
    """The real DINOv2 ViT-S/14-reg shape (12 blocks, 16x16 grid, 4 registers) with the default-width adapter."""
    from qpmcli.export import export_onnx

    run = make_run(tmp_path / "run", options={"image_size": 224}, n_features=64, hidden=256)
    report = export_onnx(run, tmp_path / "m.onnx", verify=True, fp16=True, n_check=8)
    assert report["grid"] == [16, 16]
    assert report["verify"]["fp32"]["max_abs_diff"]["logits"] <= 1e-4
    assert report["verify"]["fp16"]["max_abs_diff"]["logits"] <= 1e-2
    assert report["verify"]["fp32"]["top1_agreement"] == report["verify"]["fp16"]["top1_agreement"] == 1.0

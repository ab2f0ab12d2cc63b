"""Fast inference: load_classifier (run dir and ONNX), preprocessing parity, contributions, qpm predict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from builders import CLASS_NAMES, FEATURES, W
from builders import make_tiny_run as make_run
from PIL import Image

from qpmcli.errors import ArtifactError, ConfigError


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny run and its exported full + adapter graphs (no fp16, no verification: test_export covers those)."""
    from qpmcli.export import export_onnx

    root = tmp_path_factory.mktemp("predict")
    run = make_run(root / "run")
    report = export_onnx(run, root / "model.onnx")
    return run, Path(report["files"]["full"]), Path(report["files"]["adapter"])


def odd_images() -> list[Image.Image]:
    """Images of every awkward kind: grayscale, 16-bit, palette with transparency, RGBA, CMYK, 1x1, very wide."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0
    return [rgb, rgb.convert("L"), Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)), pal,
            rgb.convert("RGBA"), rgb.convert("CMYK"), Image.new("RGB", (1, 1), (10, 200, 30)),
            Image.fromarray(rng.integers(0, 256, (8, 500, 3), dtype=np.uint8))]


@pytest.mark.parametrize("mode", ["official", "reference"])
def test_numpy_preprocessing_equals_backbone_preprocessing(mode):
    from qpmcli.backbone import make_preprocess_config, preprocess_image
    from qpmcli.predict import preprocess_array

    cfg = make_preprocess_config(mode, (56, 42), mean=(0.4853, 0.4964, 0.4295), std=(0.23, 0.2258, 0.2625),
                                 minmax=mode == "reference")
    for img in odd_images():
        a = preprocess_array(img, cfg)
        b = preprocess_image(img, cfg).numpy()
        assert a.shape == (3, 56, 42) and a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    if mode == "reference":
        assert a.min() == 0.0 and a.max() == 1.0


def test_run_and_onnx_classifiers_agree(models):
    from qpmcli.predict import load_classifier

    run, onnx_path, adapter_path = models
    torch_clf = load_classifier(run, device="cpu")
    onnx_clf = load_classifier(onnx_path, device="auto")
    adapter_clf = load_classifier(adapter_path, device="cpu")
    assert (torch_clf.kind, torch_clf.provider) == ("torch", "torch-cpu")
    assert (onnx_clf.kind, onnx_clf.provider) == ("onnx", "CPUExecutionProvider")  # no GPU on this machine
    images = odd_images()
    ref = torch_clf.run(images)
    assert ref["logits"].shape == (8, 5) and ref["maps"].shape == (8, 6, 4, 4) and ref["features"].shape == (8, 6)
    for clf in (onnx_clf, adapter_clf):
        out = clf.run(images)
        for key in ("logits", "maps", "features"):
            np.testing.assert_allclose(out[key], ref[key], atol=1e-4, rtol=0)
        assert (out["logits"].argmax(1) == ref["logits"].argmax(1)).all()
    for clf in (torch_clf, onnx_clf, adapter_clf):
        m = clf.metadata
        assert m.class_names == CLASS_NAMES and m.features == FEATURES and m.grid == (4, 4)
        assert m.image_size == (56, 56) and m.backbone == "dinov2-vits14-reg"
        np.testing.assert_array_equal(m.weight, W)
    np.testing.assert_array_equal(onnx_clf.metadata.mu, torch_clf.metadata.mu)
    np.testing.assert_array_equal(onnx_clf.metadata.sigma, torch_clf.metadata.sigma)


def test_adapter_graph_classifies_tokens_and_full_graph_refuses_them(models):
    from qpmcli.predict import load_classifier

    _, onnx_path, adapter_path = models
    tokens = np.random.default_rng(1).normal(size=(2, 17, 384)).astype(np.float32)
    out = load_classifier(adapter_path, "cpu").run_tokens(tokens)
    assert out["logits"].shape == (2, 5)
    with pytest.raises(ConfigError, match="adapter.onnx"):
        load_classifier(onnx_path, "cpu").run_tokens(tokens)


def test_contributions_follow_the_formula_and_sum_to_the_logit(models):
    from qpmcli.predict import describe_prediction, load_classifier

    _, onnx_path, _ = models
    clf = load_classifier(onnx_path, "cpu")
    m = clf.metadata
    f = np.array([[0.5, 0.0, 1.0, 0.25, 2.0, 0.1]], dtype=np.float32)
    c = m.contributions(f, 3)[0]
    want = W[3] * (f[0] - m.mu) / np.maximum(m.sigma, 1e-6)
    np.testing.assert_allclose(c, want, rtol=1e-6)
    assert c[[1, 2, 3]].tolist() == [0.0, 0.0, 0.0]  # class 3 uses features at positions 0, 4, 5 only
    out = clf.run(odd_images()[:2])
    for logits, feats in zip(out["logits"], out["features"], strict=True):
        d = describe_prediction(m, logits, feats, top_k=3)
        top = d["top_k"][0]["index"]
        assert top == int(np.argmax(logits)) and len(d["top_k"]) == 3
        assert len(d["features"]) == 3 and all(x["weight"] == 1.0 for x in d["features"])  # 3 per class here
        assert [x["contribution"] for x in d["features"]] == sorted((x["contribution"] for x in d["features"]),
                                                                    reverse=True)
        assert sum(x["contribution"] for x in d["features"]) == pytest.approx(float(logits[top]), abs=1e-4)
        assert {x["feature"] for x in d["features"]} == {FEATURES[j] for j in np.flatnonzero(W[top])}
        probs = [x["probability"] for x in d["top_k"]]
        assert probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1


def test_predict_reports_bad_images_per_file_and_keeps_going(models, tmp_path):
    from qpmcli.predict import load_classifier, predict

    _, onnx_path, _ = models
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, img in enumerate(odd_images()):
        img.save(folder / ("sub" if i % 2 else ".") / f"{i}.{'tif' if img.mode in ('I;16', 'CMYK') else 'png'}")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    good = folder / "0.png"
    (folder / "truncated.png").write_bytes(good.read_bytes()[:200])
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    res = predict([folder, tmp_path / "missing.png"], load_classifier(onnx_path, "cpu"), top_k=2, batch_size=3)
    by_name = {Path(p["path"]).name: p for p in res["predictions"]}
    assert res["num_images"] == 12 and res["num_failed"] == 4 and "notes.txt" not in by_name
    for bad in ("corrupt.jpg", "empty.png", "truncated.png", "missing.png"):
        assert "error" in by_name[bad] and bad in by_name[bad]["error"]
    for i in range(8):
        p = by_name[f"{i}.{'tif' if i in (2, 5) else 'png'}"]
        assert len(p["top_k"]) == 2 and p["top_k"][0]["class"] in CLASS_NAMES and len(p["features"]) == 3
    assert res["predictions"][-1]["path"].endswith("missing.png")  # input order is kept


def test_load_classifier_errors(tmp_path, models):
    from qpmcli.predict import load_classifier

    with pytest.raises(ArtifactError, match="does not exist"):
        load_classifier(tmp_path / "nope.onnx")
    (tmp_path / "model.txt").write_text("x")
    with pytest.raises(ArtifactError, match="neither a run directory nor an .onnx"):
        load_classifier(tmp_path / "model.txt")
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(ArtifactError, match="cannot load"):
        load_classifier(tmp_path / "broken.onnx")
    with pytest.raises(ConfigError, match="is not a device"):
        load_classifier(models[1], device="gpu")
    with pytest.raises(ConfigError, match="no CUDA device|needs onnxruntime-gpu and a CUDA GPU"):
        load_classifier(models[1], device="cuda")


def test_onnx_without_qpm_metadata_is_refused(tmp_path, models):
    import onnx

    from qpmcli.predict import load_classifier

    proto = onnx.load(str(models[2]))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    with pytest.raises(ArtifactError, match="no qpm metadata"):
        load_classifier(tmp_path / "plain.onnx")


def test_cli_predict_from_onnx_file_alone(qpm, models, tmp_path):
    """A clean folder with nothing but model.onnx and images: no run dir, no weights, no settings."""
    clean = tmp_path / "clean"
    clean.mkdir()
    shutil.copy(models[1], clean / "model.onnx")
    odd_images()[0].save(clean / "a.png")
    odd_images()[6].save(clean / "b.jpg")
    (clean / "c.jpg").write_bytes(b"broken")
    res = qpm(["predict", "a.png", "b.jpg", "c.jpg", "--model", "model.onnx", "--top-k", "3", "--json"], cwd=clean)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["kind"] == "onnx" and out["provider"] == "CPUExecutionProvider"
    assert [Path(p["path"]).name for p in out["predictions"]] == ["a.png", "b.jpg", "c.jpg"]
    assert out["num_failed"] == 1 and "cannot read image" in out["predictions"][2]["error"]
    a = out["predictions"][0]
    assert len(a["top_k"]) == 3 and len(a["features"]) == 3
    assert set(a["features"][0]) == {"feature", "name", "label", "position", "weight", "activation", "contribution"}
    assert a["features"][0]["name"] is None and a["features"][0]["label"] == f"f{a['features'][0]['feature']}"
    res = qpm(["predict", "c.jpg", "--model", "model.onnx"], cwd=clean)
    assert res.returncode == 2 and "none of the 1 images could be read" in res.stderr
    assert "Traceback" not in res.stderr

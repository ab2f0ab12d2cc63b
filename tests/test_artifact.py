"""Run-directory artifacts: atomic writes, safetensors + JSON model files, load_model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qpmcli import artifact
from qpmcli.errors import ArtifactError
from qpmcli.model import QPMModel


def test_atomic_json_and_npz_round_trip_without_temporary_leftovers(tmp_path):
    artifact.atomic_write_json(tmp_path / "a.json", {"x": np.float32(1.5), "y": np.arange(3), "p": tmp_path})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1.5, "y": [0, 1, 2], "p": str(tmp_path)}
    artifact.atomic_write_npz(tmp_path / "f.npz", features=np.ones((2, 3), np.float32), labels=np.array([0, 1]))
    data = artifact.read_npz(tmp_path / "f.npz")
    assert data["features"].shape == (2, 3) and data["labels"].tolist() == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "f.npz"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "x.json"
    artifact.atomic_write_json(target, {"v": 1})
    with pytest.raises(TypeError):
        artifact.atomic_write_json(target, {"v": object()})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_staged_files_replace_all_together_or_none(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    a.write_bytes(b"old a")
    with pytest.raises(RuntimeError), artifact.staged_files() as stage:  # fails after one file was written
        stage.aside(a).write_bytes(b"new a")
        stage.aside(b).write_bytes(b"new b")
        assert stage.sizes_mb() == {"a.onnx": 0.0, "b.onnx": 0.0}
        raise RuntimeError("verification failed")
    assert a.read_bytes() == b"old a" and not b.exists()
    with pytest.raises(FileNotFoundError), artifact.staged_files() as stage:  # a staged write that never happened
        stage.aside(a).write_bytes(b"new a")
        stage.aside(b)
    assert a.read_bytes() == b"old a" and not b.exists()
    with artifact.staged_files() as stage:
        stage.aside(a).write_bytes(b"new a")
        stage.aside(b).write_bytes(b"new b")
        assert stage[b].read_bytes() == b"new b"
    assert a.read_bytes() == b"new a" and b.read_bytes() == b"new b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]  # no staged file left behind


def test_save_and_load_final_model_reproduces_outputs(tmp_path):
    torch.manual_seed(0)
    m = QPMModel(8, 3, (2, 2), n_layers=2, hidden_size=12, n_features=6).eval()
    m.set_selection([1, 2, 5], torch.tensor([[1.0, 0, 1], [0, 1, 1], [1, 1, 0]]), torch.rand(6), torch.rand(6) + 0.5)
    artifact.save_model(m, tmp_path, "final", info={"class_names": ["a", "b", "c"], "backbone": "tiny"})
    loaded, info = artifact.load_model(tmp_path)
    x = torch.randn(4, 5, 8)
    assert torch.equal(loaded(x).logits, m(x).logits)
    assert info["class_names"] == ["a", "b", "c"] and info["selection"]["features"] == [1, 2, 5]
    assert info["grid"] == [2, 2] and "torch" in info["versions"]
    assert not loaded.training


def test_missing_or_mismatching_artifacts_are_clear_errors(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        artifact.load_model(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="missing"):
        artifact.load_model(tmp_path)
    m = QPMModel(8, 3, (2, 2), n_layers=1, n_features=4)
    artifact.save_model(m, tmp_path, "dense")
    doc = json.loads((tmp_path / "dense.json").read_text())
    doc["model"]["n_features"] = 5
    (tmp_path / "dense.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="does not match"):
        artifact.load_model(tmp_path, "dense")


def test_atomic_writes_get_the_usual_file_permissions(tmp_path):
    """mkstemp creates 0600 files; artifacts users share (model.onnx, run files) must follow the umask instead."""
    import os

    from qpmcli.artifact import atomic_write_json

    mask = os.umask(0o022)
    os.umask(mask)
    path = atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert (path.stat().st_mode & 0o777) == 0o666 & ~mask
    assert (path.stat().st_mode & 0o044) == 0o044 or mask & 0o044  # readable by others unless the umask forbids it


def test_model_metadata_with_disagreeing_shapes_is_refused_in_one_line():
    from qpmcli.modelfile import ClassifierMetadata

    doc = {"class_names": ["a", "b", "c"], "features": [4, 9], "weight": [[1, 0], [0, 1], [1, 1]],
           "mu": [0, 0], "sigma": [1, 1], "bias": [0.0, 0.1, 0.2], "preprocess": {}, "backbone": "x",
           "weights_digest": "d", "image_size": [224, 224], "grid": [16, 16]}
    assert ClassifierMetadata.from_json(doc).bias.shape == (3,)
    for key, bad in (("bias", [0.0, 0.1]), ("mu", [0, 0, 0]), ("weight", [[1, 0], [0, 1]])):
        with pytest.raises(ArtifactError, match="shapes disagree") as err:
            ClassifierMetadata.from_json({**doc, key: bad})
        assert "\n" not in str(err.value)

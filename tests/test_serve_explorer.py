"""`qpm serve`'s explorer on a real trained run: the confusion matrix and per-class accuracy (equal to `qpm evaluate`'s
from the run, to `qpm predict`'s from an `.onnx` with a test folder), mistakes, prototype boxes, the title, names,
search and prediction sets; and a dense head whose pages claim nothing that is false for real-valued weights.

The run is a copy of the session's ``trained_run`` (the real pipeline on ``shapes``), calibrated (``qpm conformal``),
one feature named (``qpm name-features --set``) and exported with its adapter graph; each server is a real
``qpm serve`` subprocess on a free loopback port.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_run, invoke, isolated_environ
from test_serve import Server

pytestmark = pytest.mark.timeout(300)
NAMED = "roundish blob"


@pytest.fixture(scope="module")
def explorer_run(trained_run, tmp_path_factory) -> dict:
    """The trained run, calibrated, one feature named, exported with its adapter graph (``model.adapter.onnx``)."""
    from qpmcli.artifact import read_json
    from qpmcli.export import export_onnx

    root = tmp_path_factory.mktemp("explorer")
    run = copy_run(trained_run["run"], root / "run-explorer")
    first = read_json(run / "model.json")["selection"]["features"][0]
    for args in (["conformal", str(run), "--alpha", "0.1", "--cal-fraction", "0.3", "-q", "--json"],
                 ["name-features", str(run), "--set", f"{first}={NAMED}", "-q", "--json"]):
        res = invoke(args, isolated_environ(root), root)
        assert res.returncode == 0, res.stderr
    files = export_onnx(run, settings=trained_run["settings"])["files"]
    return {"run": run, "onnx": Path(files["full"]), "adapter": Path(files["adapter"]), "root": root}


@pytest.fixture(scope="module")
def client(explorer_run, tmp_path_factory):
    import httpx

    srv = Server([str(explorer_run["run"]), "--device", "cpu"], tmp_path_factory.mktemp("explorer-server"))
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        yield c
    srv.stop()


def test_confusion_from_the_run_equals_qpm_evaluate(client, explorer_run, qpm, tmp_path):
    cm = client.get("/api/confusion", params={"wait": "true"}).json()
    ev_run = copy_run(explorer_run["run"], tmp_path / "evaluated")
    res = qpm(["evaluate", str(ev_run), "--metrics", "accuracy", "--json"])
    assert res.returncode == 0, res.stderr
    evaluated = json.loads(res.stdout)
    assert "token cache" in cm["source"] and cm["images"] == evaluated["n_test"] == 48
    assert cm["per_class_accuracy"] == evaluated["per_class_accuracy"]  # the same inputs, the same owner
    matrix = np.asarray(cm["matrix"])
    assert matrix.shape == (6, 6) and matrix.sum(1).tolist() == cm["support"] == [8] * 6
    assert np.allclose(np.diag(matrix) / matrix.sum(1), cm["per_class_accuracy"])
    assert cm["accuracy"] == pytest.approx(evaluated["metrics"]["Accuracy"])
    # the mistakes are the off-diagonal counts, each listed with the features that decided it
    listed = client.get("/api/misclassified", params={"per_page": 1000}).json()
    assert listed["total"] == cm["mistakes"] == int(matrix.sum() - np.trace(matrix)) > 0
    first = listed["items"][0]
    assert first["true"]["index"] != first["predicted"]["index"]
    assert first["for_predicted"] and all(f["delta"] > 0 for f in first["for_predicted"])
    assert client.get(first["thumb"]).status_code == 200  # the run's dataset is here: pictures too
    a, b = first["true"]["index"], first["predicted"]["index"]
    only = client.get("/api/misclassified", params={"true": a, "pred": b}).json()
    assert only["total"] == matrix[a, b]
    csv_rows = client.get("/api/confusion.csv").text.strip().splitlines()
    assert len(csv_rows) == 7 and csv_rows[0].endswith("support,accuracy")
    for page in ("/confusion", "/misclassified"):
        html = client.get(page).text
        assert f"{100 * cm['accuracy']:.1f} %" in html or f"{cm['mistakes']} mistakes" in html


def test_confusion_from_an_onnx_with_a_test_folder_equals_qpm_predict(trained_run, qpm, tmp_path):
    import httpx

    folder = tmp_path / "tests"
    ds = trained_run["test"]
    for i in range(len(ds)):
        item = ds[i]
        (folder / ds.classes[item.label]).mkdir(parents=True, exist_ok=True)
        item.image.convert("RGB").save(folder / ds.classes[item.label] / f"{i:03d}.png")
    res = qpm(["predict", str(folder), "--model", str(trained_run["onnx"]), "--device", "cpu", "--json"])
    assert res.returncode == 0, res.stderr
    names = list(ds.classes)
    right = np.zeros(len(names))
    for p in json.loads(res.stdout)["predictions"]:
        right[names.index(Path(p["path"]).parent.name)] += p["top_k"][0]["class"] == Path(p["path"]).parent.name
    srv = Server([str(trained_run["onnx"]), "--device", "cpu", "--test-images", str(folder)], tmp_path)
    try:
        cm = httpx.get(srv.url + "/api/confusion", params={"wait": "true"}, timeout=120).json()
        assert cm["source"] == f"folder {folder}" and cm["images"] == len(ds)
        assert cm["per_class_accuracy"] == pytest.approx((right / 8).tolist())
        assert httpx.get(srv.url + "/misclassified", timeout=60).status_code == 200
    finally:
        srv.stop()


def test_prototypes_carry_their_patch_box_and_the_pages_draw_it(client, explorer_run):
    from qpmcli.artifact import read_json

    stored = read_json(explorer_run["run"] / "prototypes" / "prototypes.json")["features"]
    model = client.get("/api/model").json()
    fid = model["feature_ids"][0]
    feat = client.get(f"/api/features/{fid}").json()
    assert len(feat["prototypes"]) == len(stored[str(fid)]) > 0
    for p, s in zip(feat["prototypes"], stored[str(fid)], strict=True):
        w, h = p["size"]
        assert p["box"] == pytest.approx(s["patch_box"]) and 0 <= p["box"][0] < p["box"][2] <= w
        assert 0 <= p["box"][1] < p["box"][3] <= h
        r, c = s["patch"]  # the whole training image: the token-grid cell of the peak, as fractions
        assert p["source"]["box"] == pytest.approx([c / 8, r / 8, (c + 1) / 8, (r + 1) / 8])
        assert client.get(p["source"]["url"]).headers["content-type"] == "image/png"
    page = client.get(f"/feature/{fid}").text
    assert page.count('class="pbox" x="') == len(feat["prototypes"])  # one box per crop
    assert "peak" in page and "mean over the image" in page  # the two words, each with its one meaning


def test_title_names_and_search(client, explorer_run):
    model = client.get("/api/model").json()
    assert model["title"] == f"{explorer_run['run'].name} · shapes · dinov2-vits14"
    assert f"<title>{model['title']}" in client.get("/").text.replace("&middot;", "·")
    fid = model["feature_ids"][0]
    assert model["feature_labels"][str(fid)] == f"f{fid} {NAMED}" and model["named_features"] >= 1
    hits = client.get("/api/search", params={"q": "BLOB"}).json()
    assert [f["feature"] for f in hits["features"]] == [fid] and hits["classes"] == []
    assert [c["class"] for c in client.get("/api/search", params={"q": "ring"}).json()["classes"]] == \
        [c for c in model_classes(client) if "ring" in c]
    assert NAMED in client.get("/search", params={"q": "blob"}).text


def model_classes(client) -> list[str]:
    return [c["class"] for c in client.get("/api/classes").json()]


def test_prediction_sets_where_the_model_is_calibrated(client, explorer_run, trained_run, qpm, tmp_path):
    image = tmp_path / "one.png"
    trained_run["test"][5].image.convert("RGB").save(image)
    api = client.post("/api/explain", files={"file": ("one.png", image.read_bytes(), "image/png")}).json()
    res = qpm(["predict", str(image), "--model", str(explorer_run["onnx"]), "--device", "cpu",
               "--coverage", "0.9", "--json"])
    assert res.returncode == 0, res.stderr
    cli = json.loads(res.stdout)["predictions"][0]
    assert api["set"]["coverage"] == pytest.approx(0.9) and api["set"]["set"] == cli["set"]
    assert client.get("/api/model").json()["calibrations"][0]["score"] == "lac"
    bad = client.post("/api/explain", files={"file": ("one.png", image.read_bytes(), "image/png")},
                      data={"coverage": "0.5"})
    assert bad.status_code == 422 and "no calibration for coverage 0.5" in bad.json()["detail"]


# ------------------------------------------------------------------------------------------------ a dense head
@pytest.fixture(scope="module")
def dense_client(tmp_path_factory):
    """A dense head (every class, every feature, real weights of either sign), exported."""
    import httpx
    from builders import make_tiny_run

    from qpmcli.export import export_onnx

    root = tmp_path_factory.mktemp("dense-serve")
    run = make_tiny_run(root / "dense", sparse=False)
    export_onnx(run, adapter=False)
    srv = Server([str(run / "model.onnx"), "--device", "cpu"], root)
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        yield c
    srv.stop()


FALSE_FOR_DENSE = re.compile(r"decides with|sum of their|(?<!only where )cancel|uses \d+ features|no other class",
                             re.IGNORECASE)


def test_dense_head_pages_claim_nothing_false_for_real_weights(dense_client, tmp_path):
    model = dense_client.get("/api/model").json()
    assert model["head_kind"] == "dense" and not model["sparse"]
    w = np.asarray(model["weight"])
    assert (w != 0).all() and (w < 0).any() and (w > 0).any()  # real weights of both signs
    for path in ("/", "/class/0", "/class/1", f"/feature/{model['feature_ids'][0]}", "/graph", "/explain"):
        html = dense_client.get(path).text
        found = FALSE_FOR_DENSE.search(re.sub(r"<[^>]+>", " ", html))
        assert found is None, (path, found and found.group(0))
    info = dense_client.get("/api/classes/0").json()
    page = dense_client.get("/class/0").text
    printed = re.findall(r"weight ([+-][0-9.e+-]+)<", page)
    assert len(printed) == len(info["features"]) == 10  # the 10 largest |weight|, each printed
    for text, f in zip(printed, info["features"], strict=True):
        assert text not in ("+0", "-0") and float(text) == pytest.approx(f["weight"], rel=5e-3)
    assert [abs(f["weight"]) for f in info["features"]] == sorted((abs(f["weight"]) for f in info["features"]),
                                                                    reverse=True)
    assert "largest |weight|" in page and "real-valued weight of either sign" in page
    graph = dense_client.get("/api/graph").json()
    assert graph["edges"] == [] and graph["head"] == "dense"  # no sharing structure claimed
    from PIL import Image

    image = tmp_path / "x.png"
    Image.new("RGB", (64, 64), (120, 30, 200)).save(image)
    out = dense_client.post("/api/explain", files={"file": ("x.png", image.read_bytes(), "image/png")}).json()
    assert out["head"] == "dense" and out["compare"]["shared_cancel"] is False

"""`qpm serve`: the real server (uvicorn in a subprocess on a free loopback port) answering real HTTP requests.

The model is a real exported run: a random-init adapter with a hand-set binary W and real prototypes from a real token
cache (``test_explain.build_made_run``), renamed to hostile class names (markup, TeX, quotes) before export, so every
page and answer is checked with names that would break careless escaping.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HOSTILE = ["<script>alert(1)</script>", "$\\x$", "Tom & \"Jerry\" 'quoted'", "plain class"]
UPLOAD_LIMIT_MB = 0.25
pytestmark = pytest.mark.timeout(300)


# ------------------------------------------------------------------------------------------------- fixtures
def build_served_model(root: Path) -> dict:
    """A run with prototypes and hostile class names, exported to ``<run>/model.onnx`` (built once per session)."""
    done = root / "done.json"
    if done.is_file():
        return {k: Path(v) if k != "images" else [Path(p) for p in v] for k, v in json.loads(done.read_text()).items()}
    from builders import build_made_run

    from qpmcli.export import export_onnx

    made = build_made_run(root)
    run = made["run"]
    model_json = run / "model.json"
    doc = json.loads(model_json.read_text())
    doc["class_names"] = HOSTILE
    model_json.write_text(json.dumps(doc))
    protos = run / "prototypes" / "prototypes.json"
    doc = json.loads(protos.read_text())
    for entries in doc["features"].values():
        for e in entries:
            e["class"] = HOSTILE[e["label"]]
    protos.write_text(json.dumps(doc))
    report = export_onnx(run)
    out = {"run": str(run), "onnx": report["files"]["full"], "adapter": report["files"]["adapter"],
           "images": [str(p) for p in made["images"]]}
    done.write_text(json.dumps(out))
    return {k: Path(v) if k != "images" else [Path(p) for p in v] for k, v in out.items()}


@pytest.fixture(scope="session")
def served_model(tmp_path_factory) -> dict:
    return build_served_model(tmp_path_factory.getbasetemp() / "serve-model")


def server_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPM_")}
    env.update(XDG_CONFIG_HOME=str(tmp / "xdg-config"), XDG_CACHE_HOME=str(tmp / "xdg-cache"), HOME=str(tmp),
               PYTHONUNBUFFERED="1")
    return env


class Server:
    """``qpm serve`` as a subprocess on a free port (``--port 0``); ``url`` is read from its first lines."""

    def __init__(self, args: list[str], tmp: Path) -> None:
        self.stderr_path = tmp / "server.stderr"
        self._stderr = open(self.stderr_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "qpmcli.cli", "serve", *args, "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=server_env(tmp))
        self.started = time.perf_counter()
        self.url = None
        self.lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"open (http://\S+?)/ ", line)
            if m:
                self.url = m.group(1)
                break
        if self.url is None:
            self.stop()
            raise AssertionError(f"the server did not start: {self.lines} {self.stderr_path.read_text()}")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep the pipe drained

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text()


@pytest.fixture(scope="module")
def server(served_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    srv = Server([str(served_model["run"]), "--device", "cpu", "--max-upload-mb", str(UPLOAD_LIMIT_MB),
                  "--batch-window-ms", "50"], tmp)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


# ------------------------------------------------------------------------------------------------------- API
def test_binds_loopback_and_never_imports_torch(server, client, served_model):
    assert server.url.startswith("http://127.0.0.1:")  # no --host: this machine only
    files = {"file": ("a.png", png_bytes(served_model["images"][0]), "image/png")}
    r = client.post("/api/predict", files=files)
    assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff"
    timing = dict(p.split(";dur=") for p in r.headers["server-timing"].split(", "))  # where the time went
    assert set(timing) == {"queue", "decode", "infer", "batch", "total"} and float(timing["batch"]) >= 1
    assert 0 < float(timing["infer"]) < float(timing["total"])
    assert client.post("/api/explain", files=files).status_code == 200
    page = client.get("/")
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert "content-security-policy" not in client.get("/docs").headers
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["provider"] == "CPUExecutionProvider"
    assert health["torch_imported"] is False


def test_predict_api_equals_cli_json(client, served_model, tmp_path):
    image = served_model["images"][1]
    onnx = served_model["onnx"]
    proc = subprocess.run([sys.executable, "-m", "qpmcli.cli", "predict", str(image), "--model", str(onnx),
                           "--device", "cpu", "--json"], capture_output=True, text=True, timeout=300,
                          env=server_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    cli = json.loads(proc.stdout)
    r = client.post("/api/predict", files={"file": (image.name, image.read_bytes(), "image/png")})
    assert r.status_code == 200
    api = r.json()
    assert {k: api[k] for k in ("kind", "provider", "num_images", "num_failed")} == \
        {k: cli[k] for k in ("kind", "provider", "num_images", "num_failed")}
    assert Path(api["model"]) == Path(cli["model"])
    assert api["predictions"][0]["path"] == image.name and Path(cli["predictions"][0]["path"]) == image
    for doc in (api, cli):
        doc["predictions"][0].pop("path")
    assert api["predictions"] == cli["predictions"]  # same graph, same preprocessing: the same numbers
    assert [t["class"] for t in api["predictions"][0]["top_k"]][:1][0] in HOSTILE


def test_model_classes_features_and_prototypes(client, served_model):
    from builders import MADE_FEATURE_IDS as FEATURE_IDS
    from builders import MADE_W as W

    model = client.get("/api/model").json()
    assert model["classes"] == 4 and model["features"] == 6 and model["feature_ids"] == FEATURE_IDS
    assert model["backbone"] == "dinov2-vits14" and model["dataset"] == "shapes"
    np.testing.assert_array_equal(np.asarray(model["weight"]), W)
    classes = client.get("/api/classes").json()
    assert [c["class"] for c in classes] == HOSTILE
    assert [c["features"] for c in classes] == [[FEATURE_IDS[k] for k in np.flatnonzero(row)] for row in W]
    feat = client.get("/api/features/2").json()
    assert [c["index"] for c in feat["classes"]] == [0, 1, 3]
    assert feat["statistics"]["classes_using"] == 3 and feat["statistics"]["sigma"] > 0
    assert len(feat["prototypes"]) == 4
    one = client.get("/api/classes/1").json()
    assert one["class"] == HOSTILE[1] and [f["feature"] for f in one["features"]] == [2, 3, 7]
    assert one["similar"][0] == {"index": 0, "class": HOSTILE[0], "shared": 2, "features": [2, 3],
                                 "labels": ["f2", "f3"]}
    # prototypes by index: the very PNG bytes stored in the run
    stored = json.loads((served_model["run"] / "prototypes" / "prototypes.json").read_text())["features"]["2"]
    for rank, entry in enumerate(stored):
        r = client.get(f"/api/prototypes/2/{rank}.png")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content == (served_model["run"] / "prototypes" / entry["file"]).read_bytes()
    for bad in ("/api/prototypes/2/99.png", "/api/prototypes/4/0.png", "/api/features/999", "/api/classes/4",
                "/api/prototypes/..%2F..%2Fmodel.json/0.png", "/static/..%2F..%2Fengine.py", "/class/9",
                "/feature/1", "/docs-assets/..%2F__init__.py", "/docs-assets/%2E%2E/core.py"):
        assert client.get(bad).status_code in (404, 422), bad


def test_explain_api(client, served_model):
    from builders import MADE_FEATURE_IDS as FEATURE_IDS
    from builders import MADE_W as W
    from PIL import Image as PILImage

    image = served_model["images"][0]
    data = image.read_bytes()
    r = client.post("/api/explain", files={"file": ("x.png", data, "image/png")})
    assert r.status_code == 200, r.text
    doc = r.json()
    ex, cmp_ = doc["explained"], doc["compare"]
    assert ex["index"] == doc["predicted"]["index"] == doc["top_k"][0]["index"]
    assert cmp_["index"] == doc["top_k"][1]["index"]  # default: the runner-up
    assert sorted(f["feature"] for f in ex["features"]) == [FEATURE_IDS[k] for k in np.flatnonzero(W[ex["index"]])]
    assert ex["logit"] == pytest.approx(ex["bias"] + sum(f["contribution"] for f in ex["features"]), abs=1e-4)
    a, b = set(np.flatnonzero(W[ex["index"]])), set(np.flatnonzero(W[cmp_["index"]]))
    assert cmp_["shared"] == [FEATURE_IDS[k] for k in sorted(a & b)]
    assert cmp_["only_explained"] == [FEATURE_IDS[k] for k in sorted(a - b)]
    assert cmp_["only_compared"] == [FEATURE_IDS[k] for k in sorted(b - a)]
    shown = {FEATURE_IDS[k] for k in a | b}
    assert set(doc["heatmaps"]) == {str(f) for f in shown}
    w, h = PILImage.open(image).size
    for uri in doc["heatmaps"].values():
        assert uri.startswith("data:image/png;base64,")
        heat = PILImage.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        assert heat.mode == "RGBA" and max(heat.size) == 256 and abs(heat.size[0] / heat.size[1] - w / h) < 0.02
    assert all(f["prototypes"] and f["prototypes"][0]["url"].startswith("/api/prototypes/") for f in ex["features"])
    # arrays on the token grid, and any class chosen by name or index
    r = client.post("/api/explain", files={"file": ("x.png", data, "image/png")},
                    data={"class": "$\\x$", "compare": "0", "heatmaps": "array"})
    doc = r.json()
    assert doc["explained"]["class"] == HOSTILE[1] and doc["compare"]["class"] == HOSTILE[0]
    assert doc["compare"]["shared"] == [2, 3]
    assert all(np.asarray(v).shape == (8, 8) for v in doc["heatmaps"].values())
    assert client.post("/api/explain", files={"file": ("x.png", data, "image/png")},
                       data={"heatmaps": "none"}).json().get("heatmaps") is None


def test_ids_of_thousands_of_digits_are_4xx_not_500(client, served_model):
    """A 5,000-digit class or feature id (beyond int()'s own digit limit) is an unknown id: 4xx, never a 500."""
    huge = "9" * 5000
    data = served_model["images"][0].read_bytes()
    for field in ("class", "compare"):
        r = client.post("/api/explain", files={"file": ("x.png", data, "image/png")}, data={field: huge})
        assert r.status_code == 422 and "out of range" in r.json()["detail"], (field, r.status_code, r.text[:300])
    for url in (f"/api/classes/{huge}", f"/api/features/{huge}", f"/api/prototypes/{huge}/0.png",
                f"/api/prototypes/2/{huge}.png", f"/class/{huge}", f"/feature/{huge}"):
        r = client.get(url)
        assert 400 <= r.status_code < 500, (url, r.status_code)
    assert client.get("/api/health").json()["status"] == "ok"


def test_tampered_prototype_metadata_is_refused_at_load(served_model, tmp_path):
    """Prototype entries whose activation is not a number made every /api/explain a 500: the server now refuses the
    model at start, with one line naming the entry."""
    import onnx

    proto = onnx.load(str(served_model["onnx"]))
    for entry in proto.metadata_props:
        if entry.key == "qpm_prototypes":
            doc = json.loads(entry.value)
            first = next(iter(doc))
            doc[first][0]["activation"] = "very high"
            entry.value = json.dumps(doc)
    onnx.save(proto, str(tmp_path / "tampered.onnx"))
    proc = subprocess.run([sys.executable, "-m", "qpmcli.cli", "serve", str(tmp_path / "tampered.onnx"), "--port",
                           "0", "--device", "cpu"], capture_output=True, text=True, timeout=120,
                          env=server_env(tmp_path))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"prototype 0 of feature {first} in the qpm_prototypes metadata is malformed (activation is not a finite " \
           f"number)" in lines[0]


def _truncated_png(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


def _bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb's first line)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr: ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def test_bad_uploads_get_their_codes(client, served_model):
    good = served_model["images"][0].read_bytes()
    cases = {
        "not an image": (b"hello, this is text\n" * 10, 415, "not an image"),
        "truncated": (_truncated_png(served_model["images"][0]), 400, "truncated"),
        "bomb": (_bomb_png(), 413, "pixels"),  # beyond PIL's own guard
        "large bomb": (_bomb_png(10_000, 5_000), 413, "50 MP"),  # within PIL's guard, beyond the server's limit
        "empty": (b"", 400, "empty"),
        "too large": (os.urandom(int(UPLOAD_LIMIT_MB * 2**20) + 4096), 413, "limit"),
    }
    for route in ("/api/predict", "/api/explain"):
        for name, (body, status, words) in cases.items():
            r = client.post(route, files={"file": ("f.png", body, "image/png")})
            assert r.status_code == status, (route, name, r.status_code, r.text)
            assert words in r.json()["detail"], (name, r.json())
    assert client.post("/api/predict", data={"top_k": "3"}).status_code == 422  # no file
    assert client.post("/api/predict", files={"file": ("f.png", good, "image/png")},
                       data={"top_k": "0"}).status_code == 422
    r = client.post("/api/explain", files={"file": ("f.png", good, "image/png")}, data={"compare": "no such class"})
    assert r.status_code == 422 and "no class matches" in r.json()["detail"]
    # a streamed (chunked, no Content-Length) body past the limit is cut off too
    def chunks():
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
        for _ in range(64):
            yield b"x" * 16384
    r = client.post("/api/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert client.get("/api/health").json()["status"] == "ok"


def test_survives_client_disconnecting_mid_upload(server, client, served_model):
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    good = served_model["images"][0].read_bytes()
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            body = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n" \
                   b"Content-Type: image/png\r\n\r\n" + good[:500]
            s.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 100000\r\n\r\n" + body)
            time.sleep(0.2)
    time.sleep(0.5)
    assert client.get("/api/health").json()["status"] == "ok"
    r = client.post("/api/predict", files={"file": ("a.png", good, "image/png")})
    assert r.status_code == 200
    assert "Traceback" not in server.stderr()


def test_concurrent_requests_are_micro_batched(client, served_model, server):
    import httpx

    images = served_model["images"]
    single = {}
    for p in images:
        single[p.name] = client.post("/api/predict", files={"file": (p.name, p.read_bytes(), "image/png")}).json()
    before = client.get("/api/health").json()["batching"]
    results: list = []

    def worker(i: int) -> None:
        p = images[i % len(images)]
        with httpx.Client(base_url=server.url, timeout=60) as c:
            results.append((p.name, c.post("/api/predict", files={"file": (p.name, p.read_bytes(), "image/png")})))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 12 and all(r.status_code == 200 for _, r in results)
    for name, r in results:  # batching does not change answers beyond float noise
        got, ref = r.json()["predictions"][0], single[name]["predictions"][0]
        assert [t["index"] for t in got["top_k"]] == [t["index"] for t in ref["top_k"]]
        np.testing.assert_allclose([t["logit"] for t in got["top_k"]], [t["logit"] for t in ref["top_k"]], atol=1e-5)
    after = client.get("/api/health").json()["batching"]
    assert after["requests"] - before["requests"] == 12
    assert after["batches"] - before["batches"] < 12 and after["largest_batch"] >= 2  # one ORT call served several


def test_requests_arriving_while_a_batch_decodes_join_its_session_call():
    # the batching worker itself (real threads): the first request's decoding is held until three more requests
    # are queued, so they must ride in the same session call instead of a second one; a bad upload among them
    # fails alone
    from qpmcli.serve.engine import MicroBatcher

    decoding, release, calls = threading.Event(), threading.Event(), []

    def prepare(raw):
        if raw == 0:
            decoding.set()
            assert release.wait(10)
        if raw == "bad":
            raise ValueError("not an image")
        return np.full(3, float(raw), np.float32), raw

    def run(x):
        calls.append(len(x))
        return {"y": x.sum(1)}

    batcher = MicroBatcher(run, max_batch=3, window=0.0, prepare_fn=prepare)
    try:
        first = batcher.submit(0)
        assert decoding.wait(10)  # the worker has picked the first one up and is decoding it
        later = [batcher.submit(v) for v in (1, "bad", 2, 3)]
        release.set()
        assert first.result(10)[0]["y"] == 0
        with pytest.raises(ValueError):
            later[1].result(10)
        assert [f.result(10)[0]["y"] for f in (later[0], later[2], later[3])] == [3, 6, 9]
        assert calls == [3, 1]  # 0, 1, 2 in one call (the bad upload takes no place in it), then 3
        assert batcher.stats()["largest_batch"] == 3
    finally:
        batcher.close()


# ------------------------------------------------------------------------------------------------------ pages
def test_pages_escape_hostile_class_names(client):
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    for url in ("/", "/class/0", "/class/1", "/feature/2", "/feature/7", "/explain"):
        r = client.get(url)
        assert r.status_code == 200, url
        html = r.text
        assert "<script>alert(1)</script>" not in html, url
        assert escaped in html, url
        assert re.findall(r"<script[^>]*>", html) == [s for s in re.findall(r"<script[^>]*>", html)
                                                       if re.fullmatch(r'<script src="/static/\w+\.js">', s)]
        assert "default-src 'self'" in r.headers["content-security-policy"]
        for src in re.findall(r'(?:src|href)="([^"]+)"', html):  # every asset is ours
            assert src.startswith("/") or src.startswith("#"), (url, src)
    assert "$\\x$" in client.get("/class/1").text
    assert "Tom &amp; &#34;Jerry&#34; &#39;quoted&#39;" in client.get("/class/2").text


def test_docs_and_assets_are_local(client):
    html = client.get("/docs").text
    assets = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html)
    assert assets and not [a for a in assets if a.startswith("http")], assets
    for a in assets:
        assert client.get(a).status_code == 200, a
    spec = client.get("/openapi.json").json()
    assert {"/api/predict", "/api/explain", "/api/model", "/api/classes", "/api/features/{fid}"} <= set(spec["paths"])
    for name in ("qpm.css", "overview.js", "explain.js", "favicon.svg"):
        assert client.get(f"/static/{name}").status_code == 200


# ------------------------------------------------------------------------------------------------------- CLI
def test_cli_errors_are_one_line(served_model, tmp_path):
    run_no_export = tmp_path / "run"
    run_no_export.mkdir()
    (run_no_export / "model.json").write_text("{}")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    cases = [
        ([str(tmp_path / "missing.onnx")], "does not exist"),
        ([str(run_no_export)], "qpm export"),
        ([str(served_model["adapter"])], "adapter-only"),
        ([str(served_model["onnx"]), "--port", str(port)], "choose another --port"),
        ([], "no run given"),
    ]
    try:
        for args, words in cases:
            proc = subprocess.run([sys.executable, "-m", "qpmcli.cli", "serve", *args], capture_output=True,
                                  text=True, timeout=120, env=server_env(tmp_path))
            assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr, (args, proc.stderr)
    finally:
        busy.close()


def test_default_model_is_the_current_run(served_model, tmp_path):
    """No MODEL: the current run's exported model (qpm train/demo record the run; qpm export its .onnx)."""
    from types import SimpleNamespace

    from qpmcli.current import set_current

    env = server_env(tmp_path)
    state = tmp_path / "state"
    env["QPM_STATE_DIR"] = str(state)
    set_current(SimpleNamespace(state_dir=state), served_model["run"], onnx=served_model["onnx"], by="test")
    proc = subprocess.Popen([sys.executable, "-m", "qpmcli.cli", "serve", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.readline()
        assert first.startswith(f"qpm serve: {served_model['onnx']} "), first
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_explain_figure_shows_prototypes_beside_heatmaps(served_model, tmp_path):
    """`qpm explain`'s local figure draws each feature's training prototypes under its heatmap when the model has
    them; without prototypes that strip stays empty (the figure keeps its size)."""
    from dataclasses import replace

    from qpmcli import evidence as V
    from qpmcli import explain as E
    from qpmcli.images import open_image
    from qpmcli.predict import load_classifier

    clf = load_classifier(served_model["onnx"], "cpu")
    assert clf.metadata.prototypes
    image = open_image(served_model["images"][0])
    out = clf.run([image])
    pics = {}
    for name, meta in (("with", clf.metadata), ("without", replace(clf.metadata, prototypes=None))):
        expl = V.explain_output(out["logits"][0], out["maps"][0], out["features"][0], meta)
        path = E.render_local(image, expl, out["maps"][0], meta, tmp_path / f"{name}.png")
        pics[name] = (np.asarray(Image.open(path).convert("RGB"), dtype=np.int16), expl.extra["panels"])
    (a, panels), (b, _) = pics["with"], pics["without"]
    assert a.shape == b.shape == (720, 1600, 3)
    for e in expl.features:  # below each feature's heatmap: prototypes in one figure, background in the other
        x0, _, x1, y1 = panels[f"feature {e.feature}"]
        strip_a, strip_b = a[y1 + 40:, x0:x1], b[y1 + 40:, x0:x1]
        assert np.abs(strip_a - strip_b).mean() > 5, e.feature
        assert strip_a.std() > 20

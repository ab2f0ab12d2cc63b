"""`qpm serve` against in-process ONNX Runtime on the same model and the same images, in one run.

Model: the demo's shape (EfficientNet-Lite0 with its shipped ImageNet weights, 224x224, 7x7 grid; adapter 4 layers,
hidden 1024, 256 dense features; 10 classes, 20 selected features, 5 per class; random adapter weights), saved as a run
and exported with ``qpmcli.export.export_onnx`` -- or a real model given with ``--model model.onnx`` (e.g. the demo's).
Images: PNG files of the synthetic ``shapes`` test split. The server is the real command (``qpm serve --port 0
--device cpu`` in a subprocess); the load comes from this process over loopback only, bounded in count and time.

Both sides do the same work per image: decode the PNG, preprocess (``qpmcli.images.preprocess_array``), run the ONNX
graph, describe the prediction (``qpmcli.predict.describe_prediction``). The server adds HTTP, multipart parsing and
micro-batching; the baseline has none of these.

Rows:
- ``/api/predict`` p50 latency, one request at a time / in-process p50 (batch 1), interleaved A B A B (<= 1.15);
- throughput with 8 concurrent clients / in-process throughput at its best batch size (1..16) (>= 0.9);
- start-up: process spawn to the first answered ``/api/predict`` (<= 3 s on 2 cores);
- server memory (RSS, peak RSS) after the load; and whether the server process ever imported torch (must not).

    python benchmarks/bench_serve.py [--quick] [--json-out PATH] [--model model.onnx]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import provenance, write_result

STARTED = provenance()

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

CLASSES, SELECTED, PER_CLASS = 10, 20, 5


def build_demo_shaped_model(root: Path) -> Path:
    """A run with the demo's architecture (random adapter, valid binary W), exported to ``root/model.onnx``."""
    import numpy as np
    import torch

    from qpmcli import artifact
    from qpmcli.backbone import load_backbone
    from qpmcli.export import export_onnx
    from qpmcli.model import QPMModel

    bb = load_backbone("efficientnet-lite0", device="cpu")
    torch.manual_seed(0)
    model = QPMModel(bb.embed_dim, CLASSES, bb.grid, n_layers=4, hidden_size=1024, n_features=256).eval()
    rng = np.random.default_rng(0)
    w = np.zeros((CLASSES, SELECTED), np.float32)
    for c in range(CLASSES):
        w[c, rng.choice(SELECTED, PER_CLASS, replace=False)] = 1
    feats = np.sort(rng.choice(model.n_features, SELECTED, replace=False))
    model.set_selection(feats, w, torch.rand(SELECTED) * 0.1, torch.rand(SELECTED) * 0.1 + 0.05)
    run = root / "run"
    info = {"class_names": [f"class {i}" for i in range(CLASSES)], "backbone": bb.name,
            "weights_digest": bb.weights_digest, "preprocess": bb.preprocess_config,
            "image_size": list(bb.image_size), "grid": list(bb.grid), "embed_dim": bb.embed_dim,
            "dataset": "shapes", "head": "qpm", "backbone_options": {}, "seed": 0}
    artifact.save_model(model, run, "final", info=info)
    return Path(export_onnx(run, root / "model.onnx", adapter=False)["files"]["full"])


def test_images(n: int) -> list[bytes]:
    from qpmcli.data import load_dataset

    ds = load_dataset("shapes", split="test", test_per_class=max(1, n // 10 + 1))
    out = []
    for i in range(n):
        buf = io.BytesIO()
        ds[i % len(ds)].image.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class InProcess:
    """The baseline: the same file in ONNX Runtime in this process, the same per-image work, no HTTP."""

    def __init__(self, model: Path) -> None:
        from qpmcli.predict import load_classifier

        self.clf = load_classifier(model, "cpu")

    def predict(self, images: list[bytes]) -> list[dict]:
        import numpy as np

        from qpmcli.predict import describe_prediction
        from qpmcli.serve.engine import decode_image

        x = np.stack([self.clf.preprocess([decode_image(b)])[0] for b in images])
        out = self.clf.run_array(x)
        return [describe_prediction(self.clf.metadata, out["logits"][i], out["features"][i]) for i in range(len(x))]


def start_server(model: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str, float]:
    """Spawn ``qpm serve``; returns (process, url, seconds from spawn to the first answered /api/predict)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "qpmcli.cli", "serve", str(model), "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    url = None
    while url is None:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("qpm serve exited before serving")
        m = re.search(r"open (http://\S+?)/ ", line)
        url = m.group(1) if m else None
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, url, time.perf_counter() - t0


def first_answer(url: str, image: bytes, t_spawn: float, deadline: float = 60.0) -> float:
    import httpx

    while True:
        with contextlib.suppress(httpx.TransportError):  # not listening yet: try again below
            r = httpx.post(url + "/api/predict", files={"file": ("a.png", image, "image/png")}, timeout=30)
            if r.status_code == 200:
                return time.perf_counter() - t_spawn
        if time.perf_counter() - t_spawn > deadline:
            raise RuntimeError("no answer from the server")
        time.sleep(0.01)


def server_timing(header: str) -> dict[str, float]:
    """``Server-Timing: queue;dur=0.1, decode;dur=4.2, ...`` -> {name: milliseconds}."""
    out = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";dur=")
        with contextlib.suppress(ValueError):
            out[name] = float(rest)
    return out


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process so far (load-independent, unlike wall time)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> tuple[float, float]:
    fields = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def multipart(image: bytes, boundary: str = "qpmbenchboundary") -> tuple[bytes, str]:
    """The body and content type of a form upload of ``image`` as field ``file`` (what httpx's ``files=`` sends)."""
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode()
    return head + image + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def lean_connection(url: str):
    """A keep-alive ``http.client`` connection to the server at ``url`` (the benchmark's minimal client)."""
    import http.client
    from urllib.parse import urlsplit

    return http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=60)


def lean_predict(conn, upload: tuple[bytes, str]) -> tuple[int, bytes]:
    """POST a prebuilt multipart ``(body, content type)`` to ``/api/predict``; returns (status, response body)."""
    body, ctype = upload
    conn.request("POST", "/api/predict", body=body, headers={"Content-Type": ctype})
    r = conn.getresponse()
    return r.status, r.read()


def concurrent_load(url: str, images: list[bytes], clients: int, seconds: float, max_requests: int) -> float:
    """Images/s answered with ``clients`` concurrent keep-alive clients (bounded in time and count).

    The load generator is the standard library's ``http.client`` with prebuilt multipart bodies: it shares the 2
    cores with the server, and httpx spent about 2 ms of CPU per request building and parsing, which the server
    then did not get. (Latency, one request at a time, is measured with httpx: there the client does not compete.)
    """
    bodies = [multipart(img) for img in images]
    stop = time.perf_counter() + seconds
    done = [0] * clients
    budget = threading.Semaphore(max_requests)
    errors: list[str] = []

    def client(i: int) -> None:
        conn = lean_connection(url)
        try:
            k = i
            while time.perf_counter() < stop and budget.acquire(blocking=False):
                status, text = lean_predict(conn, bodies[k % len(bodies)])
                if status != 200:
                    errors.append(text.decode(errors="replace"))
                    return
                done[i] += 1
                k += clients
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"server errors under load: {errors[:1]}")
    return sum(done) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json-out")
    parser.add_argument("--model", help="an exported model.onnx (default: build one with the demo's shape)")
    args = parser.parse_args()
    import httpx
    import onnxruntime

    n_lat = 30 if args.quick else 80
    load_seconds = 2.0 if args.quick else 5.0
    rounds = 2 if args.quick else 4
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model = Path(args.model) if args.model else build_demo_shaped_model(tmp)
    images = test_images(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPM_")}
    env.update(HOME=str(tmp), XDG_CONFIG_HOME=str(tmp / "cfg"), XDG_CACHE_HOME=str(tmp / "cache"))

    base = InProcess(model)
    for _ in range(5):
        base.predict(images[:1])
    t_spawn = time.perf_counter()
    proc, url, _ = start_server(model, env)
    try:
        startup = first_answer(url, images[0], t_spawn)
        startup_cpu = cpu_seconds(proc.pid)
        with httpx.Client(base_url=url, timeout=60) as c:
            timings: list[dict[str, float]] = []

            def served(img: bytes) -> dict:
                r = c.post("/api/predict", files={"file": ("a.png", img, "image/png")})
                r.raise_for_status()
                timings.append(server_timing(r.headers.get("server-timing", "")))
                return r.json()["predictions"][0]

            for i in range(5):
                served(images[i])
            # the same answers
            for img in images[:4]:
                a, b = served(img), base.predict([img])[0]
                assert [t["index"] for t in a["top_k"]] == [t["index"] for t in b["top_k"]]
            lean = lean_connection(url)
            bodies = [multipart(img) for img in images]

            def served_lean(i: int) -> None:  # the same request from a minimal client (stdlib, prebuilt body)
                status, text = lean_predict(lean, bodies[i % len(bodies)])
                assert status == 200 and json.loads(text)["predictions"][0]["top_k"]

            lat_srv, lat_lean, lat_base = [], [], []
            timings.clear()
            for i in range(n_lat):  # interleaved: a busy machine slows all sides alike
                img = images[i % len(images)]
                t0 = time.perf_counter()
                served(img)
                lat_srv.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                served_lean(i)
                lat_lean.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                base.predict([img])
                lat_base.append(time.perf_counter() - t0)
            lean.close()
            breakdown = {key: round(statistics.median(t.get(key, 0.0) for t in timings) / 1e3, 5)
                         for key in ("queue", "decode", "infer", "total")}
            health = c.get("/api/health").json()
            lat_health = []
            for _ in range(n_lat // 2):  # a request without inference: the machine's HTTP round-trip floor
                t0 = time.perf_counter()
                c.get("/api/health")
                lat_health.append(time.perf_counter() - t0)
        p50_srv, p50_base = statistics.median(lat_srv), statistics.median(lat_base)
        p50_lean = statistics.median(lat_lean)
        p50_health = statistics.median(lat_health)

        def base_rate(b: int, seconds: float) -> float:
            batch = [images[i % len(images)] for i in range(b)]
            reps, t0 = 0, time.perf_counter()
            while reps < 2 or (time.perf_counter() - t0 < seconds and reps < 500):
                base.predict(batch)
                reps += 1
            return b * reps / (time.perf_counter() - t0)

        batch_rates = {b: base_rate(b, 1.0 if args.quick else 2.0) for b in (1, 2, 4, 8, 16)}
        best_b = max(batch_rates, key=batch_rates.get)
        concurrent_load(url, images, 8, 1.0, 50)  # warm-up
        with httpx.Client(base_url=url, timeout=60) as c:
            before = c.get("/api/health").json()["batching"]
        base_runs, served_runs = [], []
        for _ in range(rounds):  # interleaved rounds: load on the machine changes both sides alike
            base_runs.append(base_rate(best_b, load_seconds))
            served_runs.append(concurrent_load(url, images, 8, load_seconds, 4000))
        best_rate, served_rate = statistics.median(base_runs), statistics.median(served_runs)
        with httpx.Client(base_url=url, timeout=60) as c:
            health = c.get("/api/health").json()
        after = health["batching"]
        load_batching = {"requests": after["requests"] - before["requests"],
                         "batches": after["batches"] - before["batches"],
                         "worker_busy_s_per_image": round((after["busy_s"] - before["busy_s"])
                                                          / max(after["requests"] - before["requests"], 1), 4)}
        rss, peak = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    rows = [
        {"what": "/api/predict p50 latency, 1 client (s) / in-process ORT batch 1", "ours": round(p50_srv, 5),
         "baseline": round(p50_base, 5), "ratio": p50_srv / p50_base, "target": "<= 1.15",
         "met": p50_srv / p50_base <= 1.15},
        {"what": "the same, client = stdlib http.client with a prebuilt body instead of httpx (s)",
         "ours": round(p50_lean, 5), "baseline": round(p50_base, 5), "ratio": p50_lean / p50_base,
         "target": "<= 1.15", "met": p50_lean / p50_base <= 1.15},
        {"what": "server side of /api/predict (Server-Timing p50, s): total from arrival to response start / "
                 "client-observed p50; parts in the notes", "ours": breakdown["total"], "baseline": round(p50_srv, 5),
         "ratio": breakdown["total"] / p50_srv, "target": "informational", "met": True},
        {"what": "GET /api/health p50 (s): HTTP round trip without inference, share of the /api/predict p50",
         "ours": round(p50_health, 5), "baseline": round(p50_srv, 5), "ratio": p50_health / p50_srv,
         "target": "informational", "met": True},
        {"what": f"throughput, 8 concurrent clients (img/s) / in-process ORT best batch ({best_b})",
         "ours": round(served_rate, 2), "baseline": round(best_rate, 2),
         "ratio": served_rate / best_rate, "target": ">= 0.9", "met": served_rate / best_rate >= 0.9},
        {"what": "start-up: spawn to first answered /api/predict, wall (s)", "ours": round(startup, 3),
         "baseline": 3.0, "ratio": startup / 3.0, "target": "<= 3 s", "met": startup <= 3.0},
        {"what": "start-up: server CPU time (user+sys) until its first answer (s)", "ours": round(startup_cpu, 3),
         "baseline": 3.0, "ratio": startup_cpu / 3.0, "target": "informational (load-independent)", "met": True},
        {"what": "server memory RSS / peak RSS after the load (MB)", "ours": round(rss, 1), "baseline": round(peak, 1),
         "ratio": rss / peak, "target": "informational", "met": True},
        {"what": "server process imported torch", "ours": health["torch_imported"], "baseline": False,
         "ratio": float(health["torch_imported"]), "target": "never", "met": not health["torch_imported"]},
    ]
    shape = "demo-shaped (efficientnet-lite0, 224px, adapter 4x1024, 256 -> 20 features, 10 classes)"
    notes = (f"model {'given: ' + str(model) if args.model else shape}; "
             f"onnxruntime {onnxruntime.__version__}, CPU EP; {os.cpu_count()} cpus; in-process images/s by batch "
             f"{ {b: round(r, 1) for b, r in batch_rates.items()} }; micro-batching during the 8-client rounds: "
             f"{load_batching} (in-process s/image at the best batch: {1 / best_rate:.4f}); "
             f"latency n={n_lat} interleaved; server-side p50 parts of one lone /api/predict (s): {breakdown} "
             f"against in-process p50 {p50_base:.4f}; throughput: median of {rounds} interleaved "
             f"rounds of {load_seconds:.0f} s (baseline {[round(r, 2) for r in base_runs]}, served "
             f"{[round(r, 2) for r in served_runs]}); client and server share the machine's cores; load average "
             f"at the end {os.getloadavg()[0]:.1f}; niceness {os.nice(0)} (server and clients alike).")
    result = {"benchmark": "serve", "rows": rows, "notes": notes}
    print(json.dumps(result, indent=2))
    write_result(args.json_out, result, started=STARTED)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What every benchmark records, and how it times alternatives: one place.

- :func:`provenance`: the git revision (and whether the tree had uncommitted changes), the command line, the machine
  and the load average; :func:`write_result` adds it (plus the load at the end and the wall time) to the result JSON
  that ``run_all.py`` turns into ``RESULTS.md``, so every row says where and under what load it was measured.
- :func:`time_blocks`: alternatives timed one block after another (all repeats of A, then all of B, ...), with a
  pause between blocks. ONNX Runtime's intra-op threads spin for a while after each call; timing call by call in
  alternation lets an idle session's spinning threads steal the 2 cores from the one being timed, which biases every
  ratio. Blocks (each with its own warm-up) avoid that; the pause lets the last block's threads go to sleep.

Ratios measured in one process against a baseline, never bare absolute times; run on a quiet machine.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_STARTED = time.time()


def machine() -> dict[str, Any]:
    """Python, platform, CPU count and model, memory, torch and its CUDA device (if any)."""
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), None)
        if model:
            info["cpu_model"] = model
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            info["memory_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # torch missing is reported, not fatal
        info["torch"] = None
    return info


def git_revision() -> dict[str, Any]:
    """``{"revision": sha, "dirty": bool}`` of the checkout the benchmark runs from (``None`` outside git)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}
    return {"revision": sha, "dirty": dirty}


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """Where and how a result was measured: revision, argv, machine, load average and date."""
    args = [os.path.relpath(a, ROOT) if a.startswith(str(ROOT)) else a for a in (sys.argv if argv is None else argv)]
    return {**git_revision(), "argv": args, "machine": machine(),
            "load_start": load_average(), "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def write_result(path: str | os.PathLike[str] | None, result: dict[str, Any], *,
                 started: dict[str, Any] | None = None) -> dict[str, Any]:
    """Add provenance (``started``: the :func:`provenance` taken when the benchmark began, else now) and the load
    average at the end to ``result`` (``{"benchmark", "rows", "notes"}``); write it as JSON to ``path`` if given."""
    doc = dict(result)
    doc["provenance"] = {**(started or provenance()), "load_end": load_average(),
                         "seconds": round(time.time() - _STARTED, 1)}
    if path is not None:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return doc


def time_blocks(fns: dict[str, Callable[[], object]], *, repeats: int = 5, min_seconds: float = 0.5,
                warmup: int = 2, sync: Callable[[], None] = lambda: None, settle: float = 1.0,
                max_iters: int = 200) -> dict[str, float]:
    """Median seconds per call of each function, each timed in a block of its own.

    Per block: ``warmup`` calls, then ``repeats`` measurements, each the mean over as many calls as fill
    ``min_seconds`` (at most ``max_iters``); ``sync`` runs after each call (e.g. ``torch.cuda.synchronize``).
    ``settle`` seconds separate blocks so that idle ONNX Runtime threads stop spinning first.
    """
    out: dict[str, float] = {}
    for i, (name, fn) in enumerate(fns.items()):
        if i and settle > 0:
            time.sleep(settle)
        for _ in range(warmup):
            fn()
            sync()
        samples = []
        for _ in range(repeats):
            n, start = 0, time.perf_counter()
            while True:
                fn()
                sync()
                n += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds or n >= max_iters:
                    break
            samples.append(elapsed / n)
        out[name] = statistics.median(samples)
    return out

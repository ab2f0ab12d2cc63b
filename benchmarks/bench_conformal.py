"""Benchmark ``qpm conformal``: calibration time on 10,000 images x 200 classes, and the demo's prediction sets.

Timing rows: ``qpmcli.conformal.calibrate`` (scores of every class, the exact threshold; for hier also the feature
rankings, every level and the split halves) on ``synthetic_outputs(10000, 200, 50, 5)``, against numpy sorting the
same [10000, 200] score matrix once (``np.sort(scores, axis=None)``), in the same process: ratio = ours / baseline.
Target: under 2 s per calibration; the same seed gives byte-identical JSON (checked).

Demo rows (``--demo-run RUN`` or ``QPM_BENCH_DEMO_RUN``, the ``runs/shapes-qpm`` folder of ``qpm demo``): from the
run's ``conformal.json`` and ``metrics.json``, each score's held-out test coverage at alpha 0.1 (target [0.87, 0.95])
and mean set size beside the model's accuracy.

    python benchmarks/bench_conformal.py [--quick] [--demo-run RUN] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qpmcli import conformal as C  # noqa: E402


def best_of(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def timing_rows(n: int, classes: int, repeat: int) -> list[dict]:
    data = C.synthetic_outputs(n, classes, 50, 5, seed=0)
    rows = []
    for score in C.SCORES:
        def ours(score: str = score) -> dict:
            return C.calibrate(score, data["logits"], data["labels"], 0.1, values=data["values"],
                               weight=data["weight"], seed=0)

        scores = C.class_scores(score if score != "hier" else "lac", data["logits"])
        t_ours, entry = best_of(ours, repeat)
        t_base, _ = best_of(lambda scores=scores: np.sort(scores, axis=None), repeat)
        again = ours()
        same = json.dumps(entry, sort_keys=True) == json.dumps(again, sort_keys=True)
        rows.append({"what": f"calibrate {score}, {n} images x {classes} classes, alpha 0.1, seconds (baseline: "
                             f"np.sort of the {n} x {classes} scores)",
                     "ours": round(t_ours, 4), "baseline": round(t_base, 4), "ratio": round(t_ours / t_base, 2),
                     "target": "< 2 s, same seed -> identical entry", "met": bool(t_ours < 2.0 and same),
                     "identical": same, "level": entry.get("level"), "threshold": entry["threshold"]})
    return rows


def demo_rows(run: Path) -> list[dict]:
    doc = json.loads((run / "conformal.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text()).get("final", {})
    accuracy = metrics.get("Accuracy")
    rows = []
    for e in doc["calibrations"]:
        if abs(e["alpha"] - 0.1) > 1e-12 or e.get("per_class"):
            continue
        t = e["test"]
        rows.append({"what": f"demo {run.name}: 90 % sets, {e['score']}"
                             + (f" (level {e['level']})" if e.get("level") is not None else "")
                             + f", calibration n = {e['n']} "
                             + ("held out of training" if e["source"]["held_out"] else "SEEN IN TRAINING")
                             + ": test coverage",
                     "ours": round(t["coverage"], 4), "baseline": 0.9, "ratio": round(t["coverage"] / 0.9, 4),
                     "target": "coverage in [0.87, 0.95]", "met": bool(0.87 <= t["coverage"] <= 0.95),
                     "mean_set_size": round(t["set_size"], 4), "empty": round(t["empty"], 4),
                     "set_coherence": t.get("set_coherence"), "accuracy": accuracy, "n_test": t["n"],
                     "guarantee": e["source"]["held_out"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,000 images x 200 classes, one repetition")
    ap.add_argument("--demo-run", type=Path, default=os.environ.get("QPM_BENCH_DEMO_RUN"))
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    n, repeat = (2000, 1) if args.quick else (10000, 3)
    rows = timing_rows(n, 200, repeat)
    notes = [f"ratio = ours / numpy sort of the same score matrix (same process, best of {repeat}); "
             f"CPUs {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}"]
    if args.demo_run and (Path(args.demo_run) / "conformal.json").is_file():
        rows += demo_rows(Path(args.demo_run))
        notes.append(f"demo rows from {args.demo_run} (qpm demo: three quarters of each class's training images "
                     f"held out for calibration); 'ours' is the test coverage, mean_set_size and accuracy beside it")
    else:
        notes.append("demo rows skipped: pass --demo-run RUN (the runs/shapes-qpm folder of `qpm demo`)")
    for row in rows:
        print(json.dumps(row))
    print("; ".join(notes))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"benchmark": "conformal", "rows": rows, "notes": "; ".join(notes)},
                                            indent=2) + "\n")


if __name__ == "__main__":
    main()

"""``qpm runs`` on 100 CUB-sized runs: the command as a user runs it, against the CLI's own start-up floor.

Each run folder holds the JSON files ``qpm train`` writes (config.json, dense.json, selection.json with a 200 x 50
weight matrix, model.json with 200 class names, metrics.json, log.jsonl); the weights files are not read by ``qpm
runs`` and are left out. Rows (medians of repeated runs, all measured here):

- ``qpm runs --json`` as a subprocess vs ``qpm --help`` (the floor every command pays: interpreter, typer, the
  command modules); the target is the issue's: under 1 s for 100 runs.
- ``list_runs`` in this process vs reading the same JSON files with ``json.load`` and nothing else (the I/O floor).

    python benchmarks/bench_cli.py [--quick] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import provenance, write_result

STARTED = provenance()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_runs(root: Path, n: int, n_classes: int = 200, k: int = 50) -> list[Path]:
    runs = []
    for i in range(n):
        run = root / f"cub-run-{i:03d}"
        run.mkdir(parents=True)
        feats = list(range(0, 2 * k, 2))
        weight = [[1.0 if (c + j) % 10 < 1 else 0.0 for j in range(k)] for c in range(n_classes)]
        req = {"backbone": "dinov2-vitb14-reg", "dataset": "cub200", "selector": ["qpm", "topk", "sldd"][i % 3],
               "head": "qpm", "n_selected": k, "per_class": 5, "dense": {"epochs": 25}, "finetune": {"epochs": 25}}
        (run / "config.json").write_text(json.dumps({"request": req, "settings": {"device": "cuda"}}, indent=1))
        names = [f"{c:03d}.Some_Bird_Name_{c}" for c in range(n_classes)]
        info = {"format": "qpm-model", "class_names": names, "backbone": "dinov2-vitb14-reg",
                "metrics": {"Accuracy": 0.85}, "model": {"n_features": 512}}
        (run / "dense.json").write_text(json.dumps({**info, "stage": "dense"}, indent=1))
        if i % 10 == 9:  # some interrupted runs
            continue
        (run / "selection.json").write_text(json.dumps({"format": "qpm-selection", "features": feats,
                                                        "weight": weight, "class_names": names}, indent=1))
        (run / "model.json").write_text(json.dumps({**info, "stage": "final", "selection": {"features": feats}},
                                                   indent=1))
        (run / "metrics.json").write_text(json.dumps({"dense": {"Accuracy": 0.86}, "final": {"Accuracy": 0.85,
                                                                                          "SID@5": 0.9}}))
        (run / "log.jsonl").write_text("".join(json.dumps({"phase": "dense", "epoch": e, "loss": 1.0}) + "\n"
                                               for e in range(50)))
        runs.append(run)
    return runs


def _time_cmd(args: list[str], env: dict[str, str], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "qpmcli.cli", *args], env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if out.returncode != 0:
            raise SystemExit(f"qpm {' '.join(args)} failed: {out.stderr[-2000:]}")
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    reps = 3 if args.quick else 7
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_runs(root / "runs", args.runs)
        env = {k: v for k, v in os.environ.items() if not k.startswith("QPM_")}
        env.update(QPM_RUNS_DIR=str(root / "runs"), XDG_CACHE_HOME=str(root / "cache"),
                   XDG_CONFIG_HOME=str(root / "config"))
        out = subprocess.run([sys.executable, "-m", "qpmcli.cli", "runs", "--json"], env=env, capture_output=True,
                             text=True)
        listed = len(json.loads(out.stdout)["runs"])
        assert listed == args.runs, (listed, out.stderr[-2000:])
        t_runs = _time_cmd(["runs", "--json"], env, reps)
        t_help = _time_cmd(["--help"], env, reps)

        from qpmcli.runs import list_runs
        from qpmcli.settings import QpmSettings

        settings = QpmSettings(runs_dir=root / "runs", state_dir=root / "state")
        t_list, t_floor = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            rows = list_runs(settings)["runs"]
            t_list.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            n = 0
            for run in sorted((root / "runs").iterdir()):
                for f in ("config.json", "metrics.json"):  # the files list_runs parses (it only stats the others)
                    if (run / f).is_file():
                        with (run / f).open("rb") as fh:
                            json.load(fh)
                        n += 1
            t_floor.append(time.perf_counter() - t0)
        assert len(rows) == args.runs and n > 0
    t_list_m, t_floor_m = statistics.median(t_list), statistics.median(t_floor)
    result = {
        "benchmark": "cli",
        "rows": [
            {"what": f"`qpm runs --json`, {args.runs} CUB-sized runs, process wall s (baseline: `qpm --help`)",
             "ours": round(t_runs, 3), "baseline": round(t_help, 3), "ratio": round(t_runs / t_help, 3),
             "target": "ours < 1 s", "met": t_runs < 1.0},
            {"what": f"list_runs in process, {args.runs} runs, s (baseline: json.load of the same files only)",
             "ours": round(t_list_m, 4), "baseline": round(t_floor_m, 4), "ratio": round(t_list_m / t_floor_m, 3),
             "target": "informational (close to the I/O floor)", "met": True},
        ],
        "notes": f"medians of {reps} repetitions; 200 classes x 50 features per run, 1 in 10 runs interrupted; "
                 f"load average during the run {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (both commands "
                 f"pay the same interpreter + typer start-up, which dominates on a loaded machine)",
    }
    print(json.dumps(result, indent=2))
    write_result(args.json_out, result, started=STARTED)
    return 0


if __name__ == "__main__":
    sys.exit(main())

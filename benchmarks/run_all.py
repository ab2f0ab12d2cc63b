"""Run every ``benchmarks/bench_*.py`` and collect their results into one table (markdown + JSON).

Each benchmark script is a plain program that accepts ``--json-out PATH`` (and ``--quick`` for a shorter run) and
writes ``{"benchmark": str, "rows": [{"what": ..., "ratio": ..., "target": ..., "met": ...}, ...], "notes": str}``.
Benchmarks print ratios measured in one process (ours vs a baseline on the same machine), never bare absolute times.

    python benchmarks/run_all.py [--quick] [--only extract,selection] [--out benchmarks/results]
    python benchmarks/run_all.py --collect [--out benchmarks/results]

``--collect`` runs nothing: it rebuilds RESULTS.md and results.json from the ``bench_*.json`` files already in the
output folder (for a benchmark run by hand with its own options, e.g. ``bench_selection.py --done-when``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import load_average, machine  # noqa: E402


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _provenance_cells(res: dict) -> dict:
    """The revision and load of a benchmark's result, as the columns every row of its table carries."""
    prov = res.get("provenance") or {}
    rev = prov.get("revision")
    rev = "unknown" if not rev else rev[:10] + ("+dirty" if prov.get("dirty") else "")
    start, end = prov.get("load_start"), prov.get("load_end")
    load = "unknown" if start is None else f"{start:.2f}-{end:.2f}" if end is not None else f"{start:.2f}"
    return {"revision": rev, "load": load}


def to_markdown(results: list[dict], info: dict, date: str) -> str:
    lines = [f"# qpm benchmark results ({date})", "", "Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()),
             "", "Every row carries the git revision it was measured at and the 1-minute load average at the start "
             "and end of its benchmark (2 cores: a quiet machine reads below about 1).", ""]
    for res in results:
        lines += [f"## {res.get('benchmark', res['script'])}", ""]
        if res.get("error"):
            lines += [f"FAILED: {res['error']}", ""]
            continue
        cells = _provenance_cells(res)
        rows = [{**row, **cells} for row in res.get("rows", [])]
        keys: list[str] = []
        for row in rows:
            keys += [k for k in row if k not in keys]
        if rows:
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |" for row in rows]
        if res.get("notes"):
            lines += ["", res["notes"]]
        argv = " ".join((res.get("provenance") or {}).get("argv") or [res["script"]])
        took = f", {res['seconds']:.0f} s" if res.get("seconds") is not None else ""
        lines += ["", f"(`{argv}`{took})", ""]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs (smoke test of the benchmarks)")
    parser.add_argument("--only", default="", help="comma-separated benchmark names (bench_<name>.py)")
    parser.add_argument("--out", default=str(HERE / "results"), help="output folder")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: rebuild the table from the bench_*.json files in the output folder")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    scripts = sorted(p for p in HERE.glob("bench_*.py") if not only or p.stem.removeprefix("bench_") in only)
    if args.collect:
        return write_table(out, collected(out, scripts), only=False)
    results = []
    start_load = load_average()
    if start_load is not None and start_load > 1.0:
        print(f"warning: load average {start_load:.2f} on {os.cpu_count()} cores: the machine is not quiet, and the "
              f"rows will say so", flush=True)
    for script in scripts:
        json_path = out / f"{script.stem}.json"
        cmd = [sys.executable, str(script), "--json-out", str(json_path)] + (["--quick"] if args.quick else [])
        print(f"== {script.name}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd)
        seconds = time.perf_counter() - start
        if proc.returncode == 0 and json_path.is_file():
            res = json.loads(json_path.read_text())
        else:
            res = {"benchmark": script.stem, "error": f"exit code {proc.returncode}"}
        res.update(script=script.name, seconds=seconds)
        results.append(res)
    return write_table(out, results, only=bool(only))


def collected(out: Path, scripts: list[Path]) -> list[dict]:
    """Each benchmark's last result as its script wrote it (``out/bench_NAME.json``), with the run time its
    provenance records."""
    results = []
    for script in scripts:
        path = out / f"{script.stem}.json"
        if path.is_file():
            res = json.loads(path.read_text())
            res.update(script=script.name, seconds=(res.get("provenance") or {}).get("seconds"))
            results.append(res)
    return results


def write_table(out: Path, results: list[dict], *, only: bool) -> int:
    previous = out / "results.json"
    if only and previous.is_file():  # a partial run keeps the other benchmarks' last results
        ran = {r["script"] for r in results}
        kept = [r for r in json.loads(previous.read_text()).get("results", []) if r.get("script") not in ran]
        results = sorted(kept + results, key=lambda r: r["script"])
    info = machine()
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    (out / "results.json").write_text(json.dumps({"date": date, "machine": info, "results": results}, indent=2))
    text = to_markdown(results, info, date)
    extra = sorted(p.name for p in out.glob("*.md") if p.name != "RESULTS.md")
    if extra:  # hand-written records of longer or other-machine runs kept beside the table
        text += "\nSee also: " + ", ".join(f"[{name}]({name})" for name in extra) + "\n"
    (out / "RESULTS.md").write_text(text)
    print(f"wrote {out / 'RESULTS.md'} and {out / 'results.json'}")
    return 1 if any(r.get("error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

"""``benchmarks/run_all.py --collect``: RESULTS.md rebuilt by one command from the benchmarks' own JSON, every row
carrying the revision and the load it was measured at."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_collect_rebuilds_the_table_with_each_rows_revision_and_load(tmp_path):
    rows = [{"what": "ours vs theirs", "ours": 1.5, "baseline": 3.0, "ratio": 0.5, "target": "< 1", "met": True}]
    prov = {"revision": "0123456789abcdef", "dirty": False, "argv": ["bench_names.py", "--quick"],
            "load_start": 0.31, "load_end": 0.62}
    (tmp_path / "bench_names.json").write_text(json.dumps({"benchmark": "names", "rows": rows, "provenance": prov}))
    (tmp_path / "bench_conformal.json").write_text(json.dumps({"benchmark": "conformal", "rows": rows,
                                                               "provenance": {**prov, "dirty": True}}))
    (tmp_path / "notes.md").write_text("hand-written record\n")
    before = {p.name: p.read_bytes() for p in tmp_path.glob("bench_*.json")}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--collect", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    table = (tmp_path / "RESULTS.md").read_text()
    assert "## names" in table and "## conformal" in table and "[notes.md](notes.md)" in table
    assert "| ours vs theirs | 1.5 | 3 | 0.5 | < 1 | True | 0123456789 | 0.31-0.62 |" in table
    assert "0123456789+dirty" in table and "`bench_names.py --quick`" in table
    assert {r["script"] for r in json.loads((tmp_path / "results.json").read_text())["results"]} == {
        "bench_names.py", "bench_conformal.py"}
    assert {p.name: p.read_bytes() for p in tmp_path.glob("bench_*.json")} == before  # collecting runs nothing

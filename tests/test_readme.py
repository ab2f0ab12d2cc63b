"""Every shell command in the README is exercised here (the install and test commands are what CI itself runs)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from conftest import README_DEMO, invoke, run_qpm

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    """Lines of the README's ```bash blocks (the commands a user types)."""
    text = README.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()
            and not line.strip().startswith("#")]


CI_COMMANDS = {'python -m pip install ".[test]"', "python -m pytest -q"}


def test_readme_install_and_test_commands_are_the_ones_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    for command in CI_COMMANDS:
        assert command in readme_commands()
        assert command in ci


def _paper_commands() -> list[str]:
    return [c for c in readme_commands() if c.startswith("qpm train") or c.startswith("torchrun")]


# The design card's commands after a train, run verbatim (from the README) by tests/test_cli_current.py.
CARD_COMMANDS = {"qpm export --onnx", "qpm explain img.jpg", "qpm predict img.jpg"}


def test_every_readme_command_is_covered_by_a_test():
    known = CI_COMMANDS | {README_DEMO} | set(_paper_commands()) | CARD_COMMANDS
    assert set(readme_commands()) == known, set(readme_commands()) - known


@pytest.mark.parametrize("command", [pytest.param(c, marks=pytest.mark.distributed) if c.startswith("torchrun") else c
                                     for c in _paper_commands()])
def test_paper_commands_parse_and_explain_what_is_missing(command, isolated_env, tmp_path):
    """Without the official weights (and data) the paper commands stop before any work, saying what to get where."""
    args = shlex.split(command.replace("~", str(tmp_path / "home")))
    if args[0] == "torchrun":
        torchrun = Path(sys.executable).with_name("torchrun")
        if not torchrun.exists() and shutil.which("torchrun") is None:
            pytest.skip("torchrun not installed")
        import subprocess

        args = ["--nproc_per_node" if a == "--nproc_per_node" else a for a in args]
        nproc = args.index("--nproc_per_node")
        args[nproc + 1] = "1"  # the command is the README's; one rank is enough to see its error on 2 cores
        out = subprocess.run([str(torchrun), *args[1:]], env=isolated_env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode != 0
        assert "dinov2_vitb14_reg4_pretrain.pth" in out.stderr + out.stdout
        return
    out = invoke(args[1:], env=isolated_env, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("Error: ") and len(out.stderr.strip().splitlines()) == 1
    expected = "dinov2_vitb14_reg4_pretrain.pth" if "dinov2-vitb14-reg" in command else "dinov2_vitb14_pretrain.pth"
    assert expected in out.stderr and "--weights" in out.stderr


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_readme_demo_command_runs_the_whole_product(readme_demo):
    """`qpm demo --out qpm-demo` exactly as the README says, in a clean home with no data and no network."""
    out, root, isolated_env, tmp_path = (readme_demo[k] for k in ("result", "root", "env", "base"))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = readme_demo["summary"]
    rows = {row["method"]: row for row in summary["table"]}
    assert set(rows) == {"Linear probe (CLS)", "Dense", "QPM (ours)"}
    assert rows["QPM (ours)"]["Accuracy"] > 50.0  # 10 classes: chance is 10 %
    for key in ("Plausibility", "SID@5", "Class-Independence", "Contrastiveness"):
        assert rows["QPM (ours)"][key] is not None
    assert (root / "model.onnx").stat().st_size > 1_000_000
    assert summary["export"]["verified"] if "verified" in summary["export"] else summary["export"]
    figures = list((root / "explanations").glob("*.png"))
    assert figures and all(f.stat().st_size > 10_000 for f in figures)
    assert "QPM (ours)" in out.stdout and str(root / "model.onnx") in out.stdout
    # the demo's QPM run is now the current run, so the README's next commands work as printed
    pointer = json.loads((Path(isolated_env["XDG_CACHE_HOME"]) / "qpm" / "current-run.json").read_text())
    assert pointer["run"] == str(root / "runs" / "shapes-qpm") and pointer["onnx"] == str(root / "model.onnx")
    (tmp_path / "img.png").write_bytes((root / "example.png").read_bytes())
    res = run_qpm(["predict", "img.png"], env=isolated_env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0 and f"using {root / 'model.onnx'}" in res.stderr, res.stderr[-2000:]

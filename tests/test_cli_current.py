"""The design card's commands verbatim after a (small) train, from a fresh working directory with no run path:
``qpm export --onnx``, ``qpm explain img.jpg``, ``qpm predict img.jpg``; then ``qpm runs``, ``qpm select`` and its
--force/stale rule, QPM_MODEL and --model overrides. The CLI in-process (``cli.run``) in an isolated home."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import invoke
from test_readme import CARD_COMMANDS, readme_commands
from test_train_cli import TINY


def card(verb: str) -> list[str]:
    """The README's own command line for ``verb`` (export/explain/predict), as argv after `qpm`."""
    import shlex

    line = next(c for c in readme_commands() if c.startswith(f"qpm {verb}") and c in CARD_COMMANDS)
    return shlex.split(line)[1:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run, recorded as the current run in a private state folder (XDG_CACHE_HOME)."""
    root = tmp_path_factory.mktemp("current")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPM_")}
    env.update(XDG_CONFIG_HOME=str(root / "xdg-config"), XDG_CACHE_HOME=str(root / "xdg-cache"),
               HOME=str(root / "home"), PYTHONUNBUFFERED="1", QPM_RUNS_DIR=str(root / "runs"))
    (root / "home").mkdir()
    work = root / "work"
    work.mkdir()
    res = invoke(["train", *TINY], env=env, cwd=work, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    run = root / "runs" / "shapes-dinov2-vits14"
    assert (run / "model.json").is_file()
    assert f"current run: {run}" in res.stderr
    return {"root": root, "env": env, "run": run}


def _image(path: Path) -> Path:
    from qpmcli.data import load_dataset

    ds = load_dataset("shapes", split="test", n_classes=4, per_class=12, test_per_class=6, image_size=56)
    ds[1].image.convert("RGB").save(path)
    return path


def test_card_commands_work_verbatim_from_a_fresh_directory(trained, tmp_path):
    env, run = trained["env"], trained["run"]
    pointer = Path(env["XDG_CACHE_HOME"]) / "qpm" / "current-run.json"
    doc = json.loads(pointer.read_text())
    assert doc["run"] == str(run) and doc["set_by"] == "train" and doc["onnx"] is None

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    _image(fresh / "img.jpg")

    # before the export, explain/predict fall back to the run itself
    out = invoke(card("predict"), env=env, cwd=fresh, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"using {run} (the current run)" in out.stderr

    out = invoke(card("export"), env=env, cwd=fresh, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"exporting {run} (the current run)" in out.stderr
    assert (run / "model.onnx").is_file()
    assert json.loads(pointer.read_text())["onnx"] == str(run / "model.onnx")

    out = invoke(card("explain"), env=env, cwd=fresh, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"using {run / 'model.onnx'} (the current run's exported model; run {run})" in out.stderr
    assert (fresh / "explanations" / "img_explain.png").stat().st_size > 5000

    out = invoke(card("predict"), env=env, cwd=fresh, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"using {run / 'model.onnx'}" in out.stderr and "1 of 1 images classified with onnx" in out.stdout
    out = invoke(["predict", "img.jpg", "--json"], env=env, cwd=fresh, timeout=300)
    result = json.loads(out.stdout)
    assert result["kind"] == "onnx" and result["num_images"] == 1 and result["num_failed"] == 0

    # an explicit --model or QPM_MODEL wins over the pointer, and says so
    out = invoke(["predict", "img.jpg", "-m", str(run), "--json"], env=env, cwd=fresh, timeout=300)
    assert out.returncode == 0 and f"using {run} (given on the command line)" in out.stderr
    out = invoke(["predict", "img.jpg", "--json"], env={**env, "QPM_MODEL": str(run)}, cwd=fresh, timeout=300)
    assert out.returncode == 0 and f"using {run} (from the model setting (QPM_MODEL))" in out.stderr
    assert json.loads(out.stdout)["kind"] != "onnx"

    # qpm runs marks it current, complete, exported
    out = invoke(["runs", "--json"], env=env, cwd=fresh, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    row = next(r for r in data["runs"] if r["path"] == str(run))
    assert row["current"] and row["status"] == "complete" and row["onnx"] == str(run / "model.onnx")
    assert row["dataset"] == "shapes" and row["backbone"] == "dinov2-vits14" and row["selector"] == "topk"
    assert 0.0 <= row["accuracy"] <= 1.0 and data["current"] == str(run)
    text = invoke(["runs"], env={**env, "COLUMNS": "250"}, cwd=fresh, timeout=120)
    assert "shapes-dinov2-vits14" in text.stdout and "complete" in text.stdout


def test_select_never_silently_replaces_the_runs_selection(trained):
    env, run = trained["env"], trained["run"]
    own = run / "selection.json"
    before = own.read_bytes()
    out = invoke(["select", str(run), "--selector", "topk", "--features", "6", "--per-class", "2", "-q", "--json"],
                  env=env, cwd=trained["root"], timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["out"] == str(run / "selection-topk.json")
    assert own.read_bytes() == before and (run / "selection-topk.json").is_file()

    out = invoke(["select", str(run), "--selector", "topk", "--features", "8", "--per-class", "2", "-o", str(own)],
                  env=env, cwd=trained["root"], timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "--force" in out.stderr
    assert own.read_bytes() == before

    runs = json.loads(invoke(["runs", "--json"], env=env, cwd=trained["root"]).stdout)["runs"]
    assert next(r for r in runs if r["path"] == str(run))["status"] == "complete"
    # --force replaces it (8 features now: not what the model was finetuned on) and marks the model stale
    out = invoke(["select", str(run), "--selector", "topk", "--features", "8", "--per-class", "2", "--force", "-q"],
                  env=env, cwd=trained["root"], timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert own.read_bytes() != before and (run / "stale.json").is_file() and "stale" in out.stderr
    runs = json.loads(invoke(["runs", "--json"], env=env, cwd=trained["root"]).stdout)["runs"]
    assert next(r for r in runs if r["path"] == str(run))["status"].startswith("stale")

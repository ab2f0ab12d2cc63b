"""The foundation: installable CLI, fast torch-free help, plugin discovery through entry points, settings precedence."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qpmcli.errors import ConfigError
from qpmcli.settings import DEFAULT_SEED, resolve_settings


def test_help_is_fast_and_does_not_import_torch(isolated_env):
    code = textwrap.dedent("""
        import sys
        sys.argv = ["qpm", "--help"]
        from qpmcli.cli import main
        try:
            main()
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
        heavy = sorted(m for m in ("torch", "numpy", "ortools", "timm", "onnx", "onnxruntime", "matplotlib")
                       if m in sys.modules)
        print("HEAVY=" + ",".join(heavy))
    """)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=isolated_env, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout and "plugins" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "HEAVY=", out.stdout.splitlines()[-1]
    assert elapsed < 5.0  # generous: a torch import alone takes longer than this on the CI machine


def test_console_script_is_installed_next_to_python():
    script = Path(sys.executable).with_name("qpm")
    assert script.exists(), "pip install must create the `qpm` console script"
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "0.1.0"


def test_plugins_json_lists_kinds_with_packages(qpm):
    out = qpm(["plugins", "--json"])
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) == {"backbones", "datasets", "selectors"}
    for rows in data.values():
        for row in rows:
            assert row["name"] and row["package"]
    builtin = [row for rows in data.values() for row in rows if row["plugin"].startswith("builtin-")]
    assert all(row["package"] == "qpm" for row in builtin)


def _write_dist(site: Path, dist: str, module: str, body: str) -> None:
    """A real installed distribution on sys.path: a module plus a dist-info with a `qpm` entry point."""
    (site / f"{module}.py").write_text(textwrap.dedent(body))
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[qpm]\n{module} = {module}\n")


PLUGIN_BODY = """
    from qpmcli.contracts import DatasetSpec, SelectorSpec
    from qpmcli.hookspecs import hookimpl

    def _make(root=None, split="train", **options):
        raise RuntimeError("not used by this test")

    @hookimpl
    def qpm_datasets():
        return [DatasetSpec("{name}", _make, "a third-party dataset", needs_root=False)]

    @hookimpl
    def qpm_selectors():
        return [SelectorSpec("{name}-selector", _make, "a third-party selector")]
"""


@pytest.mark.e2e  # entry points are read once per interpreter: a fresh process sees the new PYTHONPATH
def test_third_party_plugin_is_discovered_through_its_entry_point(qpm_process, tmp_path):
    qpm = qpm_process
    site = tmp_path / "site"
    site.mkdir()
    _write_dist(site, "qpm-birdwatch", "qpm_birdwatch", PLUGIN_BODY.replace("{name}", "birdwatch"))
    out = qpm(["plugins", "--json"], env_extra={"PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    rows = {row["name"]: row for row in data["datasets"] + data["selectors"]}
    assert rows["birdwatch"]["package"] == "qpm-birdwatch"
    assert rows["birdwatch-selector"]["package"] == "qpm-birdwatch"
    text = qpm(["plugins"], env_extra={"PYTHONPATH": str(site), "COLUMNS": "200"})
    assert "birdwatch" in text.stdout and "qpm-birdwatch" in text.stdout


@pytest.mark.e2e
def test_two_plugins_claiming_one_name_is_an_error_naming_both(qpm_process, tmp_path):
    qpm = qpm_process
    site = tmp_path / "site"
    site.mkdir()
    _write_dist(site, "qpm-alpha", "qpm_alpha", PLUGIN_BODY.replace("{name}", "clash"))
    _write_dist(site, "qpm-beta", "qpm_beta", PLUGIN_BODY.replace("{name}", "clash"))
    out = qpm(["plugins", "--json"], env_extra={"PYTHONPATH": str(site)})
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    line = out.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "qpm-alpha" in line and "qpm-beta" in line and "'clash'" in line


@pytest.fixture
def clean_settings_env(monkeypatch, tmp_path):
    for key in list(__import__("os").environ):
        if key.startswith("QPM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_settings_defaults(clean_settings_env):
    settings, sources = resolve_settings()
    assert settings.seed == DEFAULT_SEED and settings.device == "auto" and settings.data_root is None
    assert set(sources.values()) == {"default"}


def test_settings_precedence_flag_over_env_over_local_file_over_user_file(clean_settings_env, monkeypatch):
    tmp = clean_settings_env
    user = tmp / "cfg" / "qpm" / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text('seed = 1\nnum_workers = 3\ndevice = "cpu"\nruns_dir = "user-runs"\n')
    (tmp / "qpm.toml").write_text('seed = 2\nnum_workers = 5\ndevice = "cuda:1"\n')
    monkeypatch.setenv("QPM_SEED", "3")
    monkeypatch.setenv("QPM_DEVICE", "cuda")

    settings, sources = resolve_settings(seed=4)
    assert settings.seed == 4 and sources["seed"] == "flag"
    assert settings.device == "cuda" and sources["device"] == "env QPM_DEVICE"
    assert settings.num_workers == 5 and sources["num_workers"] == str(tmp / "qpm.toml")
    assert settings.runs_dir == Path("user-runs") and sources["runs_dir"] == str(user)
    assert sources["cache_dir"] == "default"

    settings, _ = resolve_settings()
    assert settings.seed == 3


def test_settings_errors_are_clear(clean_settings_env, monkeypatch):
    tmp = clean_settings_env
    (tmp / "qpm.toml").write_text("seed = [unclosed\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve_settings()
    (tmp / "qpm.toml").write_text("sead = 3\n")
    with pytest.raises(ConfigError, match="unknown key.*sead"):
        resolve_settings()
    (tmp / "qpm.toml").unlink()
    monkeypatch.setenv("QPM_DEVICE", "gpu")
    with pytest.raises(ConfigError, match="device.*env QPM_DEVICE"):
        resolve_settings()


def test_config_command_shows_values_and_sources(qpm, tmp_path):
    (tmp_path / "qpm.toml").write_text('data_root = "~/birds"\n')
    out = qpm(["config", "--json", "--seed", "7"], env_extra={"QPM_NUM_WORKERS": "1"})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["settings"]["seed"] == 7 and data["sources"]["seed"] == "flag"
    assert data["settings"]["num_workers"] == 1 and data["sources"]["num_workers"] == "env QPM_NUM_WORKERS"
    assert data["settings"]["data_root"].endswith("/birds") and "~" not in data["settings"]["data_root"]
    assert data["sources"]["data_root"] == str(tmp_path / "qpm.toml")


def test_user_error_is_one_line_exit_2(qpm):
    out = qpm(["config"], env_extra={"QPM_DEVICE": "gpu"})
    assert out.returncode == 2
    assert out.stderr.startswith("Error: ") and len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr

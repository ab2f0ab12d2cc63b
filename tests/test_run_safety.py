"""Issue 28 regressions that need more than one hostile input: full disks, run-folder locks, what killed commands
leave behind, the order of effects, folders that hold the user's files, caches that do not belong to a run, plugins
that misbehave, and ``qpm doctor`` on a full disk. The one-line hostile inputs are the table of tests/test_hostile.py.

Everything goes through the CLI (``qpm`` in this process); a real process (``e2e``) only where one is essential:
SIGKILL, a process killed by SIGBUS, two concurrent trainings, a plugin in a fresh interpreter.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from builders import make_tiny_run
from conftest import copy_run

TINY = ["--backbone", "dinov2-vits14", "--weights", "random", "--backbone-option", "image_size=56",
        "--backbone-option", 'arch={"depth": 1, "embed_dim": 32, "num_heads": 2}',
        "--dataset", "shapes", "--dataset-option", "n_classes=4", "--dataset-option", "per_class=12",
        "--dataset-option", "test_per_class=6", "--dataset-option", "image_size=56",
        "--selector", "topk", "--features", "6", "--per-class", "2", "--dense-features", "16", "--hidden-size", "32",
        "--dense-epochs", "2", "--finetune-epochs", "2", "--batch-size", "8", "--device", "cpu",
        "--metrics", "fast", "--quiet"]


def digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr and len(lines) == 1 and lines[0].startswith("Error: "), res.stderr[-3000:]
    return lines[0]


def dead_pid() -> int:
    """The pid of a process that has exited (what a kill -9 leaves behind)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` (root only: CI runs as root); skips the test where mounting is
    impossible."""
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or 'not root'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ------------------------------------------------------------------------------------------------ full disks
BIG_SHAPES = ["-b", "efficientnet-lite0", "-d", "shapes", "-O", "n_classes=4", "-O", "per_class=40",
              "-O", "test_per_class=40", "-O", "image_size=32"]  # 160 train images: about 1 MiB of tokens

FULL_DISK_SCRIPT = """
import collections, shutil, sys
Usage = collections.namedtuple("Usage", "total used free")
shutil.disk_usage = lambda path: Usage(1 << 40, 0, 1 << 40)  # the free-space check passes: the disk fills later
from qpmcli.cli import run
sys.exit(run(sys.argv[1:]))
"""


@pytest.mark.e2e  # a regression would kill the process with SIGBUS: it needs a process of its own
@pytest.mark.parametrize("command", ["extract", "train"])
@pytest.mark.parametrize("space_check", ["checked", "bypassed"])
def test_a_full_disk_during_a_cache_build_is_one_line_and_leaves_no_partial_cache(tmp_path, isolated_env, command,
                                                                                 space_check):
    """A token cache on a 512 KiB tmpfs (it needs about 1 MiB): the free-space check refuses it up front; with the
    check bypassed (disk_usage patched), posix_fallocate finds the full disk before any page is mapped. Either way:
    one line, exit 2 (the process used to die of SIGBUS, exit 135, no message), and nothing left in the cache."""
    with tmpfs(tmp_path / "mnt", "512k") as mnt:
        cache = mnt / "cache"
        if command == "extract":
            args = ["extract", *BIG_SHAPES, "--image-size", "32", "--split", "train", "--num-workers", "0",
                    "--cache-dir", str(cache)]
        else:
            args = ["train", *BIG_SHAPES, "--backbone-option", "image_size=32", "--run-dir", str(tmp_path / "run"),
                    "--features", "4", "--per-class", "2"]
        env = {**isolated_env, "QPM_DEVICE": "cpu", "QPM_CACHE_DIR": str(cache), "QPM_NUM_WORKERS": "0"}
        prog = [sys.executable, "-m", "qpmcli.cli"]
        if space_check == "bypassed":
            (tmp_path / "full_disk.py").write_text(FULL_DISK_SCRIPT)
            prog = [sys.executable, str(tmp_path / "full_disk.py")]
        res = subprocess.run([*prog, *args, "-q"], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=600)
        line = one_error_line(res)
        if space_check == "checked":
            assert "not enough free space for the token cache" in line and "MiB are free" in line, line
        else:
            assert "no space left for the token cache" in line and "nothing was written" in line, line
        assert not cache.exists() or not list(cache.iterdir()), list(cache.iterdir())  # no partial, no lock
        assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- run-folder lock
def test_a_second_writer_of_a_run_folder_gets_one_line_naming_the_holder(qpm, tmp_path):
    """While one process holds a run folder, `qpm train --resume`, `qpm evaluate` and `qpm conformal` of it stop at
    once with one line naming the holder (pid, command, host); nothing in the folder changes; the lock file goes with
    the holder."""
    import socket

    from qpmcli.artifact import LOCK, run_lock

    run = make_tiny_run(tmp_path / "run")
    before = digest_tree(run)
    with run_lock(run, "qpm train --resume"):
        assert (run / LOCK).is_file()
        for args in (["train", *TINY, "--resume", "--run-dir", str(run)], ["evaluate", str(run), "-q"],
                     ["conformal", str(run), "-q"]):
            line = one_error_line(qpm(args))
            assert f"{run} is in use by another qpm process (pid {os.getpid()}, `qpm train --resume` on host " \
                   f"{socket.gethostname()}" in line, line
    assert digest_tree(run) == before and not (run / LOCK).exists()


@pytest.mark.e2e  # two trainings at once: the first one is a process of its own
def test_two_trainings_of_one_run_folder_the_second_stops_naming_the_first(qpm, tmp_path, isolated_env):
    run = tmp_path / "run"
    env = {**isolated_env, "QPM_CACHE_DIR": str(tmp_path / "cache")}
    first = subprocess.Popen([sys.executable, "-m", "qpmcli.cli", "train", *TINY, "--dense-epochs", "200",
                              "--run-dir", str(run)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (run / ".qpm.lock").is_file():
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        time.sleep(0.5)  # the holder has written its name
        line = one_error_line(qpm(["train", *TINY, "--resume", "--run-dir", str(run)],
                                  env_extra={"QPM_CACHE_DIR": str(tmp_path / "cache")}))
        assert f"is in use by another qpm process (pid {first.pid}, `qpm train`" in line, line
    finally:
        first.kill()
        first.wait()


# ------------------------------------------------------------------------------ what killed commands leave behind
def test_clean_stale_temps_removes_only_qpm_names_of_dead_processes(tmp_path):
    from qpmcli.files import clean_stale_temps

    gone, alive = dead_pid(), os.getpid()
    names = {f".model.onnx.{gone}.staged": False, f"..model.onnx.{gone}.staged.{gone}.abcd_123.tmp": False,
             f".metrics.json.{gone}.x1y2z3w4.tmp": False,  # atomic_path of a killed writer
             f".model.onnx.{alive}.staged": True,  # a writer that still runs
             f".notes.{gone}.tmp": True, "model.onnx.staged": True, f"my.{gone}.staged": True,  # not qpm's names
             ".metrics.json.abcdefgh.tmp": True}  # no pid: whose it is cannot be known
    for name in names:
        (tmp_path / name).write_text("x")
    (tmp_path / f"qpm-int8-{gone}-k3j2h1").mkdir()
    (tmp_path / f"qpm-int8-{gone}-k3j2h1" / "dynamic.onnx").write_text("x")
    (tmp_path / f"qpm-int8-{alive}-aaaa").mkdir()
    removed = clean_stale_temps([tmp_path], dirs=True)
    assert sorted(p.name for p in removed) == sorted([n for n, keep in names.items() if not keep]
                                                     + [f"qpm-int8-{gone}-k3j2h1"])
    assert all((tmp_path / n).exists() == keep for n, keep in names.items())
    assert (tmp_path / f"qpm-int8-{alive}-aaaa").is_dir()


def test_the_next_export_cleans_what_a_killed_export_left(qpm, tmp_path):
    """Files with the staged/temporary names of a killed export (its pid is gone) are removed by the next export of
    the run; the user's files and the export's results are as they should be."""
    run = make_tiny_run(tmp_path / "run")
    gone = dead_pid()
    leftovers = [run / f".model.onnx.{gone}.staged", run / f"..model.onnx.{gone}.staged.{gone}.q8w7e6r5.tmp",
                 run / f".model.adapter.onnx.{gone}.staged"]
    for p in leftovers:
        p.write_bytes(os.urandom(4096))
    (run / "my-notes.staged.txt").write_text("mine\n")
    res = qpm(["export", str(run), "--onnx", "--no-adapter", "-q", "--json"])
    assert res.returncode == 0, res.stderr
    assert not any(p.exists() for p in leftovers)
    assert (run / "my-notes.staged.txt").read_text() == "mine\n" and (run / "model.onnx").is_file()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


def test_a_resumed_cache_build_drops_the_half_written_files_of_the_killed_one(tmp_path):
    """A build interrupted after two chunks, with the half-written marker and compaction file a kill leaves: the
    resumed build finishes and its cache holds none of them."""
    from qpmcli.backbone import load_backbone
    from qpmcli.cache import build_cache
    from qpmcli.data import load_dataset

    backbone = load_backbone("efficientnet-lite0", image_size=32, device="cpu")
    data = load_dataset("shapes", split="test", n_classes=2, test_per_class=6, image_size=32)

    class StopsAtRow8:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            if i >= 8:
                raise KeyboardInterrupt
            return self.inner[i]

    with pytest.raises(KeyboardInterrupt):
        build_cache(backbone, StopsAtRow8(data), "test", tmp_path / "c", batch_size=4, chunk_images=4, progress=False)
    (partial,) = (tmp_path / "c").glob("*.partial")
    assert len(list((partial / "done").glob("*.json"))) == 2
    gone = dead_pid()
    (partial / "done" / f".000002.json.{gone}.ab12cd34.tmp").write_text("{half")
    (partial / f".tokens.npy.{gone}.ef56gh78.tmp").write_bytes(b"\0" * 128)
    cache = build_cache(backbone, data, "test", tmp_path / "c", batch_size=4, chunk_images=4, progress=False)
    assert len(cache) == 12 and not [p.name for p in cache.path.iterdir() if p.name.startswith(".")]


@pytest.mark.e2e  # SIGKILL needs a process of its own
def test_after_kill_9_of_an_int8_export_the_next_export_leaves_nothing_behind(tmp_path, isolated_env):
    run = make_tiny_run(tmp_path / "run")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**isolated_env, "TMPDIR": str(tmp), "QPM_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "qpmcli.cli", "export", str(run), "--onnx", "--int8", "--min-agreement", "0", "-q"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp.glob(f"qpm-int8-{proc.pid}-*/*.onnx")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(run.glob(".*.staged")) and list(tmp.glob("qpm-int8-*")), "the kill should land mid-quantization"
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]
    assert not list(tmp.glob("qpm-*"))  # (torch's own caches may live there too)
    assert (run / "model.onnx").is_file() and (run / "model.int8.onnx").is_file()


@pytest.mark.e2e  # SIGKILL needs a process of its own
@pytest.mark.slow
def test_after_kill_9_of_a_training_the_resume_cleans_its_temporary_files(qpm, tmp_path, isolated_env):
    run = tmp_path / "run"
    env = {**isolated_env, "QPM_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "qpmcli.cli", "train", *TINY, "--run-dir", str(run)], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "log.jsonl").is_file():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    planted = [run / f".metrics.json.{proc.pid}.a1b2c3d4.tmp",
               run / "checkpoints" / f".dense.json.{proc.pid}.z9y8x7w6.tmp"]
    for p in planted:  # what a kill in the middle of an atomic write leaves (the window is too short to hit)
        p.parent.mkdir(exist_ok=True)
        p.write_text("{half")
    res = qpm(["train", *TINY, "--resume", "--run-dir", str(run)],
              env_extra={"QPM_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-3000:]
    assert not [p for p in run.rglob(".*") if p.name.endswith((".tmp", ".staged"))]
    assert (run / "model.json").is_file()


@pytest.mark.slow  # the dynamo exporter takes a while
def test_an_export_through_the_dynamo_exporter_leaves_no_external_data_file(qpm, tmp_path):
    """Opsets beyond the TorchScript exporter's (21+) go through the dynamo exporter, which wrote the weights to an
    external ``<temporary name>.data`` file: the export then crashed reading it back and left 15 MB behind."""
    import onnx

    run = make_tiny_run(tmp_path / "run")
    before = {p.name for p in run.iterdir()}
    res = qpm(["export", str(run), "--onnx", "--no-adapter", "--opset", "21", "-q"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert {p.name for p in run.iterdir()} == before | {"model.onnx"}
    assert max(o.version for o in onnx.load(str(run / "model.onnx")).opset_import if o.domain in ("", "ai.onnx")) >= 21


# ------------------------------------------------------------------------------------------ the order of effects
def test_a_damaged_current_run_pointer_is_a_warning_after_a_finished_export(qpm, tmp_path):
    """The export is written and verified; recording it in a damaged pointer fails: exit 0, the files in place, one
    warning line, the pointer left as it was."""
    run = make_tiny_run(tmp_path / "run")
    state = tmp_path / "xdg-cache" / "qpm"
    state.mkdir(parents=True)
    (state / "current-run.json").write_text("{damaged")
    res = qpm(["export", str(run), "--onnx", "--no-adapter", "-q", "--json"])
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["current"] is False and (run / "model.onnx").is_file()
    (warning,) = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert warning.startswith("warning: the export is written, but the current-run pointer was not updated")
    assert (state / "current-run.json").read_text() == "{damaged"


# ------------------------------------------------------------------------------------- folders of the user
def test_force_lets_train_use_a_folder_with_other_files(qpm, tmp_path):
    """--force passes the folder check (the run then fails on its dataset, after it); without it, nothing starts."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")
    args = ["train", "-b", "efficientnet-lite0", "-d", "imagefolder", "--data-root", str(tmp_path / "nothing"),
            "--run-dir", str(folder), "-q"]
    assert "is not empty and is not a qpm folder" in one_error_line(qpm(args))
    line = one_error_line(qpm([*args, "--force"]))
    assert "not a qpm folder" not in line and "nothing" in line, line
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_explain_into_the_image_folder_keeps_the_users_files_and_never_explains_its_own(qpm, tmp_path):
    """`qpm explain imgs -o imgs`: the user's cat_explain.png is never replaced by cat.png's figure (cat.png is
    skipped, and said so) but is explained like any image of the user's; a second run explains no figure of the
    first."""
    run = make_tiny_run(tmp_path / "run")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image

    for name in ("cat.png", "cat_explain.png", "dog.png"):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(imgs / name)
    mine = (imgs / "cat_explain.png").read_bytes()
    res = qpm(["explain", str(imgs), "-m", str(run), "-o", str(imgs), "--device", "cpu", "--json"])
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert (imgs / "cat_explain.png").read_bytes() == mine
    assert [s["image"] for s in summary["skipped"]] == [str(imgs / "cat.png")]
    assert "would replace" in summary["skipped"][0]["reason"] and "skipped" in res.stderr
    assert [Path(i["image"]).name for i in summary["images"]] == ["cat_explain.png", "dog.png"]
    assert summary["files"] == ["cat_explain_explain.png", "dog_explain.png"]
    again = qpm(["explain", str(imgs), "-m", str(run), "-o", str(imgs), "--device", "cpu", "--json"])
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert [Path(i["image"]).name for i in summary["images"]] == ["cat_explain.png", "dog.png"]  # no figure of ours
    assert {Path(s["image"]).name for s in summary["skipped"]} == {"cat.png", "cat_explain_explain.png",
                                                                   "dog_explain.png"}
    assert (imgs / "cat_explain.png").read_bytes() == mine
    assert sorted(p.name for p in imgs.iterdir()) == ["cat.png", "cat_explain.png", "cat_explain_explain.png",
                                                      "dog.png", "dog_explain.png", "explanations.json"]


# --------------------------------------------------------------------------------- caches that are not the run's
def test_evaluate_refuses_swapped_caches_and_leaves_metrics_json_as_it_was(qpm, trained_run, tmp_path):
    """config.json with the train and test caches swapped: evaluate used to rewrite metrics.json (accuracy on the
    training images); now it names the cache and the split, and metrics.json stays byte-identical."""
    run = copy_run(trained_run["run"], tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    assert set(config["cache_keys"]) == {"train", "test"}  # train records the caches' fingerprints
    config["caches"] = {"train": config["caches"]["test"], "test": config["caches"]["train"]}
    (run / "config.json").write_text(json.dumps(config))
    before = (run / "metrics.json").read_bytes()
    line = one_error_line(qpm(["evaluate", str(run), "--metrics", "Accuracy", "-q"]))
    assert "as the train token cache, but it does not belong to this run (it holds the test split)" in line, line
    assert (run / "metrics.json").read_bytes() == before


def test_evaluate_refuses_a_cache_whose_fingerprint_is_not_the_runs(qpm, trained_run, tmp_path):
    run = copy_run(trained_run["run"], tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["cache_keys"]["test"] = "0123456789abcdef"  # the cache the run was trained on was another one
    (run / "config.json").write_text(json.dumps(config))
    line = one_error_line(qpm(["evaluate", str(run), "--metrics", "Accuracy", "-q"]))
    assert "is not the 0123456789abcdef the run was trained on" in line, line


# -------------------------------------------------------------------------------------------------- plugins
def _plugin(site: Path, module: str, body: str, package: str) -> None:
    (site / f"{module}.py").write_text(body)
    info = site / f"{package}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[qpm]\n{module} = {module}\n")


HOOK_NOT_A_LIST = """
import pluggy
print("hello from the plugin at import")
hookimpl = pluggy.HookimplMarker("qpm")

@hookimpl
def qpm_datasets():
    return "shapes"
"""

PRINTS_AND_WORKS = """
import pluggy
print("hello from the plugin at import")
hookimpl = pluggy.HookimplMarker("qpm")

@hookimpl
def qpm_datasets():
    print("hello from the hook")
    return []
"""


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    """A folder on sys.path for fake installed plugin packages; the registry is rebuilt around the test."""
    from qpmcli.registry import get_registry

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    get_registry.cache_clear()
    yield site
    get_registry.cache_clear()


@pytest.mark.parametrize("body, message", [
    ("import not_a_module_anywhere\n", "the qpm plugin 'brokenplug' (brokenplug) of package 'broken-plug' failed to "
                                       "load: ModuleNotFoundError: No module named 'not_a_module_anywhere'"),
    ("import sys\nsys.exit(3)\n", "package 'broken-plug' failed to load: it called sys.exit(3)"),
    (HOOK_NOT_A_LIST, "plugin 'brokenplug' from package 'broken-plug': qpm_datasets() must return a list of "
                      "dataset specs, not a str"),
])
def test_a_broken_plugin_is_one_line_naming_its_package(qpm, plugin_site, body, message):
    _plugin(plugin_site, "brokenplug", body, "broken-plug")
    res = qpm(["plugins", "--json"])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1 and message in errors[0], res.stderr
    assert not res.stdout


def test_a_plugin_that_prints_does_not_break_json_output(qpm, plugin_site):
    _plugin(plugin_site, "chatty", PRINTS_AND_WORKS, "chatty-plug")
    res = qpm(["plugins", "--json"])
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)  # stdout is JSON only
    assert "shapes" in {d["name"] for d in data["datasets"]}
    assert "hello from the plugin at import" in res.stderr and "hello from the hook" in res.stderr


@pytest.mark.e2e  # what a fresh interpreter does with a plugin that prints or exits at import
@pytest.mark.parametrize("module, body", [("chatty", PRINTS_AND_WORKS), ("exiter", "import sys\nsys.exit(0)\n")])
def test_plugins_in_a_fresh_interpreter(tmp_path, isolated_env, module, body):
    site = tmp_path / "site"
    site.mkdir()
    _plugin(site, module, body, f"{module}-plug")
    env = {**isolated_env, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "qpmcli.cli", "plugins", "--json"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    if module == "chatty":
        assert res.returncode == 0 and json.loads(res.stdout)["datasets"], res.stderr
    else:  # sys.exit(0) at import used to end qpm with exit 0 and no output at all
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert "'exiter-plug' failed to load: it called sys.exit(0)" in res.stderr


# ------------------------------------------------------------------------------------------------------ doctor
def test_doctor_is_not_ready_with_a_full_cache_disk(qpm, tmp_path):
    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        res = qpm(["doctor", "--json", "-b", "efficientnet-lite0", "-d", "shapes"],
                  env_extra={"QPM_CACHE_DIR": str(mnt / "cache")})
    assert res.returncode == 1, res.stderr
    report = json.loads(res.stdout)
    (cache,) = [c for c in report["checks"] if c["name"] == "cache dir"]
    assert cache["ok"] is False and cache["free_gib"] < 0.01 and "token caches will not fit" in cache["detail"]
    assert not report["ready"] and report["missing"] == ["cache dir"]


# ---------------------------------------------------------------------------------------------------- details
def test_a_prototype_crop_of_a_1xN_image_is_never_empty():
    """A cache built before training images had a minimum size may hold a 1-pixel-high image: its prototype crop
    (the stage where training used to crash after all the work, and again on --resume) is at least 1 x 1 pixel."""
    from qpmcli.prototypes import crop_box

    for size in [(50, 1), (1, 50), (1, 1), (3, 2)]:
        for r in range(4):
            for c in range(4):
                x0, y0, x1, y1 = crop_box(r, c, (4, 4), size, 3.0)
                assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1], (size, r, c)


def test_a_selection_of_a_newer_format_is_refused_naming_both_versions(tmp_path):
    from qpmcli.errors import SelectionError
    from qpmcli.selection import load_selection

    path = tmp_path / "selection.json"
    path.write_text(json.dumps({"format": "qpm-selection/2", "features": [0], "weight": [[1.0]]}))
    with pytest.raises(SelectionError, match=r"format version 2, but this qpm \(.*\) reads format version 1"):
        load_selection(path)

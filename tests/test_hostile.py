"""Hostile inputs, table-driven (issues 19 and 28): images, model files, ONNX metadata, npz files, dataset trees,
settings, option values and paths, run folders and the folders of the user, format versions, ``qpm runs`` on damaged
runs, each given to the real CLI (``qpmcli.cli.run`` in this process, one case after another: the environment and the
working directory are process-wide).

Every case ends with its exit code (2 for a refused input: exactly one line on stderr, ``Error: ...``; 0 for a command
that must cope, like ``qpm runs`` listing a damaged run: nothing on stderr), no traceback, and every file that existed
before the command byte-identical afterwards (the whole temporary tree is hashed before and after; new files may
appear, but none with a temporary name). The expensive things (tiny runs, their ONNX exports, a token cache) are built
once per module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from builders import FEATURES, make_tiny_run
from conftest import invoke


# --------------------------------------------------------------------------------------------------- the world
def png_bytes(width: int = 24, height: int = 20, seed: int = 0) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG header claiming ``width`` x ``height`` pixels, with no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Built once: a tiny run with an exported model.onnx, a second run (4 classes) with its own export, an image, a
    token cache built by ``qpm extract`` and a run on that cache's backbone (efficientnet-lite0 at 32 px, 2 classes)."""
    from qpmcli.export import export_onnx

    root = tmp_path_factory.mktemp("hostile-world")
    run = make_tiny_run(root / "run")
    export_onnx(run, adapter=False)
    other = make_tiny_run(root / "other", class_names=["a", "b", "c", "d"], seed=1)
    export_onnx(other, adapter=False)
    (root / "good.png").write_bytes(png_bytes())
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPM_")}
    res = invoke([*EXTRACT, "--cache-dir", str(root / "cache"), "-q"],
                 {**env, "QPM_DEVICE": "cpu", "HOME": str(root), "XDG_CONFIG_HOME": str(root / "xdg")}, root)
    assert res.returncode == 0, res.stderr
    (cache,) = [p for p in (root / "cache").iterdir() if p.is_dir()]
    eff = make_tiny_run(root / "effrun", "efficientnet-lite0", {"image_size": 32}, class_names=["c0", "c1"],
                        weights=None)
    doc = json.loads((eff / "config.json").read_text())
    doc["caches"] = {"train": str(cache), "test": str(cache)}  # the train entry names the test split
    (eff / "config.json").write_text(json.dumps(doc))
    return root


# a small CLI-built token cache (efficientnet-lite0 at 32 px: a 1x1 grid), reused by the cache cases
EXTRACT = ["extract", "-b", "efficientnet-lite0", "-d", "shapes", "--split", "test", "--image-size", "32",
           "-O", "n_classes=2", "-O", "per_class=2", "-O", "test_per_class=3", "-O", "image_size=32",
           "--num-workers", "0"]


def _copy_run(world: Path, d: Path, name: str = "run") -> Path:
    shutil.copytree(world / name, d / name)
    return d / name


def _edit_json(path: Path, fn: Callable[[dict], object]) -> None:
    doc = json.loads(path.read_text())
    new = fn(doc)
    path.write_text(json.dumps(doc if new is None else new))


def _onnx_with_props(src: Path, dst: Path, change: Callable[[dict[str, str]], dict[str, str]]) -> Path:
    import onnx

    proto = onnx.load(str(src))
    props = change({e.key: e.value for e in proto.metadata_props})
    del proto.metadata_props[:]
    for k, v in props.items():
        e = proto.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(proto, str(dst))
    return dst


def _npz(path: Path, **arrays) -> Path:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def _problem(C: int = 4, nf: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    r = rng.uniform(0, 1, (nf, nf))
    return {"A": rng.uniform(0, 1, (nf, C)), "R": (r + r.T) / 2}


# ------------------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    id: str
    setup: Callable[[Path, Path], list[str]]  # (case dir, world) -> qpm arguments
    expect: str  # a regex the one stderr line must match (code 2), else stdout (code 0 or 1)
    env: dict[str, str] = field(default_factory=dict)
    code: int = 2  # the exit code: 2 = refused with one line; 0 = coped (nothing on stderr)
    marks: tuple = ()


def _predict_image(data: bytes, name: str = "x.png"):
    def setup(d: Path, w: Path) -> list[str]:
        (d / name).write_bytes(data)
        return ["predict", str(d / name), "-m", str(w / "run" / "model.onnx"), "--device", "cpu"]
    return setup


def _run_json(edit: Callable[[dict], object], command: str = "predict"):
    def setup(d: Path, w: Path) -> list[str]:
        run = _copy_run(w, d)
        _edit_json(run / "model.json", edit)
        if command == "export":
            return ["export", str(run), "--onnx", "--out", str(d / "m.onnx")]
        if command == "explain":
            return ["explain", str(w / "good.png"), "-m", str(run), "-o", str(d / "ex"), "--device", "cpu"]
        return ["predict", str(w / "good.png"), "-m", str(run), "--device", "cpu"]
    return setup


def _cut_names(doc: dict) -> None:
    doc["class_names"] = doc["class_names"][:3]


def _set(key: str, value: object) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        doc[key] = value
    return edit


def _weights_outside(d: Path, w: Path) -> list[str]:
    run = _copy_run(w, d)
    shutil.copy(run / "model.safetensors", d / "outside.safetensors")  # a valid file, but not the run's
    _edit_json(run / "model.json", _set("weights_file", "../outside.safetensors"))
    return ["predict", str(w / "good.png"), "-m", str(run), "--device", "cpu"]


def _pickled_weights(d: Path, w: Path) -> list[str]:
    import torch

    run = _copy_run(w, d)
    marker = d / "pwned"
    torch.save({"x": torch.zeros(1)}, run / "model.safetensors")  # a pickle where safetensors belong
    return ["predict", str(w / "good.png"), "-m", str(run), "--device", "cpu"] if not marker.exists() else []


def _other_weights(d: Path, w: Path) -> list[str]:
    run = _copy_run(w, d)
    shutil.copy(w / "other" / "model.safetensors", run / "model.safetensors")
    return ["predict", str(w / "good.png"), "-m", str(run), "--device", "cpu"]


def _prototypes_outside(d: Path, w: Path) -> list[str]:
    run = _copy_run(w, d)
    (d / "secret.png").write_bytes(png_bytes(8, 8))
    (run / "prototypes").mkdir()
    (run / "prototypes" / "prototypes.json").write_text(json.dumps({
        "format": "qpm-prototypes", "format_version": 1,
        "features": {"3": [{"file": "../../secret.png", "class": "square", "activation": 1.0}]}}))
    return ["export", str(run), "--onnx", "--out", str(d / "m.onnx")]


def _prototypes_absolute(d: Path, w: Path) -> list[str]:
    run = _copy_run(w, d)
    (run / "prototypes").mkdir()
    (run / "prototypes" / "prototypes.json").write_text(json.dumps({
        "format": "qpm-prototypes", "format_version": 1,
        "features": {"3": [{"file": "/etc/hostname", "class": "square", "activation": 1.0}]}}))
    return ["explain", "--class", "square", "-m", str(run), "-o", str(d / "ex"), "--device", "cpu"]


def _weights_symlink(d: Path, w: Path) -> list[str]:
    run = _copy_run(w, d)
    shutil.move(run / "model.safetensors", d / "elsewhere.safetensors")
    (run / "model.safetensors").symlink_to(d / "elsewhere.safetensors")  # the name is fine, the target is not
    return ["predict", str(w / "good.png"), "-m", str(run), "--device", "cpu"]


def _prototypes_not_a_name(d: Path, w: Path) -> list[str]:
    run = _copy_run(w, d)
    (run / "prototypes").mkdir()
    (run / "prototypes" / "prototypes.json").write_text(json.dumps({
        "format": "qpm-prototypes", "format_version": 1,
        "features": {"3": [{"file": {"path": "x.png"}, "class": "square", "activation": 1.0}]}}))
    return ["export", str(run), "--onnx", "--out", str(d / "m.onnx")]


def _onnx_case(change: Callable[[dict[str, str]], dict[str, str]], command: str = "predict"):
    def setup(d: Path, w: Path) -> list[str]:
        m = _onnx_with_props(w / "run" / "model.onnx", d / "m.onnx", change)
        if command == "explain":
            return ["explain", str(w / "good.png"), "-m", str(m), "-o", str(d / "ex"), "--device", "cpu"]
        return ["predict", str(w / "good.png"), "-m", str(m), "--device", "cpu"]
    return setup


def _other_runs_metadata(d: Path, w: Path) -> list[str]:
    from qpmcli.modelfile import read_onnx_props

    theirs = read_onnx_props(w / "other" / "model.onnx")
    m = _onnx_with_props(w / "run" / "model.onnx", d / "m.onnx", lambda _props: theirs)
    return ["predict", str(w / "good.png"), "-m", str(m), "--device", "cpu"]


def _prop(key: str, value: object, raw: bool = False):
    def change(props: dict[str, str]) -> dict[str, str]:
        props["qpm." + key] = value if raw else json.dumps(value)
        return props
    return change


def _bomb_prototype(props: dict[str, str]) -> dict[str, str]:
    import base64

    entry = {"png_b64": base64.b64encode(bomb_png(40_000, 40_000)).decode(), "class": "square", "activation": 1.0}
    props["qpm_prototypes"] = json.dumps({str(f): [entry] for f in FEATURES})
    return props


def _select_npz(**arrays):
    def setup(d: Path, w: Path) -> list[str]:
        p = _npz(d / "p.npz", **arrays)
        return ["select", "--problem", str(p), "--features", "4", "--per-class", "2", "--time-limit", "5",
                "-o", str(d / "sel.json")]
    return setup


def _nan_problem() -> dict:
    p = _problem()
    p["A"][3, 1] = np.nan
    return p


def _names_problem() -> dict:
    return {**_problem(), "class_names": np.array(["a", "b", "c"])}  # 3 names for 4 classes


def _dense_features_nan(d: Path, w: Path) -> list[str]:
    run = _copy_run(w, d)
    f = np.random.default_rng(0).uniform(0, 1, (20, 16)).astype(np.float32)
    f[4, 2] = np.nan
    _npz(run / "dense_features.npz", features=f, labels=np.arange(20) % 5)
    return ["select", str(run), "--features", "6", "--per-class", "2", "--time-limit", "5", "-o", str(d / "s.json")]


def _select(*extra: str):
    def setup(d: Path, w: Path) -> list[str]:
        p = _npz(d / "p.npz", **_problem())
        return ["select", "--problem", str(p), "--features", "4", "--per-class", "2", *extra]
    return setup


def _existing_file(command: list[str], flag: str):
    def setup(d: Path, w: Path) -> list[str]:
        (d / "taken").write_text("mine\n")
        args = [a.replace("{w}", str(w)).replace("{d}", str(d)) for a in command]
        return [*args, flag, str(d / "taken")]
    return setup


def _select_out_dir(d: Path, w: Path) -> list[str]:
    p = _npz(d / "p.npz", **_problem())
    (d / "outdir").mkdir()
    return ["select", "--problem", str(p), "--features", "4", "--per-class", "2", "--time-limit", "5", "-o",
            str(d / "outdir")]


def _args(*args: str):
    def setup(d: Path, w: Path) -> list[str]:
        return [a.replace("{w}", str(w)).replace("{d}", str(d)) for a in args]
    return setup


def _imagefolder(kind: str):
    def setup(d: Path, w: Path) -> list[str]:
        root = d / "ds"
        for split in ("train", "test"):
            for cls in ("cat", "dog"):
                (root / split / cls).mkdir(parents=True)
                for i in range(3):
                    (root / split / cls / f"{i}.png").write_bytes(png_bytes(seed=i))
        if kind == "extra_test_class":
            (root / "test" / "cow").mkdir()
            (root / "test" / "cow" / "0.png").write_bytes(png_bytes())
        elif kind == "bad_late_image":
            (root / "train" / "dog" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
        elif kind == "bomb":
            (root / "test" / "cat" / "1.png").write_bytes(bomb_png(20_000, 20_000))
        return ["data", "check", "-d", "imagefolder", "--data-root", str(root)]
    return setup


def _cache_case(damage: str):
    def setup(d: Path, w: Path) -> list[str]:
        shutil.copytree(w / "cache", d / "cache")
        (folder,) = [p for p in (d / "cache").iterdir() if p.is_dir()]
        tokens = folder / "tokens.npy"
        raw = bytearray(tokens.read_bytes())
        if damage == "flip":
            raw[-7] ^= 0x40  # one value of the last row: the open-time probe of the last row catches it too
            raw[len(raw) // 2 + 64] ^= 0x01  # and one in the middle, which only the full check sees
            tokens.write_bytes(bytes(raw))
        elif damage == "flip-middle":
            raw[len(raw) // 2 + 64] ^= 0x01
            tokens.write_bytes(bytes(raw))
        elif damage == "truncate":
            tokens.write_bytes(bytes(raw[: len(raw) // 2]))
        elif damage == "manifest":
            (folder / "manifest.json").write_text("[1, 2")
        elif damage == "manifest-nesting":
            (folder / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
        elif damage == "pickle":
            import pickle

            (folder / "labels.npy").write_bytes(pickle.dumps([1, 2, 3]))
        return [*EXTRACT, "--cache-dir", str(d / "cache"), "--verify"]
    return setup


def _bad_config(d: Path, w: Path) -> list[str]:
    cfg = d / "xdg" / "qpm"
    cfg.mkdir(parents=True)
    (cfg / "config.toml").write_text("device = [unclosed\n")
    return ["config"]


def _bad_local_toml(d: Path, w: Path) -> list[str]:
    (d / "qpm.toml").write_text('num_workers = "many"\n')  # ./qpm.toml in the working directory
    return ["config"]


# ------------------------------------------------------------------------ issue 28: folders, run files, formats
def _thin_images(d: Path) -> Path:
    """An imagefolder tree whose train split holds a 1x50 and a 50x1 image among normal ones."""
    root = d / "ds"
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                (root / split / cls / f"{i}.png").write_bytes(png_bytes(seed=i))
    (root / "train" / "cat" / "thin.png").write_bytes(png_bytes(50, 1))
    (root / "train" / "dog" / "tall.png").write_bytes(png_bytes(1, 50))
    return root


def _data_check_thin(d: Path, w: Path) -> list[str]:
    return ["data", "check", "-d", "imagefolder", "--data-root", str(_thin_images(d))]


def _train_thin(d: Path, w: Path) -> list[str]:
    return ["train", "-b", "efficientnet-lite0", "--backbone-option", "image_size=32", "-d", "imagefolder",
            "--data-root", str(_thin_images(d)), "--features", "4", "--per-class", "2", "--run-dir", str(d / "r")]


def _explain_over_user_figure(d: Path, w: Path) -> list[str]:
    imgs = d / "imgs"
    imgs.mkdir()
    (imgs / "cat.png").write_bytes(png_bytes(seed=1))
    (imgs / "cat_explain.png").write_bytes(png_bytes(seed=2))  # the user's own file, named like qpm's figure
    return ["explain", str(imgs / "cat.png"), "-m", str(w / "run" / "model.onnx"), "-o", str(imgs), "--device",
            "cpu"]


def _explain_user_file(name: str, *extra: str):
    def setup(d: Path, w: Path) -> list[str]:
        (d / "ex").mkdir()
        (d / "ex" / name).write_text("the user's own notes\n")
        return ["explain", str(w / "good.png"), "-m", str(w / "run" / "model.onnx"), "-o", str(d / "ex"),
                "--device", "cpu", *extra]
    return setup


def _explain_own_figures_only(d: Path, w: Path) -> list[str]:
    ex = d / "ex"
    ex.mkdir()
    (ex / "cat_explain.png").write_bytes(png_bytes(seed=3))
    (ex / "explanations.json").write_text(json.dumps({"format": "qpm-explanations", "out_dir": str(ex),
                                                      "images": [], "files": ["cat_explain.png"]}))
    return ["explain", str(ex), "-m", str(w / "run" / "model.onnx"), "-o", str(d / "out"), "--device", "cpu"]


def _user_folder(command: list[str], flag: str):
    def setup(d: Path, w: Path) -> list[str]:
        mine = d / "mine"
        mine.mkdir()
        (mine / "example.png").write_bytes(png_bytes())
        (mine / "model.onnx").write_bytes(b"my own model")
        (mine / "notes.txt").write_text("keep me\n")
        return [*command, flag, str(mine)]
    return setup


def _select_into_run_file(name: str):
    def setup(d: Path, w: Path) -> list[str]:
        run = _copy_run(w, d)
        if not (run / name).exists():
            (run / name).write_text("{}\n")
        return ["select", str(run), "--features", "6", "--per-class", "2", "--time-limit", "5", "-o", str(run / name)]
    return setup


def _select_into_other_runs_selection(d: Path, w: Path) -> list[str]:
    run, other = _copy_run(w, d), _copy_run(w, d, "other")
    (other / "selection.json").write_text("{}\n")
    return ["select", str(run), "--features", "6", "--per-class", "2", "--time-limit", "5", "--force", "-o",
            str(other / "selection.json")]


def _prototypes_version(version: object):
    def setup(d: Path, w: Path) -> list[str]:
        run = _copy_run(w, d)
        (run / "prototypes").mkdir()
        (run / "prototypes" / "f3_0.png").write_bytes(png_bytes(8, 8))
        (run / "prototypes" / "prototypes.json").write_text(json.dumps({
            "format": "qpm-prototypes", "format_version": version,
            "features": {"3": [{"file": "f3_0.png", "class": "square", "activation": 1.0}]}}))
        return ["export", str(run), "--onnx", "--out", str(d / "m.onnx")]
    return setup


def _evaluate_foreign_cache(d: Path, w: Path) -> list[str]:
    run = _copy_run(w, d)  # a dinov2 run whose config.json names the efficientnet test cache
    doc = json.loads((run / "config.json").read_text())
    doc["caches"] = json.loads((w / "effrun" / "config.json").read_text())["caches"]
    (run / "config.json").write_text(json.dumps(doc))
    return ["evaluate", str(run), "--metrics", "Accuracy"]


def _pointer(d: Path, run: object) -> None:
    state = d / "xdg-cache" / "qpm"
    state.mkdir(parents=True, exist_ok=True)
    (state / "current-run.json").write_text(json.dumps({"format": "qpm-current-run", "run": str(run)}))


def _runs_case(kind: str):
    def setup(d: Path, w: Path) -> list[str]:
        runs = d / "runs"
        ok = runs / "ok-run"
        ok.mkdir(parents=True)
        (ok / "config.json").write_text(json.dumps({"request": {"dataset": "shapes", "backbone": "b", "head": "qpm"}}))
        if kind == "pointer-no-config":
            (d / "just-a-folder").mkdir()
            _pointer(d, d / "just-a-folder")
        elif kind == "pointer-symlink-loop":
            (d / "loop").symlink_to(d / "loop")
            _pointer(d, d / "loop")
        elif kind == "pointer-fifo":
            (d / "xdg-cache" / "qpm").mkdir(parents=True)
            os.mkfifo(d / "xdg-cache" / "qpm" / "current-run.json")
        elif kind == "metrics-fifo":
            os.mkfifo(ok / "metrics.json")
        elif kind == "wrong-types":
            bad = runs / "typed-run"
            bad.mkdir()
            (bad / "config.json").write_text(json.dumps({"request": {"head": ["qpm"], "dataset": {"x": 1},
                                                                     "backbone": 7}}))
            (bad / "metrics.json").write_text(json.dumps({"final": {"Accuracy": "high", "SID@5": [1]}}))
            (ok / "metrics.json").write_text(json.dumps([1, 2]))
            odd = runs / "list-run"
            odd.mkdir()
            (odd / "config.json").write_text(json.dumps({"request": [1, 2]}))
        elif kind == "markup":
            bad = runs / "[bold red]x"  # no closing tag: rich would raise a MarkupError on "[/]" below
            bad.mkdir()
            (bad / "config.json").write_text(json.dumps({"request": {"dataset": "[/]", "backbone": "[link=x]y"}}))
        elif kind == "deep-json":
            (ok / "metrics.json").write_text("[" * 100_000 + "]" * 100_000)
        return ["runs"] if kind == "markup" else ["runs", "--json"]  # the table (markup) or JSON (exact statuses)
    return setup


def _settings_file(content: bytes | None, *, fifo: bool = False):
    def setup(d: Path, w: Path) -> list[str]:
        path = d / "qpm-config.toml"
        if fifo:
            os.mkfifo(path)
        elif content is not None:
            path.write_bytes(content)
        return ["config"]
    return setup


def _long_name(d: Path, w: Path) -> list[str]:
    return ["train", "-b", "efficientnet-lite0", "-d", "shapes", "--run-dir", str(d / ("x" * 300))]


def _long_path(d: Path, w: Path) -> list[str]:
    deep = d.joinpath(*["y" * 200] * 25)  # 5000+ characters: beyond PATH_MAX
    return ["explain", str(w / "good.png"), "-m", str(w / "run" / "model.onnx"), "-o", str(deep), "--device", "cpu"]


def _resume_request_not_an_object(d: Path, w: Path) -> list[str]:
    (d / "r").mkdir()
    (d / "r" / "config.json").write_text(json.dumps({"request": [1, 2]}))
    return ["train", "-b", "efficientnet-lite0", "-d", "shapes", "--run-dir", str(d / "r"), "--resume"]


def _state_dir_is_a_file(d: Path, w: Path) -> list[str]:
    (d / "state").write_text("not a folder\n")
    return ["train", "-b", "efficientnet-lite0", "-d", "shapes", "--run-dir", str(d / "r")]


def _needs_no_gpu() -> tuple:
    from qpmcli.device import cuda_device_count

    return (pytest.mark.skipif(cuda_device_count() > 0, reason="the CLI runs in this process, where a GPU is "
                                                                  "visible whatever CUDA_VISIBLE_DEVICES says"),)


def _needs(module: str) -> tuple:
    import importlib.util

    return (pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} is not installed"),)


CASES = [
    # images
    Case("image-truncated-png", _predict_image(png_bytes()[:60]), r"x\.png"),
    Case("image-empty-file", _predict_image(b"", "empty.jpg"), r"empty\.jpg"),
    Case("image-text-as-png", _predict_image(b"hello, not an image\n"), r"x\.png"),
    Case("image-decompression-bomb", _predict_image(bomb_png(40_000, 40_000)), r"too large"),
    Case("image-bomb-under-pil-refusal", _predict_image(bomb_png(10_000, 10_000)), r"x\.png"),
    # run files
    Case("model-json-class-names-cut", _run_json(_cut_names), r"class_names lists 3 names for 5 classes"),
    Case("model-json-is-a-list", _run_json(lambda doc: [doc]), r"model\.json"),
    Case("model-json-grid-1d", _run_json(_set("grid", [7])), r"grid"),
    Case("model-json-model-is-text", _run_json(_set("model", "x")), r"model"),
    Case("model-json-n-classes-negative", _run_json(_set("n_classes", -2)), r"n_classes"),
    Case("model-json-class-names-cut-explain", _run_json(_cut_names, "explain"), r"class_names"),
    Case("model-json-class-names-cut-export", _run_json(_cut_names, "export"), r"class_names"),
    Case("model-json-not-json", _run_json(lambda doc: None), r"model\.json"),  # replaced below by raw text
    Case("weights-file-outside-run", _weights_outside, r"points outside"),
    Case("weights-file-absolute", _run_json(_set("weights_file", "/etc/hostname")), r"points outside"),
    Case("weights-pickle-not-safetensors", _pickled_weights, r"safetensors"),
    Case("weights-of-another-run", _other_weights, r"does not match"),  # 4-class weights: a multi-line torch error
    Case("prototype-file-outside-run", _prototypes_outside, r"points outside"),
    Case("prototype-file-absolute", _prototypes_absolute, r"points outside"),
    Case("weights-symlink-out-of-run", _weights_symlink, r"points outside"),
    Case("prototype-file-not-a-name", _prototypes_not_a_name, r"must be a file name"),
    # ONNX metadata
    Case("onnx-other-runs-metadata", _other_runs_metadata, r"does not match its qpm metadata"),
    Case("onnx-class-names-not-json", _onnx_case(_prop("class_names", "[oops", raw=True)), r"metadata"),
    Case("onnx-weight-wrong-shape", _onnx_case(_prop("weight", [[1.0, 0.0]])), r"weight"),
    Case("onnx-grid-1d", _onnx_case(_prop("grid", [4])), r"grid"),
    Case("onnx-no-qpm-metadata", _onnx_case(lambda props: {}), r"no qpm metadata"),
    Case("onnx-garbage-bytes", _args("predict", "{w}/good.png", "-m", "{d}/x.onnx"), r"x\.onnx"),
    Case("onnx-bomb-prototype", _onnx_case(_bomb_prototype, "explain-class"), r"too large"),
    # npz
    Case("npz-nan", _select_npz(**_nan_problem()), r"(?i)nan|finite"),
    Case("npz-object-array", _select_npz(A=np.array([{"a": 1}], dtype=object), R=np.zeros((1, 1))), r"p\.npz"),
    Case("npz-class-names-length", _select_npz(**_names_problem()), r"class"),
    Case("npz-not-an-npz", _args("select", "--problem", "{w}/good.png"), r"good\.png"),
    Case("dense-features-nan", _dense_features_nan, r"(?i)nan|finite"),
    # dataset trees
    Case("dataset-test-class-not-in-train", _imagefolder("extra_test_class"), r"cow"),
    Case("dataset-unreadable-late-image", _imagefolder("bad_late_image"), r"1 of 6 image\(s\) are unreadable"),
    Case("dataset-bomb", _imagefolder("bomb"), r"too large"),
    Case("dataset-root-is-a-file", _args("data", "check", "-d", "imagefolder", "--data-root", "{w}/good.png"),
         r"good\.png"),
    Case("dataset-option-not-an-int", _args("extract", "-b", "efficientnet-lite0", "-d", "shapes", "-O",
                                            "per_class=abc", "--cache-dir", "{d}/c"), r"per_class"),
    # token caches (built by qpm extract, then damaged)
    Case("cache-value-changed-mid-chunk", _cache_case("flip-middle"), r"chunk 0 .*has changed"),
    Case("cache-values-changed", _cache_case("flip"), r"chunk 0"),
    Case("cache-tokens-truncated", _cache_case("truncate"), r"damaged"),
    Case("cache-manifest-not-json", _cache_case("manifest"), r"manifest\.json"),
    Case("cache-labels-a-pickle", _cache_case("pickle"), r"damaged"),
    # settings
    Case("settings-bad-device-env", _args("extract", "-b", "efficientnet-lite0", "-d", "shapes", "--cache-dir",
                                          "{d}/c"), r"(?i)device", env={"QPM_DEVICE": "quantum"}),
    Case("settings-negative-workers", _args("extract", "-b", "efficientnet-lite0", "-d", "shapes", "--cache-dir",
                                            "{d}/c"), r"(?i)num_workers|workers", env={"QPM_NUM_WORKERS": "-3"}),
    Case("settings-config-not-toml", _bad_config, r"config\.toml"),
    Case("settings-local-toml-bad-value", _bad_local_toml, r"num_workers"),
    # option values
    Case("select-time-limit-nan", _select("--time-limit", "nan"), r"--time-limit"),
    Case("select-time-limit-inf", _select("--time-limit", "inf"), r"--time-limit"),
    Case("backbone-option-not-an-int", _args("train", "-b", "efficientnet-lite0", "-d", "shapes",
                                             "--backbone-option", "image_size=abc", "--run-dir", "{d}/r"),
         r"image_size"),
    Case("backbone-option-unknown", _args("train", "-b", "efficientnet-lite0", "-d", "shapes",
                                          "--backbone-option", "colour=blue", "--run-dir", "{d}/r"), r"colour"),
    Case("predict-top-k-zero", _args("predict", "{w}/good.png", "-m", "{w}/run/model.onnx", "--top-k", "0"),
         r"--top-k"),
    Case("device-cuda-without-cuda-extract", _args("extract", "-b", "efficientnet-lite0", "-d", "shapes",
                                                   "--device", "cuda", "--cache-dir", "{d}/c"), r"(?i)cuda",
         marks=_needs_no_gpu()),
    Case("device-cuda-without-cuda-train", _args("train", "-b", "efficientnet-lite0", "-d", "shapes", "--device",
                                                 "cuda", "--run-dir", "{d}/r"), r"(?i)cuda",
         marks=_needs_no_gpu()),
    Case("device-cuda-without-cuda-evaluate", _args("evaluate", "{w}/run", "--device", "cuda"), r"(?i)cuda",
         marks=_needs_no_gpu()),
    # paths
    Case("explain-out-is-a-file", _existing_file(["explain", "{w}/good.png", "-m", "{w}/run/model.onnx"], "-o"),
         r"taken"),
    Case("demo-out-is-a-file", _existing_file(["demo"], "-o"), r"taken"),
    Case("train-run-dir-is-a-file", _existing_file(["train", "-b", "efficientnet-lite0", "-d", "shapes"],
                                                   "--run-dir"), r"taken"),
    Case("extract-cache-dir-is-a-file", _existing_file(["extract", "-b", "efficientnet-lite0", "-d", "shapes"],
                                                       "--cache-dir"), r"taken"),
    Case("select-out-is-a-directory", _select_out_dir, r"outdir"),
    Case("export-out-not-onnx", _args("export", "{w}/run", "--onnx", "--out", "{d}/m.txt"), r"\.onnx"),
    Case("predict-missing-model", _args("predict", "{w}/good.png", "-m", "{d}/nope"), r"nope"),
    # issue 28: the folders of the user and the files of a run
    Case("explain-over-a-user-file-named-like-a-figure", _explain_over_user_figure,
         r"nothing to explain: .*cat\.png was skipped: its figure would replace .*cat_explain\.png, which qpm did "
         r"not write"),
    Case("explain-out-holds-the-users-explanations-json", _explain_user_file("explanations.json"),
         r"explanations\.json that qpm did not write"),
    Case("explain-out-holds-the-users-report-html", _explain_user_file("report.html", "--html"),
         r"report\.html exists and qpm did not write it"),
    Case("explain-only-its-own-figures", _explain_own_figures_only,
         r"nothing to explain: 1 image\(s\) given are figures that qpm explain wrote"),
    Case("demo-out-is-a-user-folder", _user_folder(["demo"], "--out"),
         r"--out .*mine is not empty and is not a qpm folder \(it holds example\.png, model\.onnx, notes\.txt\)"),
    Case("train-run-dir-is-a-user-folder", _user_folder(["train", "-b", "efficientnet-lite0", "-d", "shapes"],
                                                        "--run-dir"), r"--run-dir .*mine is not empty"),
    Case("select-out-is-the-runs-model-json", _select_into_run_file("model.json"), r"one of the run's own files"),
    Case("select-out-is-the-runs-config-json", _select_into_run_file("config.json"), r"one of the run's own files"),
    Case("select-out-is-the-runs-metrics-json", _select_into_run_file("metrics.json"), r"one of the run's own files"),
    Case("select-out-is-the-runs-weights", _select_into_run_file("model.safetensors"), r"one of the run's own files"),
    Case("select-out-is-another-runs-selection", _select_into_other_runs_selection, r"one of the run's own files"),
    Case("evaluate-cache-of-the-other-split", _args("evaluate", "{w}/effrun", "--metrics", "Accuracy"),
         r"names .* as the train token cache, but it does not belong to this run \(it holds the test split\)"),
    Case("evaluate-cache-of-another-backbone", _evaluate_foreign_cache,
         r"does not belong to this run .*backbone is 'efficientnet-lite0', the run's is 'dinov2-vits14-reg'"),
    Case("train-state-dir-is-a-file", _state_dir_is_a_file, r"state_dir .*--no-current",
         env={"QPM_STATE_DIR": "state"}),
    # issue 28: format versions
    Case("model-json-format-version-2", _run_json(_set("format_version", 2)),
         r"model\.json has format version 2, but this qpm \(.*\) reads format version 1 and older"),
    Case("model-json-format-version-text", _run_json(_set("format_version", "2")), r"format_version must be"),
    Case("onnx-format-version-2", _onnx_case(_prop("format_version", 2)),
         r"m\.onnx has format version 2, but this qpm \(.*\) reads format version 1"),
    Case("prototypes-format-version-2", _prototypes_version(2), r"prototypes\.json has format version 2"),
    # issue 28: ids, seeds, workers, licences, tiny images
    Case("explain-class-id-of-5000-digits", _args("explain", "--class", "9" * 5000, "-m", "{w}/run/model.onnx",
                                                  "-o", "{d}/ex", "--device", "cpu"), r"class index 999999999999"),
    Case("select-negative-seed", _select("--seed", "-1"), r"seed"),
    Case("select-seed-beyond-cp-sat", _select("--seed", str(2**31)), r"--seed must be between 0 and 2147483647"),
    Case("select-workers-beyond-range", _select("--workers", "100000"), r"--workers must be between 1 and 1024"),
    Case("train-seed-beyond-64-bits", _args("train", "-b", "efficientnet-lite0", "-d", "shapes", "--seed",
                                            str(2**64), "--run-dir", "{d}/r"), r"invalid setting seed"),
    Case("select-gurobi-licence-file-missing", _select("--selector", "gurobi", "--time-limit", "5"),
         r"Gurobi refused to run .*licen", env={"GRB_LICENSE_FILE": "/nonexistent/gurobi.lic"},
         marks=_needs("gurobipy")),
    Case("data-check-1xN-image", _data_check_thin, r"50x1 pixels; training images need at least 8 pixels"),
    Case("train-1xN-image", _train_thin, r"50x1 pixels; training images need at least 8 pixels"),
    # issue 28: settings files
    Case("settings-qpm-config-missing", _settings_file(None), r"QPM_CONFIG=.*does not exist",
         env={"QPM_CONFIG": "qpm-config.toml"}),
    Case("settings-config-invalid-utf8", _settings_file(b'device = "cpu\xff"\n'), r"not UTF-8 text",
         env={"QPM_CONFIG": "qpm-config.toml"}),
    Case("settings-config-deep-nesting", _settings_file(b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n"),
         r"nests tables or arrays too deeply", env={"QPM_CONFIG": "qpm-config.toml"}),
    Case("settings-qpm-config-is-a-pipe", _settings_file(None, fifo=True), r"not a regular file",
         env={"QPM_CONFIG": "qpm-config.toml"}),
    # issue 28: paths beyond the system's limits
    Case("train-run-dir-name-too-long", _long_name, r"(?i)name too long.*use a shorter path"),
    Case("explain-out-path-too-long", _long_path, r"(?i)name too long.*use a shorter path"),
    # found while testing issue 28 (no issue names them)
    Case("export-opset-beyond-the-exporter", _args("export", "{w}/run", "--onnx", "--opset", "1000", "--out",
                                                   "{d}/m.onnx"), r"--opset 1000: the ONNX exporter writes opsets 7"),
    Case("serve-max-upload-infinite", _args("serve", "{w}/run/model.onnx", "--max-upload-mb", "1e308", "--port", "0"),
         r"--max-upload-mb must be a positive number"),
    Case("serve-batch-window-nan", _args("serve", "{w}/run/model.onnx", "--batch-window-ms", "nan", "--port", "0"),
         r"--batch-window-ms must be between 0 and"),
    Case("train-hidden-size-beyond-memory", _args("train", "-b", "efficientnet-lite0", "-d", "shapes",
                                                  "--hidden-size", "2000000000", "--run-dir", "{d}/r"),
         r"--hidden-size 2000000000: the adapter allows at most"),
    Case("train-resume-request-not-an-object", _resume_request_not_an_object, r"holds no training request"),
    Case("extract-num-workers-beyond-processes", _args("extract", "-b", "efficientnet-lite0", "-d", "shapes",
                                                       "--num-workers", "100000", "--cache-dir", "{d}/c"),
         r"num_workers must be between 0 and 256"),
    Case("onnx-metadata-nested-too-deeply", _onnx_case(_prop("class_names", "[" * 100_000 + "]" * 100_000, raw=True)),
         r"m\.onnx has malformed qpm metadata"),
    Case("cache-manifest-nested-too-deeply", _cache_case("manifest-nesting"), r"manifest\.json"),
    # issue 28: qpm runs copes with damaged runs (exit 0, a row that says what is wrong)
    Case("runs-pointer-to-a-folder-without-config", _runs_case("pointer-no-config"),
         r"no config\.json: not a qpm run folder", code=0),
    Case("runs-pointer-symlink-loop", _runs_case("pointer-symlink-loop"), r"ok-run", code=0),
    Case("runs-pointer-is-a-named-pipe", _runs_case("pointer-fifo"), r"ok-run", code=0),
    Case("runs-metrics-is-a-named-pipe", _runs_case("metrics-fifo"), r"metrics\.json is not a regular file", code=0),
    Case("runs-wrong-value-types", _runs_case("wrong-types"), r"typed-run", code=0),
    Case("runs-rich-markup-in-names", _runs_case("markup"), r"\[bold red\]x .*\[/\] .*\[link=x\]y", code=0,
         env={"COLUMNS": "400"}),
    Case("runs-metrics-nested-too-deeply", _runs_case("deep-json"), r"metrics\.json is not readable JSON", code=0),

]


QUIET_COMMANDS = {"predict", "explain", "export", "evaluate", "select", "extract", "train", "demo"}
TEMP_NAME = re.compile(r"\.(tmp|staged|partial)$|\.tmp\d+$|/qpm-[a-z0-9]+-\d+-[^/]+$")


def _hash_tree(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir() and not p.is_symlink():
                out[str(p)] = "<dir>"
    return out


def _run_case(case: Case, world: Path, d: Path) -> dict:
    """Set the case up in its own folder, hash every file, run the CLI in this process, hash again."""
    d.mkdir(parents=True)
    args = case.setup(d, world)
    if case.id == "model-json-not-json":
        (d / "run" / "model.json").write_text("{not json")
    if case.id == "onnx-garbage-bytes":
        (d / "x.onnx").write_bytes(b"\x08\x07garbage" * 10)
    if case.id == "onnx-bomb-prototype":
        args = ["explain", "--class", "square", "-m", args[args.index("-m") + 1], "-o", str(d / "ex"), "--device",
                "cpu"]
    if args[0] in QUIET_COMMANDS:
        args = [*args, "-q"]  # no informational lines ("using RUN ..."): stderr holds only what went wrong
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPM_")}
    env.update({"QPM_DEVICE": "cpu", "QPM_CACHE_DIR": str(d / "qpm-cache"), "HOME": str(d / "home"),
                "QPM_WEIGHTS_DIR": str(d / "weights"), "XDG_CONFIG_HOME": str(d / "xdg"),
                "XDG_CACHE_HOME": str(d / "xdg-cache"), "PYTHONUNBUFFERED": "1", **case.env})
    before = _hash_tree(d, world)
    res = invoke(args, env, d)
    after = _hash_tree(d, world)
    return {"args": args, "returncode": res.returncode, "stdout": res.stdout, "stderr": res.stderr,
            "changed": [p for p, h in before.items() if after.get(p) != h],
            "strays": [p for p in after if p not in before and TEMP_NAME.search(p)]}


@pytest.fixture(scope="module")
def case_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile-cases")


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_hostile_input(case: Case, world: Path, case_root: Path) -> None:
    out = _run_case(case, world, case_root / case.id)
    err = out["stderr"]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert out["returncode"] == case.code, f"{out['args']}: exit {out['returncode']}\nstdout: " \
                                           f"{out['stdout'][-1500:]}\nstderr: {err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    if case.code == 2:
        assert len(lines) == 1, err[-3000:]
        assert lines[0].startswith("Error: ") and re.search(case.expect, lines[0]), lines[0]
    else:
        assert not lines, err[-3000:]
        assert re.search(case.expect, out["stdout"]), out["stdout"][-3000:]
    assert not out["changed"], f"pre-existing files changed or removed: {out['changed']}"
    assert not out["strays"], f"stray temporary files: {out['strays']}"

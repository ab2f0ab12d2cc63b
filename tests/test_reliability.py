"""Issue 19 regressions that need more than a one-line CLI call: cache resume/verification, export write-aside and
the fp16 criterion, mathtext-safe figures, data check, Ctrl-C. The table of one-line hostile inputs lives in
tests/test_hostile.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qpmcli.errors import CacheError

# A tiny dataset of real PNG files; a module file so the build subprocesses (and their DataLoader workers) import it.
TINY_DS = '''
import os, time
import numpy as np
from PIL import Image
from qpmcli.contracts import Dataset, Sample
from qpmcli.images import open_image


class Tiny(Dataset):
    name = "tiny19"

    def __init__(self, root, n=20, delay=0.0):
        self.root, self.delay = str(root), delay
        self.classes = ["a", "b", "c"]
        os.makedirs(root, exist_ok=True)
        self.paths = []
        rng = np.random.default_rng(1)
        for i in range(n):
            p = os.path.join(root, f"im{i:03d}.png")
            if not os.path.exists(p):
                Image.fromarray(rng.integers(0, 256, (30 + i % 5, 36, 3), dtype=np.uint8)).save(p)
            self.paths.append(p)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        if self.delay:
            time.sleep(self.delay)
        return Sample(open_image(self.paths[i]), i % 3, None, self.paths[i])

    def label(self, i):
        return i % 3

    def path(self, i):
        return self.paths[i]

    def fingerprint(self):
        return {"name": self.name, "split": "train", "size": len(self), "root": self.root}
'''

BUILD = '''
import sys
sys.path.insert(0, {moddir!r})
from tiny19 import Tiny
from qpmcli.backbone import load_backbone
from qpmcli.cache import build_cache
from qpmcli.settings import QpmSettings
bb = load_backbone("dinov2-vits14", weights="random", settings=QpmSettings(device="cpu"), arch={{"depth": 1}},
                   image_size=56)
c = build_cache(bb, Tiny({root!r}, n={n}, delay={delay}), "train", {cache!r}, batch_size={bs},
                num_workers={workers}, progress=False, chunk_images=8)
print("DONE", len(c))
'''


@pytest.fixture(scope="module")
def tinymod(tmp_path_factory):
    d = tmp_path_factory.mktemp("mod19")
    (d / "tiny19.py").write_text(TINY_DS)
    sys.path.insert(0, str(d))
    import tiny19

    yield d, tiny19
    sys.path.remove(str(d))


@pytest.fixture(scope="module")
def backbone():
    from qpmcli.backbone import load_backbone
    from qpmcli.settings import QpmSettings

    return load_backbone("dinov2-vits14", weights="random", settings=QpmSettings(device="cpu"), arch={"depth": 1},
                         image_size=56)


def _build_proc(script: Path, moddir: Path, root: Path, cache: Path, *, bs: int, workers: int, delay: float):
    script.write_text(BUILD.format(moddir=str(moddir), root=str(root), n=20, delay=delay, cache=str(cache), bs=bs,
                                   workers=workers))
    return [sys.executable, str(script)]


# ------------------------------------------------------------------------------------------------- 1. the cache
@pytest.mark.e2e  # SIGKILL needs a process of its own
def test_resume_with_another_batch_size_and_worker_count_is_complete_and_correct(tmp_path, tinymod, backbone):
    """Issue 19.1: killed after the first chunk marker, resumed with another batch size (6, not a divisor of the
    chunk) and 2 decoding workers: every row equals an uninterrupted build's, none is left unwritten."""
    from qpmcli.cache import build_cache

    moddir, mod = tinymod
    root, cache = tmp_path / "imgs", tmp_path / "c1"
    mod.Tiny(root, n=20)  # write the images before the timed run
    cmd = _build_proc(tmp_path / "b1.py", moddir, root, cache, bs=4, workers=0, delay=0.2)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list(cache.glob("*.partial/done/*.json")):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (partial,) = cache.glob("*.partial")
    assert 1 <= len(list((partial / "done").glob("*.json"))) < 3, "the kill should land mid-extraction"
    cmd = _build_proc(tmp_path / "b2.py", moddir, root, cache, bs=6, workers=2, delay=0.0)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DONE 20" in out.stdout and not partial.exists()
    ref = build_cache(backbone, mod.Tiny(root, n=20), "train", tmp_path / "c2", batch_size=4, progress=False,
                      chunk_images=8)
    (d1,) = [p for p in cache.iterdir() if p.is_dir()]
    got = np.load(d1 / "tokens.npy")
    np.testing.assert_array_equal(np.load(d1 / "labels.npy"), np.arange(20) % 3)
    np.testing.assert_array_equal(np.load(d1 / "indices.npy"), np.arange(20))
    assert (np.abs(got.astype(np.float32)).reshape(20, -1).max(1) > 0).all(), "a row was never written"
    np.testing.assert_allclose(got.astype(np.float32), ref.tokens.astype(np.float32), atol=2e-3, rtol=2e-3)
    manifest = json.loads((d1 / "manifest.json").read_text())
    assert [(c["start"], c["stop"]) for c in manifest["chunks"]] == [(0, 8), (8, 16), (16, 20)]


def test_a_stale_chunk_marker_is_redone_not_trusted(tmp_path, tinymod, backbone):
    """A marker that does not describe the rows of the chunk it names (written by a build with another chunking) is
    ignored: that chunk is extracted again."""
    from qpmcli.cache import build_cache, cache_key_fields, cache_path

    ds = tinymod[1].Tiny(tmp_path / "imgs", n=12)
    final = cache_path(tmp_path / "c", cache_key_fields(backbone, ds, "train"))
    with pytest.raises(KeyboardInterrupt):  # stop after the first chunk of the first build
        _interrupt_after_first_chunk(backbone, ds, tmp_path / "c")
    partial = final.with_name(final.name + ".partial")
    marker = partial / "done" / "000000.json"
    doc = json.loads(marker.read_text())
    doc["stop"] = 4  # a marker from a build whose chunks were 4 rows: it does not cover rows 4..7 ...
    marker.write_text(json.dumps(doc))
    tokens = np.load(partial / "tokens.npy", mmap_mode="r+")
    tokens[4:8] = 0  # ... and those rows were never written
    tokens.flush()
    del tokens
    c = build_cache(backbone, ds, "train", tmp_path / "c", batch_size=4, progress=False, chunk_images=8)
    assert (np.abs(c.tokens.astype(np.float32)).reshape(12, -1).max(1) > 0).all()


def _interrupt_after_first_chunk(backbone, ds, cache_dir):
    """Build until the first image of the second chunk is read, then stop as Ctrl-C would."""
    from qpmcli.cache import build_cache

    class StopsAtRow8(type(ds)):
        def __getitem__(self, i):
            if i >= 8:
                raise KeyboardInterrupt
            return super().__getitem__(i)

    stopping = StopsAtRow8.__new__(StopsAtRow8)
    stopping.__dict__.update(ds.__dict__)
    build_cache(backbone, stopping, "train", cache_dir, batch_size=4, progress=False, chunk_images=8)


def test_open_checks_every_chunk_and_verify_checks_every_byte(tmp_path, tinymod, backbone):
    from qpmcli.cache import TokenCache, build_cache

    ds = tinymod[1].Tiny(tmp_path / "imgs", n=20)
    c = build_cache(backbone, ds, "train", tmp_path / "c", batch_size=4, progress=False, chunk_images=8)
    assert TokenCache.open(c.path).verify() == 3  # chunks checked
    tokens = c.path / "tokens.npy"
    pristine = tokens.read_bytes()
    # a row never written (all zero) at the end of a chunk: found by the cheap check when opening
    arr = np.load(tokens, mmap_mode="r+")
    arr[15] = 0
    arr.flush()
    del arr
    with pytest.raises(CacheError, match=r"rows 8\.\.15|chunk 1"):
        TokenCache.open(c.path)
    # one flipped value inside a chunk: the cheap check passes, the full check does not
    tokens.write_bytes(pristine)
    arr = np.load(tokens, mmap_mode="r+")
    arr[11, 3, 5] += 1
    arr.flush()
    del arr
    opened = TokenCache.open(c.path)
    with pytest.raises(CacheError, match="chunk 1"):
        opened.verify()
    # a manifest whose chunks do not cover the rows is refused
    tokens.write_bytes(pristine)
    mf = c.path / "manifest.json"
    m = json.loads(mf.read_text())
    m["chunks"] = m["chunks"][:2]
    mf.write_text(json.dumps(m))
    with pytest.raises(CacheError, match="chunk"):
        TokenCache.open(c.path)


# ------------------------------------------------------------------------------------------ 7. pixel limit
def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels and holds no pixel data (a decompression bomb's
    signature, in 57 bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("width,height,message", [
    (10_000, 10_000, "cannot read image"),  # over PIL's warning threshold, under our limit: truncated, no warning
    (20_000, 10_000, "cannot read image"),  # over PIL's own refusal (179 M), under ours (300 M)
    (20_000, 20_000, r"too large \(400000000 pixels; limit 300000000\)"),
    (40_000, 40_000, r"too large \(1600000000 pixels; limit 300000000\)"),  # PIL's refusal, in our words
])
def test_our_pixel_limit_applies_and_pil_warns_nothing(tmp_path, width, height, message):
    import warnings

    from qpmcli.errors import ImageError
    from qpmcli.images import open_image

    p = tmp_path / "bomb.png"
    p.write_bytes(png_header(width, height))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning (DecompressionBombWarning) fails the test
        with pytest.raises(ImageError, match=message):
            open_image(p)


# ---------------------------------------------------------------------------------------------- 7. data check
def _image_tree(root: Path, n: int = 6) -> list[Path]:
    from PIL import Image

    paths = []
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                p = root / split / cls / f"{i:02d}.png"
                Image.fromarray(rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)).save(p)
                paths.append(p)
    return paths


def test_data_check_finds_every_unreadable_image_not_just_the_first(tmp_path, qpm):
    paths = _image_tree(tmp_path / "d")
    ok = qpm(["data", "check", "-d", "imagefolder", "--data-root", str(tmp_path / "d"), "--json"])
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["splits"]["train"]["images_checked"] == 12
    good = paths[4].read_bytes()
    paths[4].write_bytes(good[: len(good) // 2])  # truncated PNG, late in the train split
    paths[9].write_bytes(good[:20] + b"\x00" * (len(good) - 20))  # header kept, the rest zeroed (CRC fails)
    res = qpm(["data", "check", "-d", "imagefolder", "--data-root", str(tmp_path / "d")])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "2 of 12 image(s) are unreadable" in lines[0] and "04.png" in lines[0] and "03.png" in lines[0]
    full = qpm(["data", "check", "-d", "imagefolder", "--data-root", str(tmp_path / "d"), "--full"])
    assert full.returncode == 2 and "2 of 12 image(s) are unreadable" in full.stderr


# ------------------------------------------------------------------------------------------------ 7. Ctrl-C
@pytest.mark.e2e  # SIGINT to a real `qpm` process
def test_ctrl_c_says_what_is_kept_and_exits_130(tmp_path, isolated_env):
    """SIGINT during an extraction: the message shows (Typer used to swallow it with a silent exit 130)."""
    env = {**isolated_env, "QPM_DEVICE": "cpu", "QPM_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "qpmcli.cli", "extract", "-b", "efficientnet-lite0", "-d", "shapes",
                             "--split", "train", "--num-workers", "0", "--batch-size", "2", "-q"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((tmp_path / "cache").glob("*.partial/tokens.npy")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Finished stages are kept" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ 4. mathtext
def test_dollar_signs_in_file_and_class_names_are_drawn_as_text(tmp_path):
    """A file named ``price_$\\foo$.png`` and a class named ``$\\foo$`` used to crash matplotlib's mathtext parser,
    and one such file aborted the whole folder."""
    from builders import make_tiny_run
    from PIL import Image

    from qpmcli.explain import explain

    run = make_tiny_run(tmp_path / "run", class_names=["circle", "$\\foo$", "a_$x^$", "star", "ring"])
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("good.png", "price_$\\foo$.png", "z_$\\frac{$.png"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / name)
    summary = explain([folder], run, out_dir=tmp_path / "out", compare="$\\foo$", device="cpu")
    assert summary["num_failed"] == 0
    assert [Path(i["image"]).name for i in summary["images"]] == ["good.png", "price_$\\foo$.png", "z_$\\frac{$.png"]
    for item in summary["images"]:
        assert Path(item["figure"]).is_file()


# ------------------------------------------------------------------------------------------------ 2. export
@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    from builders import make_tiny_run

    from qpmcli.export import export_onnx

    run = make_tiny_run(tmp_path_factory.mktemp("exp19") / "run")
    export_onnx(run, fp16=True, verify=True, n_check=4)  # a good model.onnx (+ adapter, fp16 twins) in the run
    return run


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failed_fp16_verification_leaves_existing_files_byte_identical(exported_run, monkeypatch):
    """Issue 19.2: a failed fp16 check used to delete the fp32 files that had passed, and an existing model.onnx."""
    from qpmcli import export as export_mod
    from qpmcli.errors import ArtifactError

    before = _tree(exported_run)
    assert {"model.onnx", "model.adapter.onnx", "model.fp16.onnx"} <= set(before)
    monkeypatch.setitem(export_mod.TOLERANCE, "fp16", -1.0)  # the real comparison runs; no result can pass
    with pytest.raises(ArtifactError, match=r"ONNX verification failed \(fp16: .*nothing was written"):
        export_mod.export_onnx(exported_run, fp16=True, verify=True, n_check=4)
    assert _tree(exported_run) == before  # nothing replaced, nothing removed, no staged leftovers


def test_an_interrupted_export_replaces_nothing(exported_run, monkeypatch):
    from qpmcli import export as export_mod

    before = _tree(exported_run)

    def broken(src, dst):
        raise KeyboardInterrupt  # Ctrl-C in the middle of the fp16 conversion

    monkeypatch.setattr(export_mod, "convert_fp16", broken)
    with pytest.raises(KeyboardInterrupt):
        export_mod.export_onnx(exported_run, fp16=True)
    assert _tree(exported_run) == before


def test_fp16_criterion_is_relative_and_checks_probabilities_and_decisive_top1():
    from qpmcli.export import parity

    rng = np.random.default_rng(0)
    ref = {"logits": rng.normal(0, 30, (8, 10)), "maps": np.zeros((8, 2, 2, 2)), "features": np.zeros((8, 2))}
    noisy = {**ref, "logits": ref["logits"] * (1 + rng.normal(0, 2e-4, (8, 10)))}
    res = parity(ref, noisy, "fp16")
    # large logits: fp16's 3 digits give an absolute error far over fp32's 1e-4 (and the old fp16 0.01) ...
    assert res["max_abs_diff"]["logits"] > 1e-2 and res["passed"], res["criterion"]
    assert not parity(ref, noisy, "fp32")["passed"]
    # ... while a real error is caught: relative to the scale, in the probabilities, or a decisive top-1 flip
    assert not parity(ref, {**ref, "logits": ref["logits"] * 1.1}, "fp16")["passed"]
    flipped = ref["logits"].copy()
    i = int(np.argmax(np.sort(flipped, 1)[:, -1] - np.sort(flipped, 1)[:, -2]))  # the most decisive image
    flipped[i] = flipped[i][::-1]
    res = parity(ref, {**ref, "logits": flipped}, "fp16")
    assert not res["passed"]
    # a tie within fp16 noise may flip
    tie = ref["logits"].copy()
    tie[0, :2] = [5.0, 5.0 + 1e-4]
    tie[0, 2:] = -5.0
    swapped = tie.copy()
    swapped[0, :2] = [5.0 + 1e-4, 5.0]
    res = parity({**ref, "logits": tie}, {**ref, "logits": swapped}, "fp16")
    assert res["passed"] and res["top1_agreement"] < 1.0 and res["decisive_top1_flips"] == 0


@pytest.mark.parametrize("backbone,options,weights", [
    ("efficientnet-lite0", {"image_size": 224}, None),  # the demo's backbone, its shipped ImageNet weights
    pytest.param("dinov2-vitb14-reg", {"image_size": 224}, "random", marks=pytest.mark.slow),  # ViT-B/14-reg, 12 blocks
])
def test_fp16_export_passes_on_the_demo_backbone_and_vit_b14_reg(tmp_path, backbone, options, weights):
    from builders import make_tiny_run

    from qpmcli.export import export_onnx

    run = make_tiny_run(tmp_path / "run", backbone=backbone, options=options, weights=weights, n_features=64,
                        hidden=256)
    report = export_onnx(run, tmp_path / "m.onnx", fp16=True, verify=True, adapter=False, n_check=8)
    v16 = report["verify"]["fp16"]
    assert v16["passed"], v16["criterion"]
    assert v16["max_abs_diff"]["logits"] > report["verify"]["fp32"]["max_abs_diff"]["logits"]  # really fp16

"""Token cache: layout, reuse, key checks, resume after a kill (byte-identical), locking, bad images, CLI, torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CliResult, invoke

from qpmcli.cache import CacheLock, TokenCache, build_cache, cache_key_fields, cache_path
from qpmcli.errors import CacheError, ImageError

# A small dataset of real image files (with object masks); written as a module so subprocesses can import it too.
TINY_DS = '''
import os, time
import numpy as np
from PIL import Image
from qpmcli.contracts import Dataset, Sample
from qpmcli.images import open_image


class TinyImages(Dataset):
    name = "tiny"

    def __init__(self, root, n=24, split="train", delay=0.0):
        self.root, self.split, self.delay = str(root), split, delay
        self.classes = ["dark", "light", "mid"]
        os.makedirs(root, exist_ok=True)
        self.paths, self.masks = [], []
        rng = np.random.default_rng(0)
        for i in range(n):
            p = os.path.join(root, f"img{i:03d}.png")
            h, w = 30 + i % 7, 40 + i % 5
            if not os.path.exists(p):
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
            m = np.zeros((h, w), bool)
            m[h // 4: h // 2, w // 3:] = True
            self.paths.append(p)
            self.masks.append(m)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        if self.delay:
            time.sleep(self.delay)
        return Sample(open_image(self.paths[i]), i % 3, self.masks[i], self.paths[i])

    def label(self, i):
        return i % 3

    def path(self, i):
        return self.paths[i]

    @property
    def has_masks(self):
        return True

    def fingerprint(self):
        return {"name": self.name, "split": self.split, "size": len(self), "root": self.root}
'''

BUILD_SCRIPT = '''
import sys
sys.path.insert(0, {moddir!r})
from tinyds import TinyImages
from qpmcli.backbone import load_backbone
from qpmcli.cache import build_cache
from qpmcli.settings import QpmSettings
bb = load_backbone("dinov2-vits14", weights="random", settings=QpmSettings(device="cpu"), arch={{"depth": 1}},
                   image_size=56)
ds = TinyImages({root!r}, n={n}, delay={delay})
c = build_cache(bb, ds, "train", {cache!r}, batch_size=4, num_workers=0, progress=False, chunk_images=4)
print("DONE", c.path, len(c))
'''


@pytest.fixture(scope="module")
def tinymod(tmp_path_factory):
    d = tmp_path_factory.mktemp("mod")
    (d / "tinyds.py").write_text(TINY_DS)
    sys.path.insert(0, str(d))
    import tinyds

    yield d, tinyds
    sys.path.remove(str(d))


@pytest.fixture(scope="module")
def backbone():
    from qpmcli.backbone import load_backbone
    from qpmcli.settings import QpmSettings

    return load_backbone("dinov2-vits14", weights="random", settings=QpmSettings(device="cpu"), arch={"depth": 1},
                         image_size=56)


def test_cache_layout_cls_first_labels_masks_manifest(tmp_path, tinymod, backbone):
    from qpmcli.metrics import patch_mask

    ds = tinymod[1].TinyImages(tmp_path / "imgs", n=10)
    cache = build_cache(backbone, ds, "train", tmp_path / "cache", batch_size=4, progress=False)
    assert cache.tokens.shape == (10, 1 + 16, 384) and cache.tokens.dtype == np.float16
    assert not cache.tokens.flags.writeable and cache.grid == (4, 4)
    np.testing.assert_array_equal(cache.labels, np.arange(10) % 3)
    np.testing.assert_array_equal(cache.indices, np.arange(10))
    x = torch.stack([backbone.preprocess(ds[i].image) for i in range(3)])
    cls, patches = backbone(x)
    np.testing.assert_array_equal(cache.tokens[:3, 0], cls.half().numpy())
    np.testing.assert_array_equal(cache.tokens[:3, 1:], patches.half().numpy())
    np.testing.assert_array_equal(cache.masks[7], patch_mask(ds.masks[7], (4, 4)))
    m = cache.manifest
    assert m["n"] == 10 and m["t"] == 17 and m["d"] == 384 and m["classes"] == ["dark", "light", "mid"]
    assert m["weights_digest"] == backbone.weights_digest and m["preprocess"]["mode"] == "official"
    assert m["skipped"] == [] and m["layout"] == "cls_first"
    assert sorted(p.name for p in cache.path.iterdir()) == [
        "indices.npy", "labels.npy", "manifest.json", "masks.npy", "tokens.npy"]
    # a second call opens the same cache instead of recomputing
    t0 = os.path.getmtime(cache.path / "tokens.npy")
    again = build_cache(backbone, ds, "train", tmp_path / "cache", batch_size=4, progress=False)
    assert again.path == cache.path and os.path.getmtime(again.path / "tokens.npy") == t0


def test_other_settings_get_another_cache_and_a_mismatching_manifest_is_refused(tmp_path, tinymod, backbone):
    from qpmcli.backbone import load_backbone
    from qpmcli.settings import QpmSettings

    ds = tinymod[1].TinyImages(tmp_path / "imgs", n=4)
    a = build_cache(backbone, ds, "train", tmp_path / "cache", progress=False)
    ref = load_backbone("dinov2-vits14", weights="random", preprocess="reference", settings=QpmSettings(device="cpu"),
                        arch={"depth": 1}, image_size=56)
    b = build_cache(ref, ds, "train", tmp_path / "cache", progress=False)
    assert a.path != b.path and b.manifest["preprocess"]["minmax"] is True
    # tamper: a cache whose manifest says it was built from other weights is refused, not silently used
    mf = a.path / "manifest.json"
    m = json.loads(mf.read_text())
    m["key_fields"]["weights_digest"] = "0123456789abcdef"
    mf.write_text(json.dumps(m))
    with pytest.raises(CacheError, match="weights_digest"):
        TokenCache.open(a.path, expect=cache_key_fields(backbone, ds, "train"))


def _strip_created(path: Path) -> dict:
    m = json.loads((path / "manifest.json").read_text())
    m.pop("created")
    return m


@pytest.mark.e2e  # SIGKILL needs a process of its own
def test_resume_after_kill_gives_byte_identical_cache(tmp_path, tinymod, backbone):
    moddir, mod = tinymod
    root = tmp_path / "imgs"
    script = tmp_path / "build.py"
    # interrupted run: SIGKILL once a few chunks are done
    script.write_text(BUILD_SCRIPT.format(moddir=str(moddir), root=str(root), n=20, delay=0.15,
                                          cache=str(tmp_path / "c1")))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        done = list((tmp_path / "c1").glob("*.partial/done/*.json"))
        if len(done) >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = next((tmp_path / "c1").glob("*.partial"))
    n_done = len(list((partial / "done").glob("*.json")))
    assert 2 <= n_done < 5, "the kill should land mid-extraction"
    # rerun: continues (does not redo finished chunks) and finishes
    script.write_text(BUILD_SCRIPT.format(moddir=str(moddir), root=str(root), n=20, delay=0.0,
                                          cache=str(tmp_path / "c1")))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert not partial.exists()
    # uninterrupted reference run (same random weights: they are seeded)
    ref = build_cache(backbone, mod.TinyImages(root, n=20), "train", tmp_path / "c2", batch_size=4,
                      progress=False, chunk_images=4)
    (d1,) = [p for p in (tmp_path / "c1").iterdir() if p.is_dir()]
    d2 = ref.path
    assert d1.name == d2.name
    for f in ("tokens.npy", "labels.npy", "masks.npy", "indices.npy"):
        assert (d1 / f).read_bytes() == (d2 / f).read_bytes(), f
    assert _strip_created(d1) == _strip_created(d2)


def test_concurrent_build_waits_for_the_lock_or_fails_cleanly(tmp_path, tinymod, backbone):
    ds = tinymod[1].TinyImages(tmp_path / "imgs", n=4)
    final = cache_path(tmp_path / "cache", cache_key_fields(backbone, ds, "train"))
    lock = CacheLock(final.with_name(final.name + ".lock"))
    with lock:
        with pytest.raises(CacheError, match="being built by another process"):
            build_cache(backbone, ds, "train", tmp_path / "cache", progress=False, lock_timeout=0.3)
        result: dict = {}
        t = threading.Thread(target=lambda: result.setdefault(
            "cache", build_cache(backbone, ds, "train", tmp_path / "cache", progress=False)))
        t.start()
        time.sleep(0.6)
        assert t.is_alive() and "cache" not in result  # waiting, not building
    t.join(60)
    assert len(result["cache"]) == 4


def test_corrupt_image_is_named_or_skipped(tmp_path, tinymod, backbone):
    ds = tinymod[1].TinyImages(tmp_path / "imgs", n=9)
    Path(ds.paths[5]).write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ImageError, match="img005.png"):
        build_cache(backbone, ds, "train", tmp_path / "cache", batch_size=4, progress=False)
    shutil.rmtree(tmp_path / "cache")
    cache = build_cache(backbone, ds, "train", tmp_path / "cache", batch_size=4, progress=False, skip_bad=True)
    assert len(cache) == 8 and cache.masks.shape == (8, 4, 4)
    np.testing.assert_array_equal(cache.indices, [0, 1, 2, 3, 4, 6, 7, 8])
    np.testing.assert_array_equal(cache.labels, np.array([0, 1, 2, 3, 4, 6, 7, 8]) % 3)
    (s,) = cache.manifest["skipped"]
    assert s["index"] == 5 and s["path"].endswith("img005.png")
    x = backbone.preprocess(ds[6].image)[None]
    np.testing.assert_array_equal(cache.tokens[5, 0], backbone(x)[0][0].half().numpy())


def _qpm(*args: str, env: dict) -> CliResult:
    return invoke(list(args), env=env)


def test_cli_extract_json_and_missing_weights(tmp_path):
    env = {**os.environ, "QPM_CACHE_DIR": str(tmp_path / "cache"), "QPM_WEIGHTS_DIR": str(tmp_path / "w"),
           "QPM_DEVICE": "cpu", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "th")}
    out = _qpm("extract", "--backbone", "efficientnet-lite0", "--dataset", "digits", "--split", "test",
               "--image-size", "32", "--batch-size", "150", "--num-workers", "0", "--json", env=env)
    assert out.returncode == 0, out.stderr
    (c,) = json.loads(out.stdout)["caches"]
    assert c["grid"] == [1, 1] and c["dim"] == 1280 and c["tokens"] == 2 and c["images"] > 100
    tokens = np.load(Path(c["path"]) / "tokens.npy", mmap_mode="r")
    assert tokens.shape == (c["images"], 2, 1280) and np.isfinite(tokens).all()
    bad = _qpm("extract", "--backbone", "dinov2-vits14", "--dataset", "digits", "--split", "test", env=env)
    assert bad.returncode == 2
    assert "dinov2_vits14_pretrain.pth" in bad.stderr and "Traceback" not in bad.stderr


DIST_SCRIPT = '''
import os, sys
sys.path.insert(0, {moddir!r})
from tinyds import TinyImages
from qpmcli.backbone import load_backbone
from qpmcli.cache import build_cache
from qpmcli.settings import QpmSettings
import torch.distributed as dist
bb = load_backbone("dinov2-vits14", weights="random", settings=QpmSettings(device="cpu"), arch={{"depth": 1}},
                   image_size=56)
ds = TinyImages({root!r}, n=18)
c = build_cache(bb, ds, "train", {cache!r}, batch_size=4, num_workers=0, progress=False, chunk_images=4)
with open(os.path.join({out!r}, "rank" + os.environ["RANK"]), "w") as fh:  # one file per rank: stdout interleaves
    fh.write(str(len(c)))
dist.destroy_process_group()
'''


@pytest.mark.distributed
def test_torchrun_two_ranks_fill_one_cache_identically(tmp_path, tinymod, backbone):
    moddir, mod = tinymod
    root = tmp_path / "imgs"
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT.format(moddir=str(moddir), root=str(root), cache=str(tmp_path / "dc"),
                                         out=str(tmp_path)))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(script)], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["18", "18"]
    single = build_cache(backbone, mod.TinyImages(root, n=18), "train", tmp_path / "sc", batch_size=4,
                         progress=False, chunk_images=4)
    (d,) = [p for p in (tmp_path / "dc").iterdir() if p.is_dir()]
    assert d.name == single.path.name
    for f in ("labels.npy", "masks.npy", "indices.npy"):
        assert (d / f).read_bytes() == (single.path / f).read_bytes(), f
    np.testing.assert_allclose(np.load(d / "tokens.npy").astype(np.float32), single.tokens.astype(np.float32),
                               atol=2e-3, rtol=2e-3)

"""Datasets that ship with qpm (digits, shapes), the load_dataset front door and `qpm data check`."""

from __future__ import annotations

import hashlib
import inspect
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import qpmcli
from qpmcli.data import check_dataset, load_dataset, parse_options
from qpmcli.errors import DatasetError, PluginError
from qpmcli.registry import get_registry


def _digest(ds, indices) -> str:
    h = hashlib.sha256()
    for i in indices:
        s = ds[i]
        h.update(np.asarray(s.image).tobytes())
        h.update(np.asarray(s.mask).tobytes())
        h.update(str(s.label).encode())
    return h.hexdigest()


def test_all_six_datasets_are_registered_with_sources():
    reg = get_registry()
    names = set(reg.names("dataset"))
    assert {"cub200", "stanford-cars", "fgvc-aircraft", "imagefolder", "digits", "shapes"} <= names
    assert reg.get("dataset", "cub200").needs_root and "caltech" in reg.get("dataset", "cub200").source
    assert not reg.get("dataset", "shapes").needs_root and not reg.get("dataset", "digits").needs_root


# ------------------------------------------------------------------------------------------------------------ digits
def test_digits_split_is_stratified_disjoint_and_complete():
    train = qpmcli.load_dataset("digits", split="train")
    test = qpmcli.load_dataset("digits", split="test")
    assert (len(train), len(test)) == (1347, 450)
    assert set(train._indices.tolist()).isdisjoint(test._indices.tolist())
    assert len(set(train._indices.tolist()) | set(test._indices.tolist())) == 1797
    counts = np.bincount(test.labels(), minlength=10)
    assert counts.min() >= 44 and counts.max() <= 46  # 25 % of each class (174..183 images per class)
    assert train.classes == [str(d) for d in range(10)]


def test_digits_items_are_upscaled_rgb_with_ink_masks():
    ds = load_dataset("digits", split="train", image_size=96)
    s = ds[5]
    assert s.image.mode == "RGB" and s.image.size == (96, 96)
    arr = np.asarray(s.image)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()  # grey -> RGB
    assert s.mask.shape == (96, 96) and s.mask.dtype == bool
    assert 0.05 < s.mask.mean() < 0.8 and (arr[..., 0][s.mask] >= 64).all()
    assert s.label == ds.label(5)
    assert ds.fingerprint()["image_size"] == 96
    assert ds.fingerprint() != load_dataset("digits", split="train").fingerprint()


def test_digits_split_depends_on_seed_only():
    a = load_dataset("digits", split="test", seed=1)
    b = load_dataset("digits", split="test", seed=1)
    c = load_dataset("digits", split="test", seed=2)
    assert a._indices.tolist() == b._indices.tolist() != c._indices.tolist()


# ------------------------------------------------------------------------------------------------------------ shapes
def test_shapes_default_size_suits_a_cpu_demo():
    train, test = load_dataset("shapes", split="train"), load_dataset("shapes", split="test")
    assert (len(train), len(test), train.num_classes) == (400, 200, 10)
    assert np.bincount(train.labels()).tolist() == [40] * 10
    s = train[0]
    assert s.image.mode == "RGB" and s.image.size == (128, 128) and s.mask.shape == (128, 128)
    assert all(train.label(i) == train[i].label for i in range(12))


def test_shapes_mask_covers_exactly_the_drawn_object():
    ds = load_dataset("shapes", split="test", n_classes=12, image_size=144)
    for i in range(0, len(ds), 17):
        image, parts, background = ds.render(i, with_background=True)
        mask = ds[i].mask
        changed = (image != background).any(axis=-1)
        assert np.array_equal(mask, changed), i  # object pixels differ from the background, nothing else does
        assert np.array_equal(mask, parts > 0)
        assert 0.03 < mask.mean() < 0.5


def test_shapes_parts_are_the_class_parts_and_spatially_localised():
    ds = load_dataset("shapes", split="train", n_classes=20, per_class=3, image_size=160)
    attrs = ds.class_attributes()
    assert attrs.shape == (20, 56) and (attrs.sum(axis=1) == 3).all()
    for i in range(len(ds)):
        part_map = ds.part_map(i)
        drawn = sorted(int(v) - 2 for v in np.unique(part_map) if v >= 2)
        expected = np.flatnonzero(attrs[ds.label(i)]).tolist()
        assert drawn == expected, (i, drawn, expected)
        for v in drawn:  # every part is a compact blob, at most ~a quarter of the image wide
            ys, xs = np.nonzero(part_map == v + 2)
            assert np.ptp(ys) < 0.25 * 160 and np.ptp(xs) < 0.25 * 160
            assert len(ys) > 40  # and clearly visible


def test_shapes_image_attributes_are_the_drawn_parts():
    ds = load_dataset("shapes", split="test", n_classes=4, test_per_class=2)
    table = ds.image_attributes()
    assert table.shape == (8, 56) and table.dtype == bool
    for i in range(len(ds)):
        drawn = {int(v) - 2 for v in np.unique(ds.part_map(i)) if v >= 2}
        assert set(np.flatnonzero(table[i]).tolist()) == drawn


def test_datasets_survive_pickling_for_dataloader_workers(tmp_path):
    import pickle

    for ds in (load_dataset("shapes", n_classes=3, per_class=2), load_dataset("digits", split="test")):
        clone = pickle.loads(pickle.dumps(ds))
        assert _digest(clone, [0, 3]) == _digest(ds, [0, 3]) and clone.fingerprint() == ds.fingerprint()


def test_shapes_scale_to_200_distinct_classes():
    ds = load_dataset("shapes", split="train", n_classes=200, per_class=1, image_size=224)
    attrs = ds.class_attributes()
    assert len(ds) == 200 and len(set(ds.classes)) == 200
    assert len({tuple(row) for row in attrs.astype(int).tolist()}) == 200
    # the first classes do not depend on how many classes are asked for
    assert ds.classes[:10] == load_dataset("shapes", split="train").classes
    assert ds[199].image.size == (224, 224)


def test_shapes_fingerprint_changes_with_every_image_option():
    base = load_dataset("shapes", split="train").fingerprint()
    for option in ({"seed": 1}, {"image_size": 112}, {"n_classes": 11}, {"per_class": 41}, {"parts_per_class": 4}):
        assert load_dataset("shapes", split="train", **option).fingerprint() != base, option
    assert load_dataset("shapes", split="test").fingerprint() != base


def test_shapes_cue_marks_only_the_cued_classes_and_keeps_existing_caches_valid():
    from qpm_plugins.datasets.synthetic import CUE_COLOUR

    plain = {split: load_dataset("shapes", split=split, n_classes=6, per_class=2, test_per_class=2)
             for split in ("train", "test")}
    opts = dict(n_classes=6, per_class=2, test_per_class=2, cue_classes=2)
    cued = load_dataset("shapes", split="train", **opts)
    clean_test = load_dataset("shapes", split="test", **opts)
    cued_test = load_dataset("shapes", split="test", **opts, cue_test=True)
    # an option that is not set changes no fingerprint; the cue changes only the splits it draws on
    assert load_dataset("shapes", split="train", n_classes=6, per_class=2, test_per_class=2, cue_classes=0,
                        cue_test=True).fingerprint() == plain["train"].fingerprint()
    assert clean_test.fingerprint() == plain["test"].fingerprint()
    assert cued.fingerprint() != plain["train"].fingerprint() != cued_test.fingerprint()
    for i in range(12):
        a, b = np.asarray(plain["train"][i].image), np.asarray(cued[i].image)
        changed = (a != b).any(-1)
        assert changed.any() == (i % 6 < 2), i
        if changed.any():  # a white square behind the object: only background pixels change
            assert (b[changed] == CUE_COLOUR).all() and not (plain["train"][i].mask & changed).any()
            ys, xs = np.nonzero(changed)
            assert changed.sum() > 0.8 * (np.ptp(ys) + 1) * (np.ptp(xs) + 1)
            assert cued.cue_box(i) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        else:
            assert cued.cue_box(i) is None
            assert (cued[i].mask == plain["train"][i].mask).all()
        assert np.array_equal(np.asarray(clean_test[i].image), np.asarray(plain["test"][i].image))
        assert cued_test.has_cue(i) == (i % 6 < 2)
    twins = load_dataset("shapes", split="train", **opts, cue_twins=True)
    for i in range(2):  # class i is class 2 + i with one part recoloured
        a, b = set(twins.class_parts[i]), set(twins.class_parts[2 + i])
        assert len(a & b) == 2 and len(set(twins.class_parts)) == 6
    assert twins.classes[2:] == plain["train"].classes[2:]


def test_shapes_and_digits_are_identical_across_processes():
    shapes, digits = load_dataset("shapes", split="train"), load_dataset("digits", split="test")
    here = [_digest(shapes, [0, 7, 399]), _digest(digits, [0, 100, 449])]
    code = textwrap.dedent("""
        import hashlib, numpy as np, qpmcli
        def digest(ds, idx):
            h = hashlib.sha256()
            for i in idx:
                s = ds[i]
                h.update(np.asarray(s.image).tobytes()); h.update(np.asarray(s.mask).tobytes())
                h.update(str(s.label).encode())
            return h.hexdigest()
        print(digest(qpmcli.load_dataset("shapes", split="train"), [0, 7, 399]))
        print(digest(qpmcli.load_dataset("digits", split="test"), [0, 100, 449]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == here
    assert _digest(load_dataset("shapes", split="train", seed=5), [0]) != _digest(shapes, [0])


def test_shapes_generation_is_fast():
    import time

    ds = load_dataset("shapes", split="train", image_size=224)
    ds[0]
    start = time.process_time()  # CPU time: other processes on a busy machine do not count
    for i in range(50):
        ds[i]
    assert (time.process_time() - start) / 50 < 0.05  # about 5 ms per 224 px image on one core; 50 ms is the limit


def test_shapes_rejects_bad_options():
    with pytest.raises(DatasetError, match="n_classes must be between 2"):
        load_dataset("shapes", n_classes=1)
    with pytest.raises(DatasetError, match="has no option"):
        load_dataset("shapes", colour="red")
    with pytest.raises(IndexError):
        load_dataset("shapes")[400]


# ------------------------------------------------------------------------------------------------ the front door
def test_load_dataset_validates_name_split_and_root(tmp_path, monkeypatch):
    monkeypatch.delenv("QPM_DATA_ROOT", raising=False)
    (tmp_path / "none.toml").write_text("")  # an empty config file: no user or local settings
    monkeypatch.setenv("QPM_CONFIG", str(tmp_path / "none.toml"))
    with pytest.raises(PluginError, match="unknown dataset 'cub2011'.*cub200"):
        load_dataset("cub2011")
    with pytest.raises(DatasetError, match="unknown split 'val'"):
        load_dataset("shapes", split="val")
    with pytest.raises(DatasetError, match="needs a root folder.*--data-root.*caltech"):
        load_dataset("cub200")
    with pytest.raises(DatasetError, match=f"dataset root {tmp_path / 'nope'} does not exist"):
        load_dataset("cub200", root=tmp_path / "nope")


def test_data_root_setting_is_the_default_root(tmp_path, monkeypatch):
    for name in ("a", "b"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for k in range(3):
            from PIL import Image

            Image.new("RGB", (8, 8), (k * 40, 0, 0)).save(tmp_path / "imgs" / name / f"{k}.png")
    monkeypatch.setenv("QPM_DATA_ROOT", str(tmp_path / "imgs"))
    (tmp_path / "none.toml").write_text("")
    monkeypatch.setenv("QPM_CONFIG", str(tmp_path / "none.toml"))
    ds = load_dataset("imagefolder", split="train")
    assert ds.classes == ["a", "b"] and len(ds) == 4  # 1 of 3 per class held out
    assert load_dataset("shapes").num_classes == 10  # a root setting does not bother datasets that need none


def test_parse_options_coerces_values():
    assert parse_options(["n_classes=20", "crop=bbox", "test-fraction=0.3", "flag=true", "x=none"]) == {
        "n_classes": 20, "crop": "bbox", "test_fraction": 0.3, "flag": True, "x": None}
    with pytest.raises(DatasetError, match="KEY=VALUE"):
        parse_options(["n_classes"])


def test_check_dataset_reports_counts_masks_and_attributes():
    report = check_dataset("shapes", n_classes=5, per_class=4, test_per_class=2)
    assert report["classes"] == 5 and report["masks"] is True
    assert report["class_attributes"] == [5, 56] and report["image_attributes"] is True
    assert report["splits"]["train"]["count"] == 20 and report["splits"]["test"]["count"] == 10
    assert report["splits"]["train"]["per_class_min"] == report["splits"]["train"]["per_class_max"] == 4
    json.dumps(report)  # JSON-able


# -------------------------------------------------------------------------------------------------------------- CLI
def test_cli_data_check_json(qpm):
    out = qpm(["data", "check", "--dataset", "shapes", "--dataset-option", "n_classes=3", "--dataset-option",
               "per_class=2", "--json"])
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["classes"] == 3 and report["splits"]["train"]["count"] == 6
    assert report["splits"]["test"]["count"] == 60  # test_per_class default 20


def test_cli_data_check_table_and_errors(qpm, tmp_path):
    out = qpm(["data", "check", "--dataset", "digits"])
    assert out.returncode == 0, out.stderr
    assert "1347" in out.stdout and "450" in out.stdout and "masks: yes" in out.stdout
    out = qpm(["data", "check", "--dataset", "cub200", "--data-root", str(tmp_path / "missing")])
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr
    out = qpm(["data", "check", "--dataset", "cub200"])
    assert out.returncode == 2 and "needs a root folder" in out.stderr
    out = qpm(["data", "check", "--dataset", "shapes", "--dataset-option", "bogus=1"])
    assert out.returncode == 2 and "has no option 'bogus'" in out.stderr and "n_classes (int" in out.stderr


def test_builtin_factories_stay_functions_after_their_implementations_are_imported():
    """A factory named like its own submodule (``imagefolder`` importing ``.imagefolder``) is replaced on the package
    by the submodule on first use; a registry built after that held a module as the factory ("'module' object is not
    callable", seen when the doctor ran after other commands in one process)."""
    import importlib
    import pkgutil

    import qpm_plugins.backbones
    import qpm_plugins.datasets

    from qpmcli.registry import get_registry

    for package in (qpm_plugins.datasets, qpm_plugins.backbones):
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{info.name}")
    get_registry.cache_clear()
    try:
        reg = get_registry()
        for kind in ("dataset", "backbone"):
            for entry in reg.entries(kind):
                factory = entry.spec.factory
                assert callable(factory) and not inspect.ismodule(factory), (kind, entry.name, factory)
    finally:
        get_registry.cache_clear()

"""The public dataset layouts (CUB-200-2011, Stanford Cars, FGVC-Aircraft) and imagefolder, on miniature but
format-exact trees written here: real JPEG/PNG files, real .mat files written with scipy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qpmcli.data import check_dataset, load_dataset
from qpmcli.errors import DatasetError, ImageError

# ----------------------------------------------------------------------------------------------------------- CUB tree
CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
N_ATTR = 312


def _jpeg(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG", quality=90)


def make_cub(top: Path, segmentations: str = "beside") -> Path:
    """A 3-class CUB_200_2011 tree: 9 images (ids 1..9), ids 3, 6, 9 are test; masks = a rectangle per image."""
    base = top / "CUB_200_2011"
    images, labels, split, boxes = [], [], [], []
    for i in range(1, 10):
        cls = (i - 1) // 3
        folder = CUB_CLASSES[cls]
        stem = f"{folder.split('.', 1)[1]}_{i:04d}_{100 + i}"
        rel = f"{folder}/{stem}.jpg"
        w, h = 40 + 4 * i, 30 + 2 * i
        _jpeg(base / "images" / rel, (w, h), (20 * i, 100, 200 - 10 * i))
        seg_root = top if segmentations == "beside" else base
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[5:15, 8:20 + i] = 255
        mask[16, 8] = 3  # a faint annotation pixel still counts as object
        seg = seg_root / "segmentations" / folder / f"{stem}.png"
        seg.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask, "L").save(seg)
        images.append(f"{i} {rel}")
        labels.append(f"{i} {cls + 1}")
        split.append(f"{i} {0 if i % 3 == 0 else 1}")
        boxes.append(f"{i} 4.0 2.5 {w - 10}.0 {h - 8}.0")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (base / "classes.txt").write_text("\n".join(f"{k + 1} {c}" for k, c in enumerate(CUB_CLASSES)) + "\n")
    (base / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    attrs = base / "attributes"
    attrs.mkdir()
    cont = np.arange(3 * N_ATTR, dtype=np.float64).reshape(3, N_ATTR) / 10.0
    np.savetxt(attrs / "class_attribute_labels_continuous.txt", cont, fmt="%.6f")
    rows = []
    for i in range(1, 10):
        for a in range(1, N_ATTR + 1):
            present = int((i + a) % 2 == 0)
            certainty = 1 + (i * a) % 4  # 1 not visible, 2 guessing, 3 probably, 4 definitely
            if certainty == 1:
                present = 0
            rows.append(f"{i} {a} {present} {certainty} 1.234")
    rows[5] = rows[5].replace(" 1.234", " 0 1.234")  # the official file has a few rows with an extra field
    (attrs / "image_attribute_labels.txt").write_text("\n".join(rows) + "\n")
    (top / "attributes.txt").write_text("\n".join(f"{a} has_thing::{a}" for a in range(1, N_ATTR + 1)) + "\n")
    return base


def test_cub_counts_labels_names_and_paths(tmp_path):
    make_cub(tmp_path)
    train = load_dataset("cub200", root=tmp_path, split="train")  # the folder above CUB_200_2011 is accepted
    test = load_dataset("cub200", root=tmp_path / "CUB_200_2011", split="test")
    assert (len(train), len(test), train.num_classes) == (6, 3, 3)
    assert train.classes == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    assert train.labels() == [0, 0, 1, 1, 2, 2] and test.labels() == [0, 1, 2]  # 0-based
    assert test.ids == [3, 6, 9] and test.path(2).endswith("Sooty_Albatross_0009_109.jpg")
    s = test[1]
    assert s.label == 1 and s.path.endswith("002.Laysan_Albatross/Laysan_Albatross_0006_106.jpg")
    assert s.image.mode == "RGB" and s.image.size == (64, 42)


@pytest.mark.parametrize("where", ["beside", "inside"])
def test_cub_masks_from_segmentations(tmp_path, where):
    make_cub(tmp_path, segmentations=where)
    ds = load_dataset("cub200", root=tmp_path, split="test")
    assert ds.has_masks
    s = ds[0]  # image id 3: 52x36
    assert s.mask.shape == (36, 52) and s.mask.dtype == bool
    expected = np.zeros((36, 52), dtype=bool)
    expected[5:15, 8:23] = True
    expected[16, 8] = True
    assert np.array_equal(s.mask, expected)


def test_cub_without_segmentations_has_no_masks(tmp_path):
    make_cub(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "segmentations")
    ds = load_dataset("cub200", root=tmp_path, split="train")
    assert not ds.has_masks and ds[0].mask is None


def test_cub_bbox_crop_crops_image_and_mask_and_changes_fingerprint(tmp_path):
    make_cub(tmp_path)
    plain = load_dataset("cub200", root=tmp_path, split="train")
    cropped = load_dataset("cub200", root=tmp_path, split="train", crop="bbox")
    s, c = plain[0], cropped[0]  # id 1: 44x32, box x=4, y=2.5, w=34, h=24 -> [4, 2, 38, 27)
    assert c.image.size == (34, 25) and c.mask.shape == (25, 34)
    assert np.array_equal(c.mask, s.mask[2:27, 4:38])
    assert plain.fingerprint()["crop"] == "none" and cropped.fingerprint()["crop"] == "bbox"
    assert plain.fingerprint() != cropped.fingerprint()
    with pytest.raises(DatasetError, match="crop must be one of none, bbox"):
        load_dataset("cub200", root=tmp_path, crop="center")


def test_cub_class_and_image_attributes(tmp_path):
    make_cub(tmp_path)
    train = load_dataset("cub200", root=tmp_path, split="train")
    attrs = train.class_attributes()
    assert attrs.shape == (3, N_ATTR) and attrs[2, 5] == pytest.approx((2 * N_ATTR + 5) / 10.0)
    assert train.attribute_names()[0] == "has_thing::1"
    assert train.has_image_attributes
    present, known = train.image_attributes(), train.image_attribute_known()
    assert present.shape == known.shape == (6, N_ATTR) and present.dtype == bool
    for row, image_id in enumerate(train.ids):  # ids 1, 2, 4, 5, 7, 8
        for a in range(1, N_ATTR + 1):
            certainty = 1 + (image_id * a) % 4
            is_present = (image_id + a) % 2 == 0 and certainty > 1
            assert known[row, a - 1] == (certainty >= 3)
            assert present[row, a - 1] == (is_present and certainty >= 3)


def test_cub_missing_list_file_names_it_and_the_source(tmp_path):
    base = make_cub(tmp_path)
    (base / "classes.txt").unlink()
    with pytest.raises(DatasetError, match=r"classes\.txt.*caltech"):
        load_dataset("cub200", root=tmp_path)


def test_cub_wrong_layout_is_explained(tmp_path):
    (tmp_path / "birds").mkdir()
    with pytest.raises(DatasetError, match=r"is not a CUB-200-2011 folder: expected images\.txt"):
        load_dataset("cub200", root=tmp_path / "birds")


def test_cub_label_out_of_range(tmp_path):
    base = make_cub(tmp_path)
    text = (base / "image_class_labels.txt").read_text().replace("4 2\n", "4 7\n")
    (base / "image_class_labels.txt").write_text(text)
    with pytest.raises(DatasetError, match=r"label 6 of .*_0004_104\.jpg is out of range \(expected 0\.\.2"):
        load_dataset("cub200", root=tmp_path)


def test_cub_truncated_image_and_missing_files(tmp_path):
    base = make_cub(tmp_path)
    bad = base / "images" / CUB_CLASSES[0] / "Black_footed_Albatross_0001_101.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    ds = load_dataset("cub200", root=tmp_path)
    with pytest.raises(ImageError, match="Black_footed_Albatross_0001_101.jpg"):
        ds[0]
    (base / "images" / CUB_CLASSES[2] / "Sooty_Albatross_0008_108.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 listed image file\(s\) are missing, first: .*Sooty_Albatross_0008"):
        check_dataset("cub200", root=tmp_path, decode=0)


def test_cub_missing_mask_file(tmp_path):
    make_cub(tmp_path)
    (tmp_path / "segmentations" / CUB_CLASSES[0] / "Black_footed_Albatross_0001_101.png").unlink()
    with pytest.raises(DatasetError, match="missing CUB segmentation .*Black_footed_Albatross_0001_101.png"):
        load_dataset("cub200", root=tmp_path)[0]


def test_cli_data_check_on_cub_tree(qpm, tmp_path):
    make_cub(tmp_path / "data")
    out = qpm(["data", "check", "--dataset", "cub200", "--data-root", str(tmp_path / "data"), "--json"])
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["classes"] == 3 and report["masks"] is True and report["image_attributes"] is True
    assert report["class_attributes"] == [3, N_ATTR]
    assert {k: v["count"] for k, v in report["splits"].items()} == {"train": 6, "test": 3}
    out = qpm(["data", "check", "--dataset", "cub200"], env_extra={"QPM_DATA_ROOT": str(tmp_path / "data")})
    assert out.returncode == 0 and "masks: yes" in out.stdout and "3x312" in out.stdout


# ------------------------------------------------------------------------------------------------- Stanford Cars
CAR_NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012", "Audi R8 Coupe 2012"]


def _annotations(rows: list[tuple[str, int]], with_class: bool = True) -> np.ndarray:
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if with_class else []) + ["fname"]
    arr = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for k, (fname, cls) in enumerate(rows):
        values = [np.uint8(1), np.uint8(2), np.uint16(30), np.uint16(20)] + ([np.uint8(cls)] if with_class else [])
        arr[0, k] = tuple(values + [fname])
    return arr


def make_cars(root: Path, test_annos_at_root: bool = True, nested: bool = False) -> Path:
    from scipy.io import savemat

    devkit = root / "car_devkit"
    devkit.mkdir(parents=True)
    names = np.empty((1, len(CAR_NAMES)), dtype=object)
    names[0, :] = CAR_NAMES
    savemat(devkit / "cars_meta.mat", {"class_names": names})
    train = [(f"{k + 1:05d}.jpg", k % 4 + 1) for k in range(8)]
    test = [(f"{k + 1:05d}.jpg", (k + 1) % 4 + 1) for k in range(5)]
    savemat(devkit / "cars_train_annos.mat", {"annotations": _annotations(train)})
    savemat(devkit / "cars_test_annos.mat", {"annotations": _annotations(test, with_class=False)})
    target = root if test_annos_at_root else devkit
    savemat(target / "cars_test_annos_withlabels.mat", {"annotations": _annotations(test)})
    for split, rows in (("train", train), ("test", test)):
        folder = root / f"cars_{split}" / (f"cars_{split}" if nested else "")
        for k, (fname, _) in enumerate(rows):
            _jpeg(folder / fname, (30 + k, 20), (10 * k, 50, 90))
    return root


@pytest.mark.parametrize("at_root,nested", [(True, False), (False, True)])
def test_cars_devkit_and_mirror_layouts(tmp_path, at_root, nested):
    make_cars(tmp_path / "cars", test_annos_at_root=at_root, nested=nested)
    train = load_dataset("stanford-cars", root=tmp_path / "cars", split="train")
    test = load_dataset("stanford-cars", root=tmp_path / "cars", split="test")
    assert train.classes == CAR_NAMES and train.num_classes == 4
    assert (len(train), len(test)) == (8, 5)
    assert train.labels() == [0, 1, 2, 3, 0, 1, 2, 3] and test.labels() == [1, 2, 3, 0, 1]
    s = test[2]
    assert s.label == 3 and s.path.endswith("00003.jpg") and s.image.size == (32, 20) and s.mask is None
    assert not train.has_masks and train.class_attributes() is None


def test_cars_without_labelled_test_annotations_says_where_to_get_them(tmp_path):
    root = make_cars(tmp_path / "cars")
    (root / "cars_test_annos_withlabels.mat").unlink()
    assert len(load_dataset("stanford-cars", root=root, split="train")) == 8
    with pytest.raises(DatasetError, match="missing cars_test_annos_withlabels.mat.*has no labels.*Kaggle"):
        load_dataset("stanford-cars", root=root, split="test")


def test_cars_errors_for_wrong_layout_and_damaged_mat(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="is not a Stanford Cars folder: expected .*car_devkit"):
        load_dataset("stanford-cars", root=tmp_path / "empty")
    root = make_cars(tmp_path / "cars")
    (root / "car_devkit" / "cars_train_annos.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(DatasetError, match="cannot read Stanford Cars annotation file .*cars_train_annos.mat"):
        load_dataset("stanford-cars", root=root)


def test_cars_class_out_of_range(tmp_path):
    from scipy.io import savemat

    root = make_cars(tmp_path / "cars")
    savemat(root / "car_devkit" / "cars_train_annos.mat", {"annotations": _annotations([("00001.jpg", 9)])})
    with pytest.raises(DatasetError, match=r"cars_train_annos.mat: label 8 of .*00001.jpg is out of range"):
        load_dataset("stanford-cars", root=root)


# ------------------------------------------------------------------------------------------------- FGVC-Aircraft
VARIANTS = ["707-320", "A300B4", "Cessna 172", "F-16A/B"]


def make_aircraft(top: Path) -> Path:
    data = top / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(VARIANTS) + "\n")
    trainval = [(f"{1000000 + k}", VARIANTS[k % 4]) for k in range(6)]
    test = [(f"{2000000 + k}", VARIANTS[(k + 2) % 4]) for k in range(3)]
    for name, rows in (("trainval", trainval), ("test", test)):
        (data / f"images_variant_{name}.txt").write_text("".join(f"{i} {v}\n" for i, v in rows))
        for i, _ in rows:
            _jpeg(data / "images" / f"{i}.jpg", (50, 40), (60, 60, 60))
    return data


def test_aircraft_variant_level_from_either_root(tmp_path):
    data = make_aircraft(tmp_path)
    for root in (data.parent, data):
        train = load_dataset("fgvc-aircraft", root=root, split="train")
        test = load_dataset("fgvc-aircraft", root=root, split="test")
        assert train.classes == VARIANTS  # names with spaces and slashes survive
        assert (len(train), len(test)) == (6, 3)
        assert train.labels() == [0, 1, 2, 3, 0, 1] and test.labels() == [2, 3, 0]
        assert test[1].path.endswith("2000001.jpg") and test[1].image.size == (50, 40)


def test_aircraft_unknown_variant_and_wrong_root(tmp_path):
    data = make_aircraft(tmp_path)
    with (data / "images_variant_test.txt").open("a") as fh:
        fh.write("2000099 Spitfire\n")
    with pytest.raises(DatasetError, match="variant 'Spitfire' is not in .*variants.txt"):
        load_dataset("fgvc-aircraft", root=data, split="test")
    assert len(load_dataset("fgvc-aircraft", root=tmp_path)) == 6  # the folder above fgvc-aircraft-2013b works too
    (tmp_path / "planes").mkdir()
    with pytest.raises(DatasetError, match="is not an FGVC-Aircraft folder.*robots.ox.ac.uk"):
        load_dataset("fgvc-aircraft", root=tmp_path / "planes")


# ---------------------------------------------------------------------------------------------------- imagefolder
def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (12, 10), value).save(path)


def test_imagefolder_train_test_folders(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            for k in range(n):
                _png(tmp_path / split / cls / f"{k}.png", 10 * k)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    train = load_dataset("imagefolder", root=tmp_path, split="train")
    test = load_dataset("imagefolder", root=tmp_path, split="test")
    assert train.classes == ["cat", "dog"] and (len(train), len(test)) == (6, 4)
    assert test.labels() == [0, 0, 1, 1] and train[0].image.mode == "RGB"
    assert train.fingerprint()["layout"] == "train/test"


def test_imagefolder_single_tree_holds_out_a_seeded_fraction(tmp_path):
    for cls in ("a", "b", "c"):
        for k in range(10):
            _png(tmp_path / cls / f"img{k}.png", k)
    train = load_dataset("imagefolder", root=tmp_path, split="train", test_fraction=0.3, seed=3)
    test = load_dataset("imagefolder", root=tmp_path, split="test", test_fraction=0.3, seed=3)
    assert (len(train), len(test)) == (21, 9) and np.bincount(test.labels()).tolist() == [3, 3, 3]
    assert not set(train.paths) & set(test.paths)
    again = load_dataset("imagefolder", root=tmp_path, split="test", test_fraction=0.3, seed=3)
    other = load_dataset("imagefolder", root=tmp_path, split="test", test_fraction=0.3, seed=4)
    assert again.paths == test.paths and other.paths != test.paths
    assert test.fingerprint() == again.fingerprint() != other.fingerprint()


def test_imagefolder_errors(tmp_path):
    _png(tmp_path / "train" / "a" / "0.png", 1)
    (tmp_path / "train" / "b").mkdir()
    with pytest.raises(DatasetError, match=r"class folder .*train/b holds no images"):
        load_dataset("imagefolder", root=tmp_path)
    _png(tmp_path / "train" / "b" / "0.png", 1)
    _png(tmp_path / "test" / "zebra" / "0.png", 1)
    with pytest.raises(DatasetError, match=r"class folder .*test/zebra has no counterpart"):
        load_dataset("imagefolder", root=tmp_path, split="test")
    (tmp_path / "flat").mkdir()
    _png(tmp_path / "flat" / "x.png", 1)
    with pytest.raises(DatasetError, match="must hold at least two class folders"):
        load_dataset("imagefolder", root=tmp_path / "flat")

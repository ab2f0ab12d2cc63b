"""`qpm explain`: local figures, the contrastive view, stored prototypes (global view), the HTML report, ONNX input.

Two real runs are built here (no mocks): ``made_run`` has a hand-set binary W on a random-init adapter (so shared and
distinct features are known exactly) and real prototypes from a real token cache; ``trained_run`` (in
``test_explain_saliency.py``) is trained on ``shapes``, whose object masks are exact.
"""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from builders import MADE_ARCH, MADE_FEATURE_IDS, MADE_IMAGE_SIZE, MADE_W
from conftest import CliResult, invoke, isolated_environ
from PIL import Image

from qpmcli import evidence as V
from qpmcli import explain as E
from qpmcli import prototypes as P
from qpmcli.errors import ArtifactError, ConfigError, ImageError

ARCH, IMAGE_SIZE, FEATURE_IDS, W = MADE_ARCH, MADE_IMAGE_SIZE, MADE_FEATURE_IDS, MADE_W


def cli(args: list[str], tmp: Path) -> CliResult:
    """``qpm ARGS`` in-process, in an isolated home under ``tmp``."""
    return invoke(args, isolated_environ(tmp), tmp)


def distinct_colours(img: np.ndarray) -> int:
    return len(np.unique(img.reshape(-1, img.shape[-1]), axis=0))


# ------------------------------------------------------------------------------------------ pure functions
def test_compare_classes_splits_shared_and_distinct_features_by_dense_id():
    md = {"weight": W, "features": FEATURE_IDS, "class_names": ["a", "b", "c", "d"]}
    g = V.compare_classes(md, 0, 1)
    assert g["shared_features"] == [2, 3] and g["only_a_features"] == [5] and g["only_b_features"] == [7]
    g = V.compare_classes(md, 0, 2)
    assert g["shared_features"] == [] and g["only_a_features"] == [2, 3, 5] and g["only_b_features"] == [7, 8, 11]


def test_contributions_plus_bias_sum_to_the_logit_and_are_sorted():
    rng = np.random.default_rng(0)
    f = rng.uniform(0, 2, 6)
    mu, sigma = np.full(6, 0.5), np.full(6, 0.25)
    bias = np.array([0.1, -0.2, 0.3, 0.0])
    logits = W @ ((f - mu) / sigma) + bias
    maps = rng.uniform(0, 1, (6, 8, 8)).astype(np.float32)
    md = {"weight": W, "features": FEATURE_IDS, "mu": mu, "sigma": sigma, "bias": bias,
          "class_names": ["a", "b", "c", "d"]}
    for c in range(4):
        ex = V.explain_output(logits, maps, f, md, class_index=c)
        assert len(ex.features) == 3
        assert sum(e.contribution for e in ex.features) + ex.bias == pytest.approx(logits[c], abs=1e-9)
        contribs = [e.contribution for e in ex.features]
        assert contribs == sorted(contribs, reverse=True)
        assert {e.feature for e in ex.features} == {FEATURE_IDS[k] for k in np.flatnonzero(W[c])}
    ex = V.explain_output(logits, maps, f, md)
    assert ex.class_index == int(np.argmax(logits)) and ex.top[0]["index"] == ex.class_index
    assert sum(t["probability"] for t in V.explain_output(logits, maps, f, md, top_k=4).top) == pytest.approx(1.0)


def test_evidence_map_mean_recovers_the_logit():
    rng = np.random.default_rng(1)
    maps = rng.uniform(0, 1, (6, 8, 8))
    f = maps.mean((1, 2))
    mu, sigma = rng.uniform(0, 1, 6), rng.uniform(0.2, 1, 6)
    md = {"weight": W, "features": FEATURE_IDS, "mu": mu, "sigma": sigma}
    for c in range(4):
        logit = W[c] @ ((f - mu) / sigma)
        const = W[c] @ (mu / sigma)
        assert V.evidence_map(maps, md, c).mean() - const == pytest.approx(logit, abs=1e-9)


def test_mask_fraction_and_upsampling():
    m = np.zeros((4, 4), np.float32)
    m[1, 1] = 1.0
    up = V.upsample(m, (40, 40))
    assert up.shape == (40, 40) and up.argmax() // 40 in range(10, 20)
    mask = np.zeros((40, 40), bool)
    mask[10:20, 10:20] = True
    assert V.mask_fraction(up, mask) == pytest.approx(0.5625, abs=1e-6)  # bilinear tent: (3/4)^2 inside
    assert V.mask_fraction(np.ones((2, 2)), np.array([[1, 0], [0, 0]], bool)) == pytest.approx(0.25)
    assert np.isnan(V.mask_fraction(np.zeros((2, 2)), np.ones((2, 2), bool)))


# Machado, Oliveira & Fernandes (2009), severity 1.0, on linear RGB: what protan, deutan and tritan viewers see
CVD = {"protan": [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]],
       "deutan": [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]],
       "tritan": [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602], [0.004733, 0.691367, 0.303900]]}


def _lab(srgb: np.ndarray) -> np.ndarray:
    lin = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    xyz = lin @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    f = np.cbrt(xyz / [0.95047, 1.0, 1.08883])
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], -1)


def _seen(srgb: np.ndarray, kind: str) -> np.ndarray:
    lin = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4) @ np.array(CVD[kind]).T
    lin = np.clip(lin, 0, 1)
    return np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)


def test_palette_keeps_a_class_apart_for_colour_blind_readers():
    """The first 5 colours (one QPM class) stay >= 25 CIELAB units apart for normal, protan, deutan and tritan
    vision, all 10 (a comparison) >= 15 (the golden-ratio hues used before put two features of one demo class
    8 units apart for normal vision and 0.6 for tritan)."""
    cols = np.array([V.colour_rgb(c) for c in V.PALETTE])
    assert len(set(V.PALETTE)) == 10
    for kind in ("normal", *CVD):
        lab = _lab(cols if kind == "normal" else _seen(cols, kind))
        d = np.linalg.norm(lab[:, None] - lab[None], axis=-1)
        assert d[:5, :5][~np.eye(5, dtype=bool)].min() > 25, kind
        assert d[~np.eye(10, dtype=bool)].min() > 15, kind


def test_class_colours_distinct_per_class_and_kept_in_the_comparison():
    W, FEATURE_IDS = MADE_W, MADE_FEATURE_IDS
    meta = {"weight": W, "features": FEATURE_IDS, "class_names": ["a", "b", "c", "d"]}
    for c in range(W.shape[0]):
        colours = V.class_colours(meta, c)
        assert sorted(colours) == sorted(FEATURE_IDS[k] for k in np.flatnonzero(W[c]))
        assert list(colours.values()) == list(V.PALETTE[:len(colours)])  # distinct, in W's column order
    pair = V.class_colours(meta, 0, 1)
    assert {f: pair[f] for f in V.class_colours(meta, 0)} == V.class_colours(meta, 0)  # A keeps its colours
    assert len(set(pair.values())) == len(pair)


def test_resolve_class_by_name_index_and_substring():
    names = ["red circle + blue star", "red circle + green ring", "Black Tern"]
    assert V.resolve_class("black tern", names) == 2
    assert V.resolve_class("1", names) == 1
    assert V.resolve_class("green", names) == 1
    with pytest.raises(ConfigError, match="2 classes match"):
        V.resolve_class("red", names)
    with pytest.raises(ConfigError, match="out of range"):
        V.resolve_class("7", names)


# --------------------------------------------------------------------------------------------- prototypes
def test_build_prototypes_stores_top_patches_per_selected_feature(made_run):
    run = made_run["run"]
    assert made_run["prototypes"]["written"] and made_run["prototypes"]["features"] == 6
    doc = json.loads((run / "prototypes" / "prototypes.json").read_text())
    assert doc["format"] == "qpm-prototypes" and doc["grid"] == [8, 8]
    assert sorted(int(k) for k in doc["features"]) == FEATURE_IDS
    for entries in doc["features"].values():
        assert len(entries) == 4
        acts = [e["activation"] for e in entries]
        assert acts == sorted(acts, reverse=True)
        assert len({e["row"] for e in entries}) == 4  # one patch per training image
        for e in entries:
            with Image.open(run / "prototypes" / e["file"]) as im:
                assert im.size == (64, 64)
            assert e["class"] in made_run["classes"]
    # the stored activation is the map's maximum on that training image: recompute one
    import torch

    from qpmcli.cache import TokenCache

    cache_dirs = [p for p in (run.parent / "cache").iterdir() if (p / "manifest.json").is_file()]
    cache = TokenCache.open(cache_dirs[0])
    fid, entries = next(iter(doc["features"].items()))
    k = FEATURE_IDS.index(int(fid))
    with torch.no_grad():
        maps = made_run["model"](torch.from_numpy(np.asarray(cache.tokens, dtype=np.float32))).maps
    peaks = maps[:, k].flatten(1).max(1).values
    assert entries[0]["activation"] == pytest.approx(float(peaks.max()), rel=1e-5)
    assert entries[0]["row"] == int(peaks.argmax())
    r, c = entries[0]["patch"]
    assert float(maps[entries[0]["row"], k, r, c]) == pytest.approx(entries[0]["activation"], rel=1e-5)

    loaded = P.load_prototypes(run)
    assert sorted(loaded) == FEATURE_IDS
    png = base64.b64decode(loaded[FEATURE_IDS[0]][0]["png_b64"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    embedded = json.loads(P.prototypes_metadata(run))
    assert sorted(int(k) for k in embedded) == FEATURE_IDS
    assert set(embedded[str(FEATURE_IDS[0])][0]) == {"png_b64", "class", "activation", "patch_box"}
    assert sorted(P.load_prototypes({"qpm_prototypes": P.prototypes_metadata(run)})) == FEATURE_IDS


def test_prototypes_skip_training_images_that_became_unreadable(made_run, tmp_path):
    from qpmcli.cache import TokenCache
    from qpmcli.data import load_dataset

    class EvenImagesGone:
        """The shapes train split whose even items fail to load (as if those files were deleted after caching)."""

        def __init__(self, ds):
            self.ds, self.classes = ds, ds.classes

        def __getitem__(self, i):
            if i % 2 == 0:
                raise ImageError(f"image {i} not found")
            return self.ds[i]

    run = tmp_path / "run"
    cache = TokenCache.open(next(p for p in (made_run["run"].parent / "cache").iterdir()
                                 if (p / "manifest.json").is_file()))
    train = load_dataset("shapes", split="train", n_classes=4, per_class=4, test_per_class=2, image_size=IMAGE_SIZE,
                         seed=0)
    res = P.build_prototypes(made_run["model"], cache, EvenImagesGone(train), run, per_feature=4)
    assert res["written"] and res["unreadable"] > 0
    doc = json.loads((run / "prototypes" / "prototypes.json").read_text())
    kept = [e for entries in doc["features"].values() for e in entries]
    assert kept and all(e["index"] % 2 == 1 for e in kept) and len(kept) < 6 * 4
    assert all((run / "prototypes" / e["file"]).is_file() for e in kept)


def test_missing_prototypes_are_a_clear_error(tmp_path):
    with pytest.raises(ArtifactError, match="no prototypes"):
        P.load_prototypes(tmp_path)
    with pytest.raises(ArtifactError, match="no prototypes"):
        P.load_prototypes({})


# ---------------------------------------------------------------------------------------------- the figures
def test_library_explain_writes_local_compare_global_and_json(made_run, tmp_path):
    classes = made_run["classes"]
    out = tmp_path / "out"
    s = E.explain([made_run["images"][0]], made_run["run"], out_dir=out, class_name=classes[0],
                  compare=classes[1], device="cpu")
    item = s["images"][0]
    assert item["class_index"] == 0 and [e["feature"] for e in item["features"]].count(5) == 1
    assert sorted(e["feature"] for e in item["features"]) == [2, 3, 5]
    assert item["compare"]["shared"] == [2, 3] and item["compare"]["only_a"] == [5]
    assert item["compare"]["only_b"] == [7]
    # the classifier's own logit equals contributions + bias (no bias for QPM)
    assert sum(e["contribution"] for e in item["features"]) == pytest.approx(item["logit"], abs=1e-4)
    with Image.open(item["figure"]) as im:
        assert im.size == (1600, 720)
        fig = np.asarray(im.convert("RGB"))
    # every panel shows something (an image, a heat map, bars), one panel per feature of the class
    panels = item["extra"]["panels"]
    assert set(panels) == {"input", "prediction", "contributions", "evidence", "composite", "feature 2",
                           "feature 3", "feature 5"}
    for name, (x0, y0, x1, y1) in panels.items():
        assert 80 < x1 - x0 < 400 and 80 < y1 - y0 < 400, name
        region = fig[y0 + 4:y1 - 4, x0 + 4:x1 - 4]
        assert distinct_colours(region) > (200 if name not in ("prediction", "contributions") else 3), name
    feature_boxes = [panels[f"feature {f}"] for f in (2, 3, 5)]
    assert all(b[1] > panels["input"][3] for b in feature_boxes)  # the feature row lies below the header row
    with Image.open(item["compare"]["figure"]) as im:
        assert im.size == (1140, 1100)  # 4 columns: 2.6 in each + 1 in, 11 in high, 100 dpi
    with Image.open(s["global"]["figure"]) as im:
        assert im.size[0] > 500 and im.size[1] > 500
        assert distinct_colours(np.asarray(im.convert("RGB"))) > 1000
    assert s["global"]["features"] == [2, 3, 5]
    saved = json.loads((out / "explanations.json").read_text())
    assert saved["images"][0]["features"] == item["features"]


def test_unknown_class_and_self_compare_are_user_errors(made_run, tmp_path):
    with pytest.raises(ConfigError, match="no class matches"):
        E.explain([made_run["images"][0]], made_run["run"], out_dir=tmp_path, compare="purple unicorn", device="cpu")
    with pytest.raises(ConfigError, match="explained class itself"):
        E.explain([made_run["images"][0]], made_run["run"], out_dir=tmp_path, class_name="0", compare="0",
                  device="cpu")
    pred = E.explain([made_run["images"][0]], made_run["run"], out_dir=tmp_path / "p", device="cpu")["images"][0]
    same = E.explain([made_run["images"][0]], made_run["run"], out_dir=tmp_path / "q", device="cpu",
                     compare=str(pred["predicted_index"]), html_report=True)
    assert "skipped" in same["images"][0]["compare"]  # the predicted class is the --compare class: no view, no error
    assert "no contrastive view" in Path(same["html"]).read_text()
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png")
    Image.open(made_run["images"][0]).save(folder / "fine.png")
    mixed = E.explain([folder], made_run["run"], out_dir=tmp_path / "m", device="cpu", html_report=True)
    assert mixed["num_failed"] == 1 and "cannot read image" in mixed["images"][0]["error"]
    assert mixed["images"][1]["figure"] and "skipped: cannot read image" in Path(mixed["html"]).read_text()
    with pytest.raises(ImageError, match="none of the 1 image"):
        E.explain([folder / "broken.png"], made_run["run"], out_dir=tmp_path / "n", device="cpu")
    with pytest.raises(ImageError, match="not found"):
        E.explain([tmp_path / "nope.jpg"], made_run["run"], out_dir=tmp_path, device="cpu")


class _Checker(HTMLParser):
    """Checks nesting of non-void elements and collects every URL-bearing attribute."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.urls: list[tuple[str, str, str]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "poster"):
                self.urls.append((tag, name, value or ""))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()


def test_cli_folder_with_html_compare_and_class(made_run, tmp_path):
    classes = made_run["classes"]
    r = cli(["explain", str(made_run["folder"]), "--model", str(made_run["run"]), "--html", "--class", classes[0],
             "--compare", classes[1], "--device", "cpu", "-q"], tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "explanations"  # the default --out, relative to the working directory
    s = json.loads((out / "explanations.json").read_text())
    assert len(s["images"]) == 2 and all(i["class_name"] == classes[0] for i in s["images"])
    assert all(i["compare"]["only_b"] == [7] for i in s["images"])
    printed = " ".join(r.stdout.split())  # rich wraps long lines
    assert "test_0.png" in printed and "report:" in printed and "only B f7 ->" in printed
    with Image.open(out / "test_1_explain.png") as im:
        assert im.size == (1600, 720)
    text = Path(s["html"]).read_text(encoding="utf-8")
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert text.startswith("<!DOCTYPE html>") and not checker.errors and not checker.stack
    srcs = [u for u in checker.urls]
    assert len(srcs) == 1 + 2 * 2  # global figure + (local + compare) per image
    for tag, attr, url in srcs:
        assert tag == "img" and attr == "src" and url.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
            assert im.format == "PNG" and im.size[0] >= 500
    assert "http://" not in text and "https://" not in text
    assert all(f"test_{i}.png" in text for i in range(2))


def test_cli_user_errors_are_one_line_exit_2(tmp_path):
    r = cli(["explain", str(tmp_path / "missing.png"), "--model", str(tmp_path)], tmp_path)
    assert r.returncode == 2 and "image not found" in r.stderr and "Traceback" not in r.stderr
    r = cli(["explain", "--model", str(tmp_path)], tmp_path)
    assert r.returncode == 2 and "at least one image" in r.stderr and "Traceback" not in r.stderr


def test_explain_from_onnx_alone_matches_the_run_directory(made_run, tmp_path):
    from qpmcli.export import export_onnx

    onnx_path = tmp_path / "model.onnx"
    export_onnx(made_run["run"], onnx_path, adapter=False)
    alone = tmp_path / "elsewhere" / "model.onnx"  # no run directory next to it
    alone.parent.mkdir()
    onnx_path.rename(alone)
    classes = made_run["classes"]
    a = E.explain([made_run["images"][1]], made_run["run"], out_dir=tmp_path / "a", class_name=classes[3],
                  device="cpu")
    b = E.explain([made_run["images"][1]], alone, out_dir=tmp_path / "b", class_name=classes[3], device="cpu")
    fa, fb = a["images"][0]["features"], b["images"][0]["features"]
    assert [e["feature"] for e in fa] == [e["feature"] for e in fb]
    for x, y in zip(fa, fb, strict=True):
        assert y["activation"] == pytest.approx(x["activation"], abs=1e-4)
        assert y["contribution"] == pytest.approx(x["contribution"], abs=1e-3)
    assert b["global"]["features"] == [2, 8, 11]  # prototypes came from the ONNX metadata
    with Image.open(b["global"]["figure"]) as im:
        assert distinct_colours(np.asarray(im.convert("RGB"))) > 1000


def test_dense_head_runs_compare_the_top_features_and_refuse_global_view(made_run, tmp_path):
    """A linear-probe run (no MLP, CLS pooling, dense W over 48 features) still gets local and contrastive views."""
    import torch

    from qpmcli import artifact
    from qpmcli.model import QPMModel, linear_probe_config

    bb = made_run["backbone"]
    torch.manual_seed(0)
    model = QPMModel(**linear_probe_config(bb.embed_dim, 4, bb.grid)).eval()
    run = tmp_path / "probe"
    info = {"class_names": made_run["classes"], "backbone": bb.name, "weights_digest": bb.weights_digest,
            "preprocess": bb.preprocess_config, "image_size": list(bb.image_size), "grid": list(bb.grid),
            "embed_dim": bb.embed_dim, "head": "linear-probe",
            "backbone_options": {"arch": ARCH, "image_size": IMAGE_SIZE}}
    artifact.save_model(model, run, "final", info=info)
    pred = E.explain([made_run["images"][0]], run, out_dir=tmp_path / "p", device="cpu")["images"][0]
    s = E.explain([made_run["images"][0]], run, out_dir=tmp_path / "out", device="cpu",
                  compare=str((pred["predicted_index"] + 1) % 4))
    item = s["images"][0]
    assert len(item["features"]) == 5  # the 5 largest |contributions| of 48
    c = item["compare"]
    assert len(c["shared"]) + len(c["only_a"]) == 5 and len(c["shared"]) + len(c["only_b"]) == 5
    assert set(c["shared"]) | set(c["only_a"]) == {e["feature"] for e in item["features"]}
    with pytest.raises(ConfigError, match="needs a QPM model"):
        E.explain([], run, out_dir=tmp_path / "g", class_name="0", device="cpu")

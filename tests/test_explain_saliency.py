"""On ``shapes`` the object masks are exact: a trained QPM's class features must fire on the object, not around it.

The run is trained with the real pipeline (``qpm train``'s ``train_run``: cache -> dense -> select -> finetune) on a
tiny random-init ViT, then :func:`qpmcli.explain.build_prototypes` is run on it as ``qpm train`` does at the end.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from qpmcli import explain as E
from qpmcli import prototypes as P

SHAPES = dict(n_classes=6, per_class=20, test_per_class=8, image_size=112)
ARCH = {"depth": 1, "embed_dim": 96, "num_heads": 3}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from qpmcli.artifact import load_model, read_json
    from qpmcli.cache import TokenCache
    from qpmcli.data import load_dataset
    from qpmcli.settings import QpmSettings
    from qpmcli.train import DENSE_PHASE, FINETUNE_PHASE, TrainRequest, train_run

    tmp = tmp_path_factory.mktemp("shapes-run")
    settings = QpmSettings(cache_dir=tmp / "cache", runs_dir=tmp / "runs", device="cpu", num_workers=0)
    req = TrainRequest(backbone="dinov2-vits14", dataset="shapes", weights="random",
                       backbone_options={"image_size": 112, "arch": ARCH}, dataset_options=SHAPES,
                       selector="topk", n_selected=8, per_class=3, n_features=24, hidden_size=64, n_layers=2,
                       dense=replace(DENSE_PHASE, epochs=6, batch_size=16, lr=5e-3),
                       finetune=replace(FINETUNE_PHASE, epochs=5, batch_size=16), metrics="essential", seed=0)
    run = tmp / "run"
    train_run(req, settings, run_dir=run, progress=False)
    model, info = load_model(run)
    caches = read_json(run / "config.json")["caches"]
    train_cache, test_cache = TokenCache.open(caches["train"]), TokenCache.open(caches["test"])
    train = load_dataset("shapes", split="train", **SHAPES)
    test = load_dataset("shapes", split="test", **SHAPES)
    if not (run / "prototypes" / "prototypes.json").is_file():  # once qpm train builds them itself, keep those
        P.build_prototypes(model, train_cache, train, run, per_feature=6)
    return {"run": run, "model": model, "info": info, "train": train, "test": test, "test_cache": test_cache}


def test_class_feature_saliency_lies_mostly_inside_the_object_mask(trained_run):
    import torch

    model, test, cache = trained_run["model"], trained_run["test"], trained_run["test_cache"]
    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(cache.tokens, dtype=np.float32)))
    w = model.head_weight().numpy()
    pred = out.logits.argmax(1).numpy()
    assert (pred == cache.labels).mean() > 0.4  # 6 classes: chance is 0.17
    inside, area = [], []
    for i in range(len(cache)):
        mask = test[int(cache.indices[i])].mask
        area.append(mask.mean())
        for k in np.flatnonzero(w[pred[i]]):
            inside.append(E.mask_fraction(E.upsample(out.maps[i, k].numpy(), mask.shape), mask))
    inside_mean, area_mean = float(np.nanmean(inside)), float(np.mean(area))
    # the object covers ~13 % of the image; a map that ignored it would put ~13 % of its mass inside
    assert area_mean < 0.2
    assert inside_mean > 0.35 and inside_mean > 2.5 * area_mean, (inside_mean, area_mean)


def test_explaining_a_shapes_image_from_the_trained_run(trained_run, tmp_path):
    test = trained_run["test"]
    path = tmp_path / "img.png"
    test[0].image.save(path)
    s = E.explain([path], trained_run["run"], out_dir=tmp_path / "out", class_name=test.classes[0],
                  compare=test.classes[1], html_report=True, device="cpu")
    item = s["images"][0]
    assert item["class_name"] == test.classes[0] and len(item["features"]) == 3
    with Image.open(item["figure"]) as im:
        assert im.size == (1600, 720)
    c = item["compare"]
    w = trained_run["model"].head_weight().numpy()
    ids = trained_run["info"]["selection"]["features"]
    a, b = set(np.flatnonzero(w[0])), set(np.flatnonzero(w[1]))
    assert c["shared"] == sorted(ids[k] for k in a & b) and c["only_a"] == sorted(ids[k] for k in a - b)
    assert c["only_b"] == sorted(ids[k] for k in b - a)
    protos = json.loads((trained_run["run"] / "prototypes" / "prototypes.json").read_text())
    assert sorted(int(f) for f in protos["features"]) == sorted(ids)
    assert s["global"]["features"] == [ids[k] for k in sorted(a)]
    assert (tmp_path / "out" / "report.html").stat().st_size > 50_000

"""On ``shapes`` the object masks are exact: a trained QPM's class features must fire on the object, not around it.

The run is trained with the real pipeline (``qpm train``'s ``train_run``: cache -> dense -> select -> finetune) on a
tiny random-init ViT, then :func:`qpmcli.explain.build_prototypes` is run on it as ``qpm train`` does at the end.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from qpmcli import evidence as V
from qpmcli import explain as E


@pytest.fixture(scope="module")
def trained(trained_run):
    """The session's trained run (conftest) with its model and model.json loaded."""
    from qpmcli.artifact import load_model

    model, info = load_model(trained_run["run"])
    return {**trained_run, "model": model, "info": info}


def test_class_feature_saliency_lies_mostly_inside_the_object_mask(trained):
    import torch

    model, test, cache = trained["model"], trained["test"], trained["test_cache"]
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
            inside.append(V.mask_fraction(V.upsample(out.maps[i, k].numpy(), mask.shape), mask))
    inside_mean, area_mean = float(np.nanmean(inside)), float(np.mean(area))
    # the object covers ~13 % of the image; a map that ignored it would put ~13 % of its mass inside
    assert area_mean < 0.2
    assert inside_mean > 0.35 and inside_mean > 2.5 * area_mean, (inside_mean, area_mean)


def test_explaining_a_shapes_image_from_the_trained_run(trained, tmp_path):
    test = trained["test"]
    path = tmp_path / "img.png"
    test[0].image.save(path)
    s = E.explain([path], trained["run"], out_dir=tmp_path / "out", class_name=test.classes[0],
                  compare=test.classes[1], html_report=True, device="cpu")
    item = s["images"][0]
    assert item["class_name"] == test.classes[0] and len(item["features"]) == 3
    with Image.open(item["figure"]) as im:
        assert im.size == (1600, 720)
    c = item["compare"]
    w = trained["model"].head_weight().numpy()
    ids = trained["info"]["selection"]["features"]
    a, b = set(np.flatnonzero(w[0])), set(np.flatnonzero(w[1]))
    assert c["shared"] == sorted(ids[k] for k in a & b) and c["only_a"] == sorted(ids[k] for k in a - b)
    assert c["only_b"] == sorted(ids[k] for k in b - a)
    protos = json.loads((trained["run"] / "prototypes" / "prototypes.json").read_text())
    assert sorted(int(f) for f in protos["features"]) == sorted(ids)
    assert s["global"]["features"] == [ids[k] for k in sorted(a)]
    assert (tmp_path / "out" / "report.html").stat().st_size > 50_000

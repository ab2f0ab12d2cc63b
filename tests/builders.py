"""The runs that tests build, in one place (the session-scoped fixtures of ``conftest.py`` build each kind once).

- :func:`make_tiny_run`: a finetuned-looking run written directly (a real ``QPMModel`` with random weights and a valid
  binary W, saved with the info keys ``train.py`` writes) on a tiny random-init backbone: no data, about a second.
- :func:`make_demo_run`: the demo backbone (EfficientNet-Lite0, shipped ImageNet weights) with an adapter trained for
  80 steps through the sparse head on real shapes images, so its predictions have a trained model's margins.
- :func:`build_made_run`: a hand-set W (shared and distinct features known exactly) on a random-init ViT with a real
  token cache and real prototypes, plus two test images.
- :func:`train_shapes_run`: the real pipeline (``train.train_run``: cache -> dense -> select -> finetune -> evaluate
  -> prototypes) on ``shapes`` with a tiny random-init ViT, exported to ONNX.

Nothing here is a fixture: ``conftest.py`` owns the fixtures, tests that need a variant call a builder themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# -------------------------------------------------------------------------------------------------- tiny runs
TINY = {"image_size": 56, "arch": {"depth": 2}}  # a 2-block ViT-S/14 at 56 x 56: a 4 x 4 token grid
CLASS_NAMES = ["circle", "square", "triangle", "star", "ring"]
FEATURES = [1, 3, 4, 7, 9, 12]
# 5 classes x 6 selected features, 3 per class, pairwise different (a valid QPM assignment)
W = np.array([[1, 1, 1, 0, 0, 0],
              [0, 1, 1, 1, 0, 0],
              [0, 0, 1, 1, 1, 0],
              [1, 0, 0, 0, 1, 1],
              [0, 1, 0, 1, 0, 1]], dtype=np.float32)


def make_tiny_run(run_dir: Path, backbone: str = "dinov2-vits14-reg", options: dict | None = None, *,
                  class_names: list[str] | None = None, seed: int = 0, n_features: int = 16, hidden: int = 32,
                  weights: str | None = "random", dataset: str = "shapes", pooling: str = "avg",
                  sparse: bool = True) -> Path:
    """A finetuned-looking run (random weights, "trained" BatchNorm statistics, a valid sparse head): model.json +
    model.safetensors + config.json naming the dataset, the files ``qpm train`` writes for predict/explain/export.
    ``sparse=False`` keeps the dense head (a dense model)."""
    import torch

    from qpmcli import artifact
    from qpmcli.backbone import load_backbone
    from qpmcli.model import QPMModel

    names = list(class_names or CLASS_NAMES)
    options = dict(TINY if options is None else options)
    bb = load_backbone(backbone, weights=weights, device="cpu", **options)
    torch.manual_seed(seed)
    model = QPMModel(bb.embed_dim, len(names), bb.grid, hidden_size=hidden, n_features=n_features,
                     pooling=pooling).eval()
    gen = torch.Generator().manual_seed(seed)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)):
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 0.1)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
    mu = torch.rand(n_features, generator=gen) * 0.2
    sigma = torch.rand(n_features, generator=gen) * 0.2 + 0.05
    if sparse:
        model.set_selection(FEATURES, torch.from_numpy(W[: len(names)]), mu, sigma)
    info = {"class_names": names, "backbone": bb.name, "weights_digest": bb.weights_digest,
            "preprocess": bb.preprocess_config, "image_size": list(bb.image_size), "grid": list(bb.grid),
            "embed_dim": bb.embed_dim, "dataset": dataset, "head": "qpm" if sparse else "dense",
            "backbone_options": options, "seed": seed}
    artifact.save_model(model, run_dir, "final", info=info)
    artifact.atomic_write_json(run_dir / "config.json", {"request": {
        "backbone": backbone, "dataset": dataset, "data_root": None,
        "dataset_options": {"n_classes": len(names), "test_per_class": 4, "image_size": 64}}})
    return run_dir


# -------------------------------------------------------------------------------------------------- demo runs
DEMO_OPTIONS = {"image_size": 128}


def make_demo_run(run_dir: Path, *, outlier: float | None = None, hidden: int = 64, seed: int = 0) -> Path:
    """A small trained run on the demo backbone with its shipped weights: the adapter's BatchNorm statistics and the
    head's mu/sigma come from 40 shapes training images (as training sets them) and the adapter is then trained for
    80 steps through the sparse head, so its predictions have the confident margins of a trained model
    (:func:`make_tiny_run`'s random weights and statistics give near-tied logits).

    ``outlier``: set one weight of the adapter's first layer to this value, for a hidden unit the next layer ignores
    (its column is zero), so the fp32 model does not depend on it. Per-tensor int8 quantization still spends its 255
    levels on that weight and rounds the others to zero -- the classic outlier failure of int8, a real model on
    which int8 genuinely disagrees with fp32.
    """
    import torch

    from qpmcli import artifact
    from qpmcli.backbone import load_backbone
    from qpmcli.data import load_dataset
    from qpmcli.images import preprocess_array
    from qpmcli.model import QPMModel

    data_options = {"n_classes": 5, "per_class": 8, "test_per_class": 20, "image_size": 96}
    bb = load_backbone("efficientnet-lite0", device="cpu", **DEMO_OPTIONS)
    train = load_dataset("shapes", split="train", **data_options)
    x = torch.from_numpy(np.stack([preprocess_array(train[i].image, bb.preprocess_config) for i in range(40)]))
    with torch.inference_mode():
        cls, patches = bb(x)
        tokens = torch.cat([cls[:, None], patches], dim=1)
    tokens = tokens.clone()  # a normal tensor (autograd may save it) outside inference mode
    torch.manual_seed(seed)
    model = QPMModel(bb.embed_dim, len(CLASS_NAMES), bb.grid, hidden_size=hidden, n_features=16)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)):
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the pass below
    with torch.no_grad():
        model.train()(tokens)  # BatchNorm statistics of the training tokens
        feats = model.eval()(tokens).features
    mu, sigma = feats.mean(0), feats.std(0).clamp_min(1e-3)
    model.set_selection(FEATURES, torch.from_numpy(W), mu, sigma)
    labels = torch.tensor([train.label(i) for i in range(40)])
    opt = torch.optim.Adam(model.mlp.parameters(), lr=1e-3)
    model.eval()  # BatchNorm keeps the statistics above
    for _ in range(80):
        loss = torch.nn.functional.cross_entropy(model(tokens).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if outlier is not None:
        first, second = [m for m in model.mlp if isinstance(m, torch.nn.Linear)][:2]
        with torch.no_grad():
            first.weight[0, 0] = outlier
            second.weight[:, 0] = 0.0
    model.eval()
    info = {"class_names": CLASS_NAMES, "backbone": bb.name, "weights_digest": bb.weights_digest,
            "preprocess": bb.preprocess_config, "image_size": list(bb.image_size), "grid": list(bb.grid),
            "embed_dim": bb.embed_dim, "dataset": "shapes", "head": "qpm", "backbone_options": DEMO_OPTIONS,
            "seed": 0}
    artifact.save_model(model, run_dir, "final", info=info)
    artifact.atomic_write_json(run_dir / "config.json", {"request": {
        "backbone": "efficientnet-lite0", "dataset": "shapes", "data_root": None, "dataset_options": data_options}})
    return run_dir


# --------------------------------------------------------------------------------------- a hand-made run + cache
MADE_ARCH = {"depth": 1, "embed_dim": 48, "num_heads": 2}
MADE_IMAGE_SIZE = 112  # 8 x 8 tokens of 14 px
MADE_FEATURE_IDS = [2, 3, 5, 7, 8, 11]  # dense ids of the 6 selected features (n_f = 12)
MADE_W = np.array([[1, 1, 1, 0, 0, 0],  # class 0: features 2, 3, 5
                   [1, 1, 0, 1, 0, 0],  # class 1: features 2, 3, 7  -> vs class 0: shared 2, 3; only 5 / only 7
                   [0, 0, 0, 1, 1, 1],  # class 2: features 7, 8, 11
                   [1, 0, 0, 0, 1, 1]], dtype=np.float32)  # class 3: features 2, 8, 11


def build_made_run(root: Path) -> dict[str, Any]:
    """A run directory loadable by `qpm explain`: random-init adapter, hand-set W, real prototypes from a real token
    cache, and two test images."""
    import torch

    from qpmcli import artifact
    from qpmcli import prototypes as P
    from qpmcli.backbone import load_backbone
    from qpmcli.cache import build_cache
    from qpmcli.data import load_dataset
    from qpmcli.model import QPMModel

    opts = dict(n_classes=4, per_class=4, test_per_class=2, image_size=MADE_IMAGE_SIZE, seed=0)
    train = load_dataset("shapes", split="train", **opts)
    test = load_dataset("shapes", split="test", **opts)
    bb = load_backbone("dinov2-vits14", weights="random", image_size=MADE_IMAGE_SIZE, arch=MADE_ARCH, device="cpu")
    cache = build_cache(bb, train, "train", root / "cache", batch_size=16, num_workers=0, progress=False)
    torch.manual_seed(0)
    model = QPMModel(bb.embed_dim, 4, cache.grid, n_layers=1, n_features=12, head_dropout=0.0).eval()
    with torch.no_grad():
        dense = model(torch.from_numpy(np.asarray(cache.tokens, dtype=np.float32))).features
    mu, sigma = dense.mean(0), dense.std(0, unbiased=False)
    model.set_selection(MADE_FEATURE_IDS, torch.from_numpy(MADE_W), mu, sigma)
    model.eval()
    run = root / "run"
    info = {"class_names": train.classes, "backbone": bb.name, "weights_digest": bb.weights_digest,
            "preprocess": bb.preprocess_config, "image_size": list(bb.image_size), "grid": list(cache.grid),
            "embed_dim": bb.embed_dim, "dataset": "shapes", "head": "qpm",
            "backbone_options": {"arch": MADE_ARCH, "image_size": MADE_IMAGE_SIZE}, "seed": 0}
    artifact.save_model(model, run, "final", info=info)
    summary = P.build_prototypes(model, cache, train, run, per_feature=4)
    images = root / "images"
    images.mkdir()
    paths = []
    for i in range(2):
        p = images / f"test_{i}.png"
        test[i].image.save(p)
        paths.append(p)
    return {"run": run, "images": paths, "folder": images, "classes": train.classes, "model": model,
            "backbone": bb, "prototypes": summary}


# ------------------------------------------------------------------------------------------ the real pipeline
SHAPES = dict(n_classes=6, per_class=20, test_per_class=8, image_size=112)
SHAPES_ARCH = {"depth": 1, "embed_dim": 96, "num_heads": 3}


def train_shapes_run(root: Path, *, export: bool = True, **overrides: Any) -> dict[str, Any]:
    """``qpm train``'s ``train_run`` on ``shapes`` (6 classes, 20 train / 8 test images each, 112 px) with a 1-block
    random-init ViT-S/14 (8 x 8 grid): extract -> dense (6 epochs) -> topk selection (8 features, 3 per class) ->
    finetune (5 epochs) -> evaluate (essential metrics) -> prototypes; then ``<run>/model.onnx`` unless ``export`` is
    false. ``overrides`` replace fields of the ``TrainRequest``. Returns the run, its caches, datasets and settings."""
    from dataclasses import replace

    from qpmcli.artifact import read_json
    from qpmcli.cache import TokenCache
    from qpmcli.data import load_dataset
    from qpmcli.settings import QpmSettings
    from qpmcli.train import DENSE_PHASE, FINETUNE_PHASE, TrainRequest, train_run

    settings = QpmSettings(cache_dir=root / "cache", runs_dir=root / "runs", device="cpu", num_workers=0)
    req = TrainRequest(backbone="dinov2-vits14", dataset="shapes", weights="random",
                       backbone_options={"image_size": 112, "arch": SHAPES_ARCH}, dataset_options=SHAPES,
                       selector="topk", n_selected=8, per_class=3, n_features=24, hidden_size=64, n_layers=2,
                       dense=replace(DENSE_PHASE, epochs=6, batch_size=16, lr=5e-3),
                       finetune=replace(FINETUNE_PHASE, epochs=5, batch_size=16), metrics="essential", seed=0)
    req = replace(req, **overrides)
    run = root / "run"
    train_run(req, settings, run_dir=run, progress=False)
    caches = read_json(run / "config.json")["caches"]
    out: dict[str, Any] = {
        "run": run, "settings": settings, "request": req,
        "train_cache": TokenCache.open(caches["train"]), "test_cache": TokenCache.open(caches["test"]),
        "train": load_dataset("shapes", split="train", **req.dataset_options),
        "test": load_dataset("shapes", split="test", **req.dataset_options),
    }
    if export:
        from qpmcli.export import export_onnx

        out["onnx"] = Path(export_onnx(run, adapter=False, settings=settings)["files"]["full"])
    return out

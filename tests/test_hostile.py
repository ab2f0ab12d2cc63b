"""Hostile inputs, table-driven (issue 19): images, model files, ONNX metadata, npz files, dataset trees, settings,
option values and paths, each given to the real CLI in a subprocess.

Every case must end with exit code 2, exactly one line on stderr, no traceback, and every file that existed before the
command byte-identical afterwards (the whole temporary tree is hashed before and after; new files may appear only
where a case allows it). The expensive things (a tiny run, its ONNX export, a token cache) are built once per module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

TINY = {"image_size": 56, "arch": {"depth": 2}}
CLASS_NAMES = ["circle", "square", "triangle", "star", "ring"]
FEATURES = [1, 3, 4, 7, 9, 12]
# 5 classes x 6 selected features, 3 per class, pairwise different (a valid QPM assignment)
W = np.array([[1, 1, 1, 0, 0, 0],
              [0, 1, 1, 1, 0, 0],
              [0, 0, 1, 1, 1, 0],
              [1, 0, 0, 0, 1, 1],
              [0, 1, 0, 1, 0, 1]], dtype=np.float32)


def make_tiny_run(run_dir: Path, *, class_names: list[str] | None = None, seed: int = 0,
                  backbone: str = "dinov2-vits14-reg", options: dict | None = None, n_features: int = 16,
                  hidden: int = 32, weights: str | None = "random") -> Path:
    """A finetuned-looking run (random weights, a valid sparse head): model.json + model.safetensors + config.json,
    the files ``qpm train`` writes for predict/explain/export."""
    import torch

    from qpmcli import artifact
    from qpmcli.backbone import load_backbone
    from qpmcli.model import QPMModel

    names = list(class_names or CLASS_NAMES)
    options = dict(TINY if options is None else options)
    bb = load_backbone(backbone, weights=weights, device="cpu", **options)
    torch.manual_seed(seed)
    model = QPMModel(bb.embed_dim, len(names), bb.grid, hidden_size=hidden, n_features=n_features).eval()
    gen = torch.Generator().manual_seed(seed)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)):
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 0.1)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
    mu = torch.rand(n_features, generator=gen) * 0.2
    sigma = torch.rand(n_features, generator=gen) * 0.2 + 0.05
    model.set_selection(FEATURES, torch.from_numpy(W[: len(names)]), mu, sigma)
    info = {"class_names": names, "backbone": bb.name, "weights_digest": bb.weights_digest,
            "preprocess": bb.preprocess_config, "image_size": list(bb.image_size), "grid": list(bb.grid),
            "embed_dim": bb.embed_dim, "dataset": "shapes", "head": "qpm", "backbone_options": options, "seed": seed}
    artifact.save_model(model, run_dir, "final", info=info)
    artifact.atomic_write_json(run_dir / "config.json", {"request": {
        "backbone": backbone, "dataset": "shapes", "data_root": None,
        "dataset_options": {"n_classes": len(names), "test_per_class": 4, "image_size": 64}}})
    return run_dir

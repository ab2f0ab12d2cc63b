"""qpm-stripes: one backbone, one dataset and one selector, registered through the ``qpm`` entry-point group.

Written from the hook docstrings only (``qpmcli.hookspecs``): every factory has the documented signature, heavy
imports happen inside the factories.
"""

from __future__ import annotations

from typing import Any

from qpmcli.contracts import BackboneSpec, Dataset, DatasetSpec, Sample, Selection, SelectorSpec
from qpmcli.hookspecs import hookimpl

CALLS: list[dict[str, Any]] = []  # every backbone factory call, as received


# ------------------------------------------------------------------------------------------------------ backbone
def build_tiny_cnn(*, name, weights, preprocess, settings, dataset, amp, width: int = 8):
    """A tiny CNN (one 8x8 strided convolution): its feature map is the token grid."""
    import torch

    from qpmcli.backbone import build_frozen_backbone, resolve_weights

    CALLS.append({"name": name, "weights": weights, "preprocess": preprocess, "dataset": dataset, "amp": amp,
                  "width": width})

    class TinyCNN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, width, kernel_size=8, stride=8)

        def forward_features(self, x):
            return torch.relu(self.conv(x))

    path = resolve_weights(weights, settings, filenames=["tiny_cnn.pth"], source="nowhere (use weights=random)",
                           backbone=name)
    backbone = build_frozen_backbone(name=name, create=TinyCNN, weights_path=path, image_size=(32, 32),
                                     layout="map", preprocess=preprocess, dataset=dataset, amp=amp,
                                     random_digest=f"random-width{width}")
    backbone.info["factory_call"] = {"dataset": dataset, "amp": amp, "width": width}
    return backbone


@hookimpl
def qpm_backbones():
    return [BackboneSpec("stripes-cnn", build_tiny_cnn, "a tiny CNN (third-party example)", embed_dim=8,
                         patch_size=8)]


# ------------------------------------------------------------------------------------------------------- dataset
class Stripes(Dataset):
    """Images of stripes: class ``c`` has stripes of period ``2 + 2c`` pixels, horizontal or vertical at random."""

    name = "stripes"

    def __init__(self, root, split: str, *, n_classes: int = 3, per_class: int = 8) -> None:
        from qpmcli.errors import DatasetError

        if split not in ("train", "test"):
            raise DatasetError(f"stripes has no split {split!r}; use train or test")
        self.split = split
        self.classes = [f"period-{2 + 2 * c}" for c in range(n_classes)]
        self.per_class = per_class if split == "train" else max(2, per_class // 2)
        self.seed = 0 if split == "train" else 1

    def __len__(self) -> int:
        return len(self.classes) * self.per_class

    def label(self, index: int) -> int:
        return index % len(self.classes)

    def __getitem__(self, index: int) -> Sample:
        import numpy as np
        from PIL import Image

        if not 0 <= index < len(self):
            raise IndexError(index)
        c = self.label(index)
        rng = np.random.default_rng(self.seed * 100_003 + index)
        period = 2 + 2 * c
        line = ((np.arange(32) + rng.integers(period)) // (period // 2)) % 2
        img = np.repeat(line[None, :], 32, 0) if rng.random() < 0.5 else np.repeat(line[:, None], 32, 1)
        rgb = (img[..., None] * rng.uniform(120, 255, 3) + rng.normal(0, 8, (32, 32, 3))).clip(0, 255)
        return Sample(image=Image.fromarray(rgb.astype(np.uint8)), label=c)


@hookimpl
def qpm_datasets():
    return [DatasetSpec("stripes", Stripes, "striped images (third-party example)", needs_root=False)]


# ------------------------------------------------------------------------------------------------------ selector
class GreedySelector:
    """The ``n_features`` features most similar to any class; each class takes its ``per_class`` best of them."""

    name = "stripes-greedy"
    iterations = 1

    def select(self, problem, *, n_features=50, per_class=5, time_limit=60.0, seed=0, workers=8, previous=None,
               progress=True) -> Selection:
        import numpy as np

        a = np.asarray(problem.A, dtype=np.float64)
        features = np.sort(np.argsort(-a.max(axis=1), kind="stable")[:n_features])
        weight = np.zeros((a.shape[1], len(features)))
        for c in range(a.shape[1]):
            weight[c, np.argsort(-a[features, c], kind="stable")[:per_class]] = 1.0
        return Selection(features=features, weight=weight, status="FEASIBLE", solver="stripes-greedy",
                         objective=float((a[features].T * weight).sum()))

    def finetune_schedule(self, iteration: int) -> dict[str, Any]:
        return {}


@hookimpl
def qpm_selectors():
    return [SelectorSpec("stripes-greedy", GreedySelector, "greedy selection (third-party example)")]

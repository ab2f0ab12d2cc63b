"""qpm: globally interpretable image classification on frozen vision foundation models (DINO-QPM).

Importing ``qpmcli`` has no side effects and imports no heavy library; the functions below import what they need.

    bb = qpmcli.load_backbone("dinov2-vits14", weights="dinov2_vits14_pretrain.pth", preprocess="official")
    ds = qpmcli.load_dataset("cub200", root="~/data/CUB_200_2011", split="train")
    sel = qpmcli.select(A, R, selector="qpm", n_features=50, per_class=5, time_limit=60, seed=0)
    qpmcli.metrics.sid_at_k(...)
"""

from __future__ import annotations

from typing import Any

__all__ = ["__version__", "load_backbone", "load_dataset", "select", "metrics"]


def load_backbone(name: str, weights: str | None = None, preprocess: str = "official", **kwargs: Any):
    """Build the frozen backbone ``name`` (see ``qpm plugins``); see :func:`qpmcli.backbone.load_backbone`."""
    from qpmcli.backbone import load_backbone as _load

    return _load(name, weights=weights, preprocess=preprocess, **kwargs)


def load_dataset(name: str, root: str | None = None, split: str = "train", **options: Any):
    """Open dataset ``name`` (see ``qpm plugins``); see :func:`qpmcli.data.load_dataset`."""
    from qpmcli.data import load_dataset as _load

    return _load(name, root=root, split=split, **options)


def select(A, R=None, selector: str = "qpm", **kwargs: Any):
    """Select features and assign them to classes; see :func:`qpmcli.selection.select`."""
    from qpmcli.selection import select as _select

    return _select(A, R, selector=selector, **kwargs)


def __getattr__(name: str):
    if name == "__version__":  # read from the installed package's metadata (pyproject.toml), see qpmcli.version
        from qpmcli.version import qpm_version

        return qpm_version()
    if name == "metrics":
        import importlib

        return importlib.import_module("qpmcli.metrics")
    raise AttributeError(f"module 'qpmcli' has no attribute {name!r}")

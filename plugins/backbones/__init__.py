"""Built-in qpm backbones: DINOv2 / DINO v1 / DINOv3 ViTs and ``timm:<model>`` (vit.py), EfficientNet-Lite0
(efficientnet.py). Registering is cheap: factories import torch/timm only when a backbone is built."""

from __future__ import annotations

from qpmcli.hookspecs import hookimpl


@hookimpl
def qpm_backbones() -> list:
    from qpm_plugins.backbones import efficientnet, vit

    return [*vit.specs(), *efficientnet.specs()]

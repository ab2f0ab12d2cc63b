"""ViT backbones built with timm: DINOv2 (plain and 4-register, S/B/L/g), DINO v1, DINOv3 and any ``timm:<model>``.

Official checkpoints are adapted by timm's own ``checkpoint_filter_fn`` (one explicit filter per model family) and then
loaded strictly. The model is built at its checkpoint's native grid (DINOv2: 518² → 37×37) so the filter resamples
nothing, and the position embedding is then resized once to the target grid with the official DINOv2 rule
(:func:`qpmcli.backbone.interpolate_pos_embed`). Heavy imports happen inside the factories.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from qpmcli.contracts import BackboneSpec, PluginOption

# --backbone-option KEY=VALUE, typed for the CLI's one parser (the factory's keyword-only parameters).
BACKBONE_OPTIONS = (PluginOption("image_size", "size", 224, "input size: 224, 224x448 or [224, 448]"),
                    PluginOption("arch", "json", None, 'timm constructor overrides, e.g. {"depth": 1}'))


@dataclass(frozen=True)
class VitInfo:
    timm_name: str
    embed_dim: int
    patch_size: int
    filenames: tuple[str, ...]
    source: str
    hf_repo: str | None
    native_size: int  # the checkpoint's image size (its pos-embed grid * patch size)
    registers: int = 0
    family: str = "dinov2"  # dinov2 | dino | dinov3


_FB = "https://dl.fbaipublicfiles.com"


def _dinov2(size: str, dim: int, reg: bool) -> VitInfo:
    tname = {"s": "small", "b": "base", "l": "large", "g": "giant"}[size]
    suffix = "_reg4" if reg else ""
    fn = f"dinov2_vit{size}14{suffix}_pretrain.pth"
    return VitInfo(f"vit_{tname}_patch14{suffix}_dinov2", dim, 14, (fn,), f"{_FB}/dinov2/dinov2_vit{size}14/{fn}",
                   f"timm/vit_{tname}_patch14{suffix}_dinov2.lvd142m", 518, 4 if reg else 0, "dinov2")


VITS: dict[str, VitInfo] = {}
for _s, _d in (("s", 384), ("b", 768), ("l", 1024), ("g", 1536)):
    VITS[f"dinov2-vit{_s}14"] = _dinov2(_s, _d, False)
    VITS[f"dinov2-vit{_s}14-reg"] = _dinov2(_s, _d, True)
VITS["dino-vits16"] = VitInfo(
    "vit_small_patch16_224", 384, 16, ("dino_deitsmall16_pretrain.pth", "dino_vitsmall16_pretrain.pth"),
    f"{_FB}/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth", "timm/vit_small_patch16_224.dino", 224,
    0, "dino")
VITS["dino-vitb16"] = VitInfo(
    "vit_base_patch16_224", 768, 16, ("dino_vitbase16_pretrain.pth",),
    f"{_FB}/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth", "timm/vit_base_patch16_224.dino", 224, 0, "dino")
for _s, _t, _d, _fn in (("s", "small", 384, "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"),
                        ("b", "base", 768, "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"),
                        ("l", "large", 1024, "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth")):
    VITS[f"dinov3-vit{_s}16"] = VitInfo(
        f"vit_{_t}_patch16_dinov3", _d, 16, (_fn,),
        "https://ai.meta.com/dinov3/ (gated download; place the file in the weights folder)",
        f"timm/vit_{_t}_patch16_dinov3.lvd1689m", 224, 4, "dinov3")


def _arch_digest(arch: dict[str, Any] | None) -> str:
    return "" if not arch else "-" + hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:8]


def _pos_rule(info: VitInfo, preprocess: str) -> tuple[float, bool]:
    """(offset, antialias) of the position-embedding resize.

    Official DINOv2 hub: plain models offset 0.1 without antialias, register models offset 0 with antialias. The
    reference code builds every variant with offset 0.1 and no antialias; DINO v1 uses offset 0.1, no antialias.
    """
    if preprocess == "reference" or info.registers == 0:
        return 0.1, False
    return 0.0, True


def _resize_vit_pos_embed(model: Any, size: tuple[int, int], patch: int, offset: float, antialias: bool) -> None:
    """Set a timm VisionTransformer to ``size`` and resize its pos-embed once with the official rule."""
    import torch

    from qpmcli.backbone import interpolate_pos_embed

    grid = (size[0] // patch, size[1] // patch)
    if tuple(model.patch_embed.grid_size) == grid:
        return
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    old = model.pos_embed.data
    new_patch = interpolate_pos_embed(old[:, prefix:], grid, offset=offset, antialias=antialias)
    new = torch.cat([old[:, :prefix], new_patch], dim=1)
    model.set_input_size(img_size=size)
    model.pos_embed = torch.nn.Parameter(new, requires_grad=False)


def find_weights(name: str, settings: Any, weights: Any = None):
    """The weights file of ViT ``name`` (``weights``, else the official file names in ``weights_dir``, else local
    timm/Hugging Face caches); a :class:`WeightsError` says what is missing where."""
    from qpmcli.backbone import resolve_weights

    info = VITS[name]
    return resolve_weights(weights, settings, filenames=list(info.filenames), source=info.source,
                           hf_repo=info.hf_repo, backbone=name)


def build_vit(*, name: str, weights: Any = None, preprocess: str = "official", settings: Any = None,
              dataset: str | None = None, amp: bool = False, image_size: Any = None,
              arch: dict[str, Any] | None = None):
    """Factory for the named DINO-family ViTs (see :data:`VITS`): built at the checkpoint's native grid, adapted by
    timm's ``checkpoint_filter_fn`` of the family, then the position embedding resized once to the target grid."""
    import timm

    from qpmcli.backbone import IMAGENET_MEAN, IMAGENET_STD, build_frozen_backbone, parse_image_size
    from qpmcli.errors import ConfigError, WeightsError

    info = VITS[name]
    size = parse_image_size(image_size)
    if size[0] % info.patch_size or size[1] % info.patch_size:
        raise ConfigError(f"image size {size} is not a multiple of {name}'s patch size {info.patch_size}")
    path = find_weights(name, settings, weights)
    if not timm.is_model(info.timm_name):
        raise WeightsError(f"backbone {name} needs timm model {info.timm_name}, which timm {timm.__version__} lacks; "
                           f"upgrade timm")
    dinov3 = info.family == "dinov3"
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, **(arch or {}),
                              "img_size": size if dinov3 else info.native_size}
    if dinov3:
        from timm.models.eva import checkpoint_filter_fn
    else:
        from timm.models.vision_transformer import checkpoint_filter_fn
    offset, antialias = _pos_rule(info, preprocess)

    def adapt(model: Any) -> dict[str, Any] | None:
        if dinov3:
            return None
        _resize_vit_pos_embed(model, size, info.patch_size, offset, antialias)
        return {"pos_embed": {"offset": offset, "antialias": antialias}}

    return build_frozen_backbone(
        name=name, create=lambda: timm.create_model(info.timm_name, **kwargs), weights_path=path, image_size=size,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, checkpoint_filter=checkpoint_filter_fn, adapt=adapt,
        preprocess=preprocess, dataset=dataset, amp=amp, random_digest="random" + _arch_digest(arch),
        grid=(size[0] // info.patch_size, size[1] // info.patch_size),
        info={"timm_model": info.timm_name, "registers": info.registers, "arch": arch or {}})


def build_timm(*, name: str, weights: Any = None, preprocess: str = "official", settings: Any = None,
               dataset: str | None = None, amp: bool = False, image_size: Any = None,
               arch: dict[str, Any] | None = None):
    """Factory for ``timm:<model>``: a transformer gives (CLS, patch tokens); a CNN gives (mean, feature-map cells)."""
    import timm

    from qpmcli.backbone import build_frozen_backbone, find_in_local_caches, parse_image_size, resolve_weights
    from qpmcli.errors import PluginError, WeightsError

    model_name = name.split(":", 1)[1]
    if not model_name or not timm.is_model(model_name):
        raise PluginError(f"unknown timm model {model_name!r}; list them with python -c \"import timm; "
                          f"print(timm.list_models('*vit*'))\"")
    cfg = timm.get_pretrained_cfg(model_name)
    cfg_dict = cfg.to_dict() if cfg is not None else {}
    size = parse_image_size(image_size, int(cfg_dict.get("input_size", (3, 224, 224))[-1]))
    if weights is None:
        # No file given: only a local Hugging Face cache counts (offline; never download).
        hf = cfg_dict.get("hf_hub_id")
        path = find_in_local_caches([], hf) if hf else None
        if path is None:
            where = f"https://huggingface.co/{hf}" if hf else "the model's upstream page"
            raise WeightsError(f"no weights for backbone {name}: pass --weights FILE (a timm state dict) or put "
                               f"{model_name} in the Hugging Face cache; download from {where}")
    else:
        path = resolve_weights(weights, settings, filenames=[], source="timm", backbone=name)

    def checkpoint_filter(state: dict[str, Any], model: Any) -> dict[str, Any]:
        """The model module's own ``checkpoint_filter_fn`` (if any), then no classifier keys the model lacks."""
        mod = __import__(type(model).__module__, fromlist=["checkpoint_filter_fn"])
        filt = getattr(mod, "checkpoint_filter_fn", None)
        if filt is not None:
            state = filt(state, model)
        return {k: v for k, v in state.items() if not k.startswith(("head.", "fc.", "classifier."))
                or k in model.state_dict()}

    def adapt(model: Any) -> None:
        if hasattr(model, "set_input_size") and hasattr(model, "patch_embed"):
            model.set_input_size(img_size=size)

    kwargs: dict[str, Any] = {"num_classes": 0, **(arch or {})}
    return build_frozen_backbone(
        name=name, create=lambda: timm.create_model(model_name.split(".")[0], pretrained=False, **kwargs),
        weights_path=path, image_size=size,
        mean=cfg_dict.get("mean", (0.485, 0.456, 0.406)), std=cfg_dict.get("std", (0.229, 0.224, 0.225)),
        layout="auto", checkpoint_filter=checkpoint_filter, adapt=adapt, preprocess=preprocess, dataset=dataset,
        amp=amp, random_digest="random" + _arch_digest(arch), info={"timm_model": model_name, "arch": arch or {}})


def specs() -> list[BackboneSpec]:
    """Backbone specs of this module (cheap: no torch/timm import)."""
    out = []
    for name, info in VITS.items():
        kind = {"dinov2": "DINOv2", "dino": "DINO v1", "dinov3": "DINOv3"}[info.family]
        reg = " + 4 registers" if info.registers and info.family == "dinov2" else ""
        out.append(BackboneSpec(
            name=name, factory=build_vit, description=f"{kind} {info.timm_name}{reg} (timm)",
            embed_dim=info.embed_dim, patch_size=info.patch_size, weights_filename=info.filenames[0],
            weights_source=info.source, options=BACKBONE_OPTIONS, find_weights=functools.partial(find_weights, name)))
    out.append(BackboneSpec(name="timm:", factory=build_timm,
                            description="any timm model: timm:<model name> (weights via --weights or the HF cache)",
                            options=BACKBONE_OPTIONS, prefix=True))
    return out

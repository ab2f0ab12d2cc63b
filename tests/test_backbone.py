"""Backbones: official DINOv2 checkpoints load strictly, tokens are laid out right, preprocessing handles odd images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qpmcli.backbone import interpolate_pos_embed, load_backbone
from qpmcli.errors import WeightsError
from qpmcli.settings import QpmSettings

D, HEADS = 384, 6  # ViT-S/14


@pytest.fixture
def settings(tmp_path: Path) -> QpmSettings:
    return QpmSettings(device="cpu", weights_dir=tmp_path / "weights", cache_dir=tmp_path / "cache", num_workers=0)


def official_dinov2_state(depth: int, *, dim: int = D, registers: int = 0, swiglu: bool = False,
                          seed: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint in the official DINOv2 format (key names/shapes of dinov2_vit*14[_reg4]_pretrain.pth)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.02):
        return torch.randn(*shape, generator=g) * scale

    sd = {"cls_token": r(1, 1, dim, scale=1.0), "pos_embed": r(1, 1370, dim, scale=1.0), "mask_token": r(1, dim),
          "patch_embed.proj.weight": r(dim, 3, 14, 14), "patch_embed.proj.bias": r(dim),
          "norm.weight": 1 + r(dim), "norm.bias": r(dim)}
    if registers:
        sd["register_tokens"] = r(1, registers, dim, scale=1.0)
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(dim), p + "norm1.bias": r(dim),
                   p + "attn.qkv.weight": r(3 * dim, dim), p + "attn.qkv.bias": r(3 * dim),
                   p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
                   p + "ls1.gamma": 1 + r(dim), p + "norm2.weight": 1 + r(dim), p + "norm2.bias": r(dim),
                   p + "ls2.gamma": 1 + r(dim)})
        if swiglu:
            hidden = (int(dim * 4 * 2 / 3) + 7) // 8 * 8
            sd.update({p + "mlp.w12.weight": r(2 * hidden, dim), p + "mlp.w12.bias": r(2 * hidden),
                       p + "mlp.w3.weight": r(dim, hidden), p + "mlp.w3.bias": r(dim)})
        else:
            sd.update({p + "mlp.fc1.weight": r(4 * dim, dim), p + "mlp.fc1.bias": r(4 * dim),
                       p + "mlp.fc2.weight": r(dim, 4 * dim), p + "mlp.fc2.bias": r(dim)})
    return sd


def official_pos_resize(pos_embed: torch.Tensor, h: int, w: int, *, offset: float, antialias: bool) -> torch.Tensor:
    """DinoVisionTransformer.interpolate_pos_encoding, written out as in facebookresearch/dinov2 (patch part only)."""
    patch_pos = pos_embed[:, 1:].float()
    n = patch_pos.shape[1]
    m = int(math.sqrt(n))
    w0, h0 = h // 14, w // 14  # the official code names dim 2 "w"
    kwargs = {"scale_factor": ((w0 + offset) / m, (h0 + offset) / m)} if offset else {"size": (w0, h0)}
    out = torch.nn.functional.interpolate(patch_pos.reshape(1, m, m, -1).permute(0, 3, 1, 2), mode="bicubic",
                                          antialias=antialias, **kwargs)
    return out.permute(0, 2, 3, 1).reshape(1, -1, patch_pos.shape[-1])


def official_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, depth: int, pos: torch.Tensor,
                     registers: int = 0) -> torch.Tensor:
    """The official DINOv2 forward (prepare_tokens_with_masks + blocks + norm), written out from its definition."""
    f = torch.nn.functional
    t = f.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], 1)
    t = t + torch.cat([sd["pos_embed"][:, :1], pos], 1)
    if registers:
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(len(x), -1, -1), t[:, 1:]], 1)
    for i in range(depth):
        p = f"blocks.{i}."
        y = f.layer_norm(t, (D,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        b, n, _ = y.shape
        qkv = f.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(b, n, 3, HEADS, D // HEADS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) / math.sqrt(D // HEADS)).softmax(-1) @ v
        a = f.linear(a.transpose(1, 2).reshape(b, n, D), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        t = t + sd[p + "ls1.gamma"] * a
        y = f.layer_norm(t, (D,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        y = f.linear(f.gelu(f.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"],
                     sd[p + "mlp.fc2.bias"])
        t = t + sd[p + "ls2.gamma"] * y
    return f.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)


@pytest.mark.parametrize("name,registers,offset,antialias", [
    ("dinov2-vits14", 0, 0.1, False), ("dinov2-vits14-reg", 4, 0.0, True)])
def test_official_checkpoint_loads_strictly_and_matches_official_forward(
        tmp_path, settings, name, registers, offset, antialias):
    sd = official_dinov2_state(2, registers=registers)
    path = tmp_path / "ckpt.pth"
    torch.save(sd, path)
    bb = load_backbone(name, weights=str(path), settings=settings, arch={"depth": 2})
    assert bb.grid == (16, 16) and bb.embed_dim == D and bb.patch_size == 14
    assert bb.preprocess_config["pos_embed"] == {"offset": offset, "antialias": antialias}
    assert bb.weights_digest == __import__("hashlib").sha256(path.read_bytes()).hexdigest()[:16]
    assert not any(p.requires_grad for p in bb.parameters()) and not bb.model.training
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    cls, patches = bb(x)
    assert cls.shape == (2, D) and patches.shape == (2, 256, D) and not cls.requires_grad
    pos = official_pos_resize(sd["pos_embed"], 224, 224, offset=offset, antialias=antialias)
    ref = official_forward(sd, x, 2, pos, registers)
    torch.testing.assert_close(cls, ref[:, 0], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(patches, ref[:, 1 + registers:], atol=2e-4, rtol=1e-4)


def test_pos_embed_resize_matches_official_formula():
    pos = torch.randn(1, 1370, 32, generator=torch.Generator().manual_seed(0))
    for offset, antialias in ((0.1, False), (0.0, True)):
        for h, w in ((224, 224), (448, 224)):
            got = interpolate_pos_embed(pos[:, 1:], (h // 14, w // 14), offset=offset, antialias=antialias)
            want = official_pos_resize(pos, h, w, offset=offset, antialias=antialias)
            assert got.shape == (1, (h // 14) * (w // 14), 32)
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    # the offset rule really differs from a plain size= resize (it is not a no-op choice)
    a = interpolate_pos_embed(pos[:, 1:], (16, 16), offset=0.1, antialias=False)
    b = interpolate_pos_embed(pos[:, 1:], (16, 16), offset=0.0, antialias=False)
    assert (a - b).abs().max() > 1e-3


def test_reference_mode_uses_offset_without_antialias_for_register_models_and_minmax(settings):
    bb = load_backbone("dinov2-vits14-reg", weights="random", preprocess="reference", settings=settings,
                       arch={"depth": 1}, dataset="cub200")
    cfg = bb.preprocess_config
    assert cfg["pos_embed"] == {"offset": 0.1, "antialias": False}
    assert cfg["minmax"] is True and cfg["mean"] == [0.4853, 0.4964, 0.4295]
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    x = bb.preprocess(img)
    assert x.shape == (3, 224, 224) and float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_vitg_swiglu_official_checkpoint_loads(tmp_path, settings):
    sd = official_dinov2_state(1, dim=1536, swiglu=True)
    path = tmp_path / "dinov2_vitg14_pretrain.pth"
    torch.save(sd, path)
    bb = load_backbone("dinov2-vitg14", weights=str(path), settings=settings, arch={"depth": 1}, image_size=56)
    torch.testing.assert_close(bb.model.blocks[0].mlp.fc1.weight, sd["blocks.0.mlp.w12.weight"])
    torch.testing.assert_close(bb.model.blocks[0].mlp.fc2.weight, sd["blocks.0.mlp.w3.weight"])
    cls, patches = bb(torch.zeros(1, 3, 56, 56))
    assert cls.shape == (1, 1536) and patches.shape == (1, 16, 1536)


def test_weights_found_in_weights_dir_by_official_name(settings):
    settings.weights_dir.mkdir(parents=True)
    torch.save(official_dinov2_state(1), settings.weights_dir / "dinov2_vits14_pretrain.pth")
    bb = load_backbone("dinov2-vits14", settings=settings, arch={"depth": 1})
    assert bb.weights_path == str(settings.weights_dir / "dinov2_vits14_pretrain.pth")


def test_missing_weights_names_expected_path_and_source(settings, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError) as err:
        load_backbone("dinov2-vitb14-reg", settings=settings)
    msg = str(err.value)
    assert str(settings.weights_dir / "dinov2_vitb14_reg4_pretrain.pth") in msg
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth" in msg
    with pytest.raises(WeightsError, match="does not exist"):
        load_backbone("dinov2-vits14", weights=str(tmp_path / "nope.pth"), settings=settings)


def test_pickled_code_and_wrong_checkpoints_are_refused(tmp_path, settings):
    bad = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1), "obj": Path("x")}, bad)  # an arbitrary class: weights_only refuses
    with pytest.raises(WeightsError, match="cannot read"):
        load_backbone("dinov2-vits14", weights=str(bad), settings=settings, arch={"depth": 1})
    wrong = tmp_path / "wrong.pth"
    torch.save(official_dinov2_state(2), wrong)  # 2 blocks into a 1-block model: strict load fails
    with pytest.raises(WeightsError, match="does not fit"):
        load_backbone("dinov2-vits14", weights=str(wrong), settings=settings, arch={"depth": 1})


def test_token_layout_of_other_families(settings):
    for name, grid, dim in (("dino-vits16", (14, 14), 384), ("dinov3-vits16", (14, 14), 384),
                            ("timm:resnet18", (7, 7), 512)):
        arch = {"depth": 1} if not name.startswith("timm:") else None
        bb = load_backbone(name, weights="random", settings=settings, arch=arch)
        cls, patches = bb(torch.randn(1, 3, 224, 224))
        assert bb.grid == grid and cls.shape == (1, dim) and patches.shape == (1, grid[0] * grid[1], dim), name
        if name.startswith("timm:"):  # CNN: CLS is the global average of the map
            torch.testing.assert_close(cls, patches.mean(1))


def test_efficientnet_lite0_shipped_weights_classify_a_real_photo(settings):
    from sklearn.datasets import load_sample_image

    bb = load_backbone("efficientnet-lite0", settings=settings)
    assert bb.grid == (7, 7) and bb.embed_dim == 1280 and bb.weights_digest != "random"
    x = bb.preprocess(Image.fromarray(load_sample_image("flower.jpg")))[None]
    cls, patches = bb(x)
    torch.testing.assert_close(cls, patches.mean(1))
    with torch.no_grad():
        logits = bb.model._fc(cls)  # the shipped ImageNet classifier on our CLS token
    assert int(logits.argmax()) == 985  # ImageNet "daisy"


def _odd_images(tmp_path: Path) -> dict[str, Path]:
    rgb = np.zeros((40, 80, 3), np.uint8)
    rgb[:, :40] = (255, 0, 0)  # left half red, right half blue
    rgb[:, 40:] = (0, 0, 255)
    out = {}
    out["gray"] = tmp_path / "g.png"
    Image.fromarray(rgb[..., 0]).save(out["gray"])
    out["palette"] = tmp_path / "p.png"
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(out["palette"], transparency=0)
    out["cmyk"] = tmp_path / "c.jpg"
    Image.fromarray(rgb).convert("CMYK").save(out["cmyk"])
    out["rgba"] = tmp_path / "a.png"
    Image.fromarray(np.dstack([rgb, np.full((40, 80), 128, np.uint8)])).save(out["rgba"])
    out["i16"] = tmp_path / "i16.png"
    Image.fromarray((np.arange(40 * 80).reshape(40, 80) * 16).astype(np.uint16)).save(out["i16"])
    out["exif"] = tmp_path / "e.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display: left (red) half ends up on top
    Image.fromarray(rgb).save(out["exif"], exif=exif, quality=95)
    return out


def test_preprocess_handles_odd_image_modes_and_exif_rotation(tmp_path, settings):
    from qpmcli.images import open_image

    bb = load_backbone("dinov2-vits14", weights="random", settings=settings, arch={"depth": 1})
    for kind, path in _odd_images(tmp_path).items():
        x = bb.preprocess(open_image(path))
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and torch.isfinite(x).all(), kind
    x = bb.preprocess(open_image(tmp_path / "e.jpg"))
    mean = torch.tensor(bb.preprocess_config["mean"])[:, None, None]
    std = torch.tensor(bb.preprocess_config["std"])[:, None, None]
    img = x * std + mean
    top, bottom = img[:, :100].mean((1, 2)), img[:, 124:].mean((1, 2))
    assert top[0] > 0.8 and top[2] < 0.2 and bottom[2] > 0.8 and bottom[0] < 0.2  # red on top after EXIF rotation


def test_weights_fall_back_to_local_hugging_face_cache_without_download(settings, monkeypatch, tmp_path):
    import timm
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    snap = tmp_path / "hf" / "hub" / "models--timm--vit_small_patch14_dinov2.lvd142m" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    src = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518, depth=1)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(snap / "model.safetensors"))
    bb = load_backbone("dinov2-vits14", settings=settings, arch={"depth": 1})
    assert bb.weights_path == str(snap / "model.safetensors")
    torch.testing.assert_close(bb.model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)

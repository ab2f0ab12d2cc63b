"""ONNX export of a trained run (``qpm export RUN --onnx``) and its verification against PyTorch.

Two graphs are written, both with a dynamic batch axis and the outputs ``logits [B, C]``, ``maps [B, K, h, w]``
(selected feature maps) and ``features [B, K]``:

- ``model.onnx``: the whole classifier, input ``image [B, 3, H, W]`` (preprocessed, at the run's fixed image size).
  The backbone's position embedding was resized once when the backbone was built (``qpmcli.backbone``), so the graph
  holds a constant of the final size and contains no runtime interpolation (the DINOv2-with-registers export failure
  came from exporting that bicubic/antialiased resize);
- ``model.adapter.onnx``: the adapter + head only, input ``tokens [B, 1 + h*w, D]`` (CLS first), for users who extract
  tokens elsewhere.

Both carry ``metadata_props`` (``qpm.<field>`` -> JSON): format, graph, class names, selected features, W, mu, sigma,
bias, preprocessing, backbone name and weights digest, image size, grid, qpm version; and, when the run has
``prototypes/``, the explain helper's prototypes under ``qpm_prototypes``. ``qpmcli.predict.load_classifier`` reads
them back, so an ONNX file alone is enough to predict and explain. ``--fp16`` adds ``model.fp16.onnx`` (and its
adapter twin) converted with float32 inputs/outputs kept.

This module imports torch; the CLI imports it only inside ``qpm export``.

Verification runs ONNX Runtime and PyTorch on the same preprocessed check images and compares logits (max abs
difference <= 1e-4 for fp32, <= 1e-2 for fp16, 100 % top-1 agreement); a failed check removes the files and raises.
"""

from __future__ import annotations

import copy
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qpmcli.errors import ArtifactError, ConfigError, ImageError
from qpmcli.model import SIGMA_MIN, ModelOutput, pool_tokens
from qpmcli.predict import META_PREFIX, PROTOTYPES_KEY, ClassifierMetadata

MAX_PROTOTYPE_BYTES = 8 << 20  # keep the metadata small: larger prototype sets are not embedded (a warning says so)
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
OUTPUT_NAMES = ["logits", "maps", "features"]
DEFAULT_OPSET = 17
N_CHECK = 16


def export_onnx(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    fp16: bool = False,
    verify: bool = False,
    adapter: bool = True,
    prune: bool = True,
    weights: str | None = None,
    settings: Any = None,
    opset: int = DEFAULT_OPSET,
    check_images: Sequence[str | os.PathLike[str]] | None = None,
    n_check: int = N_CHECK,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export the run's final model to ONNX (see the module docstring); returns a JSON-able report.

    ``out``: the full graph's path (default ``<run>/model.onnx``); the adapter graph goes next to it as
    ``<stem>.adapter.onnx`` and the fp16 variants as ``<stem>.fp16.onnx`` / ``<stem>.fp16.adapter.onnx``.
    ``weights``: the backbone weights file (default: looked up like in training; random-weight runs rebuild theirs);
    its digest must equal the run's. ``check_images``: files/folders for ``verify`` (default: the run's test split,
    else deterministic synthetic images). ``device`` is the ONNX Runtime device used by the check. ``prune``: export
    :class:`SelectedFeaturesModel` (the last adapter layer cut to the selected features; same outputs, less work).
    """
    from qpmcli.artifact import load_model
    from qpmcli.predict import load_run_backbone, metadata_from_run

    say = log or (lambda _m: None)
    run = Path(run_dir).expanduser()
    if settings is None:
        from qpmcli.settings import resolve_settings

        settings, _ = resolve_settings()
    model, info = load_model(run, "final", device="cpu")
    meta = metadata_from_run(model, info)
    backbone = load_run_backbone(info, weights=weights, settings=settings, device="cpu")
    out_path = Path(out).expanduser() if out is not None else run / "model.onnx"
    if out_path.suffix.lower() != ".onnx":
        raise ConfigError(f"--out must end in .onnx, not {out_path.name}")
    prototypes = read_prototypes(run, log=say)

    full = FullGraph(backbone, model).eval()  # the PyTorch reference for --verify
    exported = graph_model(model, prune)
    graph_full = FullGraph(backbone, exported).eval()
    tokens_dim = backbone.embed_dim
    h, w = meta.grid
    image = torch.zeros(2, 3, *meta.image_size)
    tokens = torch.zeros(2, 1 + h * w, tokens_dim)
    written: list[Path] = []
    report: dict[str, Any] = {"run": str(run), "backbone": meta.backbone, "weights_digest": meta.weights_digest,
                              "image_size": list(meta.image_size), "grid": list(meta.grid),
                              "classes": meta.n_classes, "features": meta.n_features, "files": {},
                              "prototypes_embedded": prototypes is not None,
                              "pruned_to_selection": exported is not model}
    try:
        t0 = time.perf_counter()
        say(f"exporting the full graph to {out_path}")
        _export(graph_full, image, "image", out_path, meta, "full", opset, prototypes)
        written.append(out_path)
        report["files"]["full"] = str(out_path)
        adapter_path = out_path.with_name(out_path.stem + ".adapter.onnx")
        if adapter:
            say(f"exporting the adapter graph to {adapter_path}")
            _export(AdapterGraph(exported).eval(), tokens, "tokens", adapter_path, meta, "adapter", opset, prototypes)
            written.append(adapter_path)
            report["files"]["adapter"] = str(adapter_path)
        if fp16:
            for kind, src in [("full", out_path)] + ([("adapter", adapter_path)] if adapter else []):
                dst = src.with_name(src.name.replace(".onnx", "").replace(".adapter", "") + ".fp16"
                                    + (".adapter" if kind == "adapter" else "") + ".onnx")
                say(f"converting to fp16: {dst}")
                convert_fp16(src, dst)
                written.append(dst)
                report["files"][f"{kind}_fp16"] = str(dst)
        report["export_seconds"] = round(time.perf_counter() - t0, 2)
        for p in written:
            report.setdefault("sizes_mb", {})[p.name] = round(p.stat().st_size / 2**20, 2)
        if verify:
            x, source = check_batch(meta, run, check_images, n_check)
            report["check_set"] = source
            report["verify"] = {}
            ref = full.reference(x)
            for precision, key in [("fp32", "full")] + ([("fp16", "full_fp16")] if fp16 else []):
                res = compare(ref, Path(report["files"][key]), x, precision, device)
                report["verify"][precision] = res
                say(f"verify {precision}: max |logit diff| {res['max_abs_diff']['logits']:.3g}, top-1 agreement "
                    f"{100 * res['top1_agreement']:.1f}% on {res['n']} images ({res['provider']})")
            if adapter:
                tok = full.tokens(x)
                res = compare(ref, adapter_path, tok, "fp32", device)
                report["verify"]["adapter_fp32"] = res
            failed = [k for k, v in report["verify"].items() if not v["passed"]]
            if failed:
                detail = "; ".join(f"{k}: max |logit diff| {report['verify'][k]['max_abs_diff']['logits']:.3g} "
                                   f"(limit {report['verify'][k]['tolerance']}), top-1 "
                                   f"{100 * report['verify'][k]['top1_agreement']:.1f}%" for k in failed)
                raise ArtifactError(f"ONNX verification failed ({detail}); the exported files were removed")
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    report["verified"] = bool(verify)
    return report


# --------------------------------------------------------------------------------------------------- the graphs
class FullGraph(nn.Module):
    """Preprocessed image -> (logits, maps, features): backbone tokens (CLS first) into the QPM model."""

    def __init__(self, backbone: Any, model: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.model = model

    def tokens(self, image: Any) -> Any:
        """Backbone tokens ``[B, 1 + h*w, D]``; accepts a tensor or a numpy batch (then returns numpy)."""
        if not isinstance(image, torch.Tensor):
            with torch.inference_mode():
                return self.tokens(torch.from_numpy(image)).numpy()
        with torch.no_grad():
            cls, patches = self.backbone._features(image)  # no autocast: the graph is exported in float32
            return torch.cat([cls[:, None], patches], dim=1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model(self.tokens(image))
        return out.logits, out.maps, out.features

    def reference(self, x: Any) -> dict[str, Any]:
        """PyTorch outputs on a numpy batch, as numpy."""
        with torch.inference_mode():
            logits, maps, feats = self(torch.from_numpy(x))
        return {"logits": logits.numpy(), "maps": maps.numpy(), "features": feats.numpy()}


class AdapterGraph(nn.Module):
    """Tokens ``[B, 1 + h*w, D]`` (CLS first) -> (logits, maps, features)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model(tokens)
        return out.logits, out.maps, out.features


class SelectedFeaturesModel(nn.Module):
    """The sparse model with its last adapter layer cut to the selected features: an export-time optimisation.

    BatchNorm and the activation act per channel, so computing only the K selected output channels of the last
    Linear gives exactly ``F[:, sel]``; the other n_f - K channels (462 of 512 by default) are never used by a
    QPM model. With patch-only pooling (avg/max) the CLS token is not run through the MLP either. Outputs equal
    :class:`qpmcli.model.QPMModel`'s (checked by ``--verify`` against the unpruned model).
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        layers = list(model.mlp)
        last = max(i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear))
        sel = model.sel_index.cpu()
        old = layers[last]
        lin = nn.Linear(old.in_features, int(sel.numel()))
        with torch.no_grad():
            lin.weight.copy_(old.weight[sel])
            lin.bias.copy_(old.bias[sel])
        tail: list[nn.Module] = []
        for layer in layers[last + 1:]:
            if isinstance(layer, nn.BatchNorm1d):
                bn = copy.deepcopy(layer)
                bn.num_features = int(sel.numel())
                with torch.no_grad():
                    for name in ("weight", "bias"):
                        setattr(bn, name, nn.Parameter(getattr(layer, name)[sel].clone(), requires_grad=False))
                    for name in ("running_mean", "running_var"):
                        setattr(bn, name, getattr(layer, name)[sel].clone())
                tail.append(bn)
            else:  # an elementwise activation
                tail.append(copy.deepcopy(layer))
        self.mlp = nn.Sequential(*[copy.deepcopy(m) for m in layers[:last]], lin, *tail).eval()
        self.grid = model.grid
        self.pooling = model.pooling
        self.register_buffer("mu", model.sel_mu.detach().clone())
        self.register_buffer("sigma", model.sel_sigma.detach().clone())
        self.register_buffer("weight", model.sel_weight.detach().clone())
        bias = getattr(model, "sel_bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @staticmethod
    def applies_to(model: Any) -> bool:
        """Only sparse models with an MLP whose layers after the last Linear act per channel."""
        if not getattr(model, "is_sparse", False) or not isinstance(model.mlp, nn.Sequential):
            return False
        layers = list(model.mlp)
        linears = [i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear)]
        if not linears:
            return False
        elementwise = (nn.BatchNorm1d, nn.ReLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.Identity)
        return all(isinstance(layer, elementwise) for layer in layers[linears[-1] + 1:])

    def forward(self, tokens: torch.Tensor) -> ModelOutput:
        b = tokens.shape[0]
        h, w = self.grid
        patch_only = self.pooling in ("avg", "max")
        z = self.mlp(tokens[:, 1:] if patch_only else tokens)
        patches = z if patch_only else z[:, 1:]
        maps = patches.transpose(1, 2).reshape(b, patches.shape[-1], h, w)
        f = pool_tokens(patches, None if patch_only else z[:, 0], self.pooling)
        x = (f - self.mu) / self.sigma.clamp_min(SIGMA_MIN)
        return ModelOutput(nn.functional.linear(x, self.weight, self.bias), maps, f)


def graph_model(model: Any, prune: bool = True) -> Any:
    """The module to export: :class:`SelectedFeaturesModel` where it applies (and ``prune``), else ``model``."""
    return SelectedFeaturesModel(model).eval() if prune and SelectedFeaturesModel.applies_to(model) else model


def _export(module: Any, example: Any, input_name: str, path: Path, meta: ClassifierMetadata, graph: str,
            opset: int, prototypes: dict[str, Any] | None) -> None:
    """torch.onnx.export (TorchScript path; the dynamo exporter as fallback), then write the metadata atomically."""
    import onnx

    from qpmcli.artifact import atomic_path

    dyn = {input_name: {0: "batch"}, **{n: {0: "batch"} for n in OUTPUT_NAMES}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks are expected
            try:
                torch.onnx.export(module, (example,), str(tmp), dynamo=False, input_names=[input_name],
                                  output_names=OUTPUT_NAMES, dynamic_axes=dyn, opset_version=opset,
                                  do_constant_folding=True)
            except Exception as legacy_exc:  # the TorchScript exporter cannot trace it: try the dynamo exporter
                try:
                    torch.onnx.export(module, (example,), str(tmp), dynamo=True, input_names=[input_name],
                                      output_names=OUTPUT_NAMES, dynamic_shapes=({0: torch.export.Dim("batch")},),
                                      opset_version=max(opset, 18))
                except Exception as exc:
                    raise ArtifactError(f"ONNX export of the {graph} graph failed: {legacy_exc}; dynamo exporter: "
                                        f"{str(exc).splitlines()[0][:300]}") from exc
        proto = onnx.load(str(tmp))
        set_metadata(proto, meta, graph, prototypes)
        proto.producer_name = "qpm"
        onnx.save(proto, str(tmp))


def metadata_props(meta: ClassifierMetadata, graph: str, prototypes: dict[str, Any] | None = None) -> dict[str, str]:
    """The ``metadata_props`` entries (all values JSON text)."""
    doc = meta.to_json()
    props = {META_PREFIX + "format": json.dumps("qpm-onnx"), META_PREFIX + "format_version": json.dumps(1),
             META_PREFIX + "graph": json.dumps(graph)}
    for key, value in doc.items():
        props[META_PREFIX + key] = json.dumps(value)
    if prototypes is not None:
        props[PROTOTYPES_KEY] = json.dumps(prototypes, separators=(",", ":"))
    return props


def set_metadata(proto: Any, meta: ClassifierMetadata, graph: str, prototypes: dict[str, Any] | None) -> None:
    del proto.metadata_props[:]
    for key, value in metadata_props(meta, graph, prototypes).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def convert_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and compute with float32 inputs/outputs (ONNX Runtime's own float16 converter)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from qpmcli.artifact import atomic_path

    proto = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "values clamped to the fp16 range" is expected for tiny weights
        half = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=False)
    for entry in half.metadata_props:
        if entry.key == META_PREFIX + "precision":
            break
    else:
        entry = half.metadata_props.add()
        entry.key, entry.value = META_PREFIX + "precision", json.dumps("fp16")
    with atomic_path(dst) as tmp:
        onnx.save(half, str(tmp))


# ----------------------------------------------------------------------------------------------- prototypes
def read_prototypes(run: Path, log: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """The run's prototypes as ``{feature_id: [{"png_b64", "class", "activation", ...}]}``, or ``None``.

    Uses ``qpmcli.explain.prototypes_metadata`` (the explain helper's compact form of ``<run>/prototypes/``, which
    ``qpm explain`` reads back from the key ``qpm_prototypes``) when it is importable, else reads the folder directly;
    prototype sets larger than :data:`MAX_PROTOTYPE_BYTES` are not embedded.
    """
    folder = run / "prototypes"
    if not folder.is_dir():
        return None
    try:
        from qpmcli.explain import prototypes_metadata
    except ImportError:
        prototypes_metadata = None
    if prototypes_metadata is not None:
        doc = json.loads(prototypes_metadata(run))
    else:
        doc = _read_prototypes_folder(folder)
    if not doc:
        return None
    size = len(json.dumps(doc, separators=(",", ":")))
    if size > MAX_PROTOTYPE_BYTES:
        if log:
            log(f"prototypes are {size / 2**20:.1f} MB (limit {MAX_PROTOTYPE_BYTES >> 20} MB); not embedded")
        return None
    return doc


def _read_prototypes_folder(folder: Path) -> dict[str, Any] | None:
    """Fallback reader: ``prototypes.json`` entries naming PNG files (``file``/``png``) get them as ``png_b64``."""
    import base64

    index = folder / "prototypes.json"
    if not index.is_file():
        return None
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{index} is not readable JSON: {exc}") from exc
    feats = doc.get("features", doc) if isinstance(doc, dict) else None
    if not isinstance(feats, dict):
        return None
    out: dict[str, Any] = {}
    for fid, entries in feats.items():
        rows = []
        for e in entries if isinstance(entries, list) else []:
            e = dict(e)
            name = e.pop("file", None) or e.pop("png", None)
            if name and "png_b64" not in e and (folder / name).is_file():
                e["png_b64"] = base64.b64encode((folder / name).read_bytes()).decode("ascii")
            rows.append(e)
        out[str(fid)] = rows
    return out


# ------------------------------------------------------------------------------------------------- verification
def check_batch(meta: ClassifierMetadata, run: Path, check_images: Sequence[str | os.PathLike[str]] | None,
                n: int = N_CHECK) -> tuple[Any, str]:
    """The verification inputs ``[n, 3, H, W]`` (preprocessed) and a description of where they came from.

    Given files/folders first; else up to ``n`` images of the run's test split (``config.json``: dataset, data root,
    options); else deterministic synthetic images (smooth colour fields with shapes, not white noise).
    """
    import numpy as np

    from qpmcli.predict import collect_images, preprocess_array

    images: list[Any] = []
    if check_images:
        from qpmcli.images import open_image

        paths = collect_images(check_images)
        for p in paths[:n]:
            images.append(open_image(p))
        if not images:
            raise ImageError("no check images found in --check-images")
        source = f"{len(images)} given images"
    else:
        images, source = _dataset_images(run, n)
        if not images:
            images = synthetic_images(n, meta.image_size)
            source = f"{len(images)} synthetic images (the run's dataset is not available here)"
    x = np.stack([preprocess_array(im, meta.preprocess) for im in images])
    return x, source


def _dataset_images(run: Path, n: int) -> tuple[list[Any], str]:
    """Up to ``n`` images spread over the run's test split, or ``[]`` when the dataset cannot be opened."""
    from qpmcli.artifact import read_json
    from qpmcli.errors import QpmError

    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        return [], ""
    try:
        req = read_json(cfg_path).get("request", {})
        from qpmcli.data import load_dataset

        ds = load_dataset(req["dataset"], root=req.get("data_root"), split="test",
                          **(req.get("dataset_options") or {}))
        step = max(1, len(ds) // n)
        images = [ds[i].image for i in range(0, len(ds), step)][:n]
        return images, f"{len(images)} images of {req['dataset']} (test split)"
    except (QpmError, KeyError, TypeError, OSError):
        return [], ""


def synthetic_images(n: int, size: tuple[int, int], seed: int = 0) -> list[Any]:
    """Deterministic natural-ish images: smooth gradients plus a few filled ellipses/rectangles."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for _ in range(n):
        base = np.stack([rng.uniform(0, 255) * (1 - xx) + rng.uniform(0, 255) * yy for _ in range(3)], -1)
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x0, y0 = rng.uniform(0, w * 0.7), rng.uniform(0, h * 0.7)
            box = [x0, y0, x0 + rng.uniform(w * 0.1, w * 0.5), y0 + rng.uniform(h * 0.1, h * 0.5)]
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        out.append(img)
    return out


def compare(ref: dict[str, Any], onnx_path: Path, x: Any, precision: str, device: str = "cpu") -> dict[str, Any]:
    """Run ``onnx_path`` with ONNX Runtime on ``x`` and compare with the PyTorch outputs ``ref``."""
    import numpy as np

    from qpmcli.predict import _make_session

    session, io_binding = _make_session(onnx_path, device)
    name = session.get_inputs()[0].name
    outs = session.run(OUTPUT_NAMES, {name: np.ascontiguousarray(x, dtype=np.float32)})
    got = dict(zip(OUTPUT_NAMES, outs, strict=True))
    diffs = {k: float(np.abs(got[k].astype(np.float64) - ref[k].astype(np.float64)).max()) for k in OUTPUT_NAMES}
    agree = float(np.mean(got["logits"].argmax(1) == ref["logits"].argmax(1)))
    tol = TOLERANCE[precision]
    return {"file": str(onnx_path), "provider": session.get_providers()[0], "n": int(x.shape[0]),
            "max_abs_diff": diffs, "top1_agreement": agree, "tolerance": tol,
            "passed": bool(diffs["logits"] <= tol and agree == 1.0)}

"""ONNX export of a trained run (``qpm export RUN --onnx``) and its verification against PyTorch.

Two graphs are written, both with a dynamic batch axis and the outputs ``logits [B, C]``, ``maps [B, K, h, w]``
(selected feature maps) and ``features [B, K]``:

- ``model.onnx``: the whole classifier, input ``image [B, 3, H, W]`` (preprocessed, at the run's fixed image size).
  The backbone's position embedding was resized once when the backbone was built (``qpmcli.backbone``), so the graph
  holds a constant of the final size and contains no runtime interpolation (the DINOv2-with-registers export failure
  came from exporting that bicubic/antialiased resize);
- ``model.adapter.onnx``: the adapter + head only, input ``tokens [B, 1 + h*w, D]`` (CLS first), for users who extract
  tokens elsewhere.

Both carry ``metadata_props`` in the format of :mod:`qpmcli.modelfile` (``qpm.<field>`` -> JSON): format, graph,
class names, selected features, W, mu, sigma, bias, preprocessing, backbone name and weights digest, image size, grid,
qpm version; and, when the run has ``prototypes/``, the embedded prototypes document under ``qpm_prototypes``.
``qpmcli.predict.load_classifier`` reads them back, so an ONNX file alone is enough to predict and explain. This
module only writes; every format detail lives in :mod:`qpmcli.modelfile`. ``--fp16`` adds ``model.fp16.onnx`` (and its
adapter twin) converted with float32 inputs/outputs kept.

This module imports torch; the CLI imports it only inside ``qpm export``.

Verification runs ONNX Runtime and PyTorch on the same preprocessed check images and compares logits (max abs
difference <= 1e-4 for fp32, <= 1e-2 for fp16, 100 % top-1 agreement); a failed check removes the files and raises.
"""

from __future__ import annotations

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
from qpmcli.model import pruned
from qpmcli.modelfile import META_PREFIX, ClassifierMetadata, encode_onnx_metadata, metadata_from_run

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
    from qpmcli.backbone import load_run_backbone
    from qpmcli.prototypes import embedded_prototypes

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
    prototypes = embedded_prototypes(run, log=say)

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


def graph_model(model: Any, prune: bool = True) -> Any:
    """The module to export: :func:`qpmcli.model.pruned` (the last adapter layer cut to the selected features) when
    ``prune``, else ``model``."""
    return pruned(model) if prune else model


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


def set_metadata(proto: Any, meta: ClassifierMetadata, graph: str, prototypes: dict[str, Any] | None) -> None:
    """Replace an ONNX model's ``metadata_props`` with :func:`qpmcli.modelfile.encode_onnx_metadata`'s entries."""
    del proto.metadata_props[:]
    for key, value in encode_onnx_metadata(meta, graph, prototypes).items():
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


# ------------------------------------------------------------------------------------------------- verification
def check_batch(meta: ClassifierMetadata, run: Path, check_images: Sequence[str | os.PathLike[str]] | None,
                n: int = N_CHECK) -> tuple[Any, str]:
    """The verification inputs ``[n, 3, H, W]`` (preprocessed) and a description of where they came from.

    Given files/folders first; else up to ``n`` images of the run's test split (``config.json``: dataset, data root,
    options); else deterministic synthetic images (smooth colour fields with shapes, not white noise).
    """
    import numpy as np

    from qpmcli.images import preprocess_array
    from qpmcli.predict import collect_images

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

    from qpmcli.predict import make_session

    session, _ = make_session(onnx_path, device)
    name = session.get_inputs()[0].name
    outs = session.run(OUTPUT_NAMES, {name: np.ascontiguousarray(x, dtype=np.float32)})
    got = dict(zip(OUTPUT_NAMES, outs, strict=True))
    diffs = {k: float(np.abs(got[k].astype(np.float64) - ref[k].astype(np.float64)).max()) for k in OUTPUT_NAMES}
    agree = float(np.mean(got["logits"].argmax(1) == ref["logits"].argmax(1)))
    tol = TOLERANCE[precision]
    return {"file": str(onnx_path), "provider": session.get_providers()[0], "n": int(x.shape[0]),
            "max_abs_diff": diffs, "top1_agreement": agree, "tolerance": tol,
            "passed": bool(diffs["logits"] <= tol and agree == 1.0)}

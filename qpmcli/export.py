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
qpm version, the run's calibrations (``conformal.json``, as ``qpm.conformal``); and, when the run has
``prototypes/``, the embedded prototypes document under ``qpm_prototypes``.
``qpmcli.predict.load_classifier`` reads them back, so an ONNX file alone is enough to predict and explain. This
module only writes; every format detail lives in :mod:`qpmcli.modelfile`. ``--fp16`` adds ``model.fp16.onnx`` (and its
adapter twin) converted with float32 inputs/outputs kept.

This module imports torch; the CLI imports it only inside ``qpm export``.

Every file is first written aside (``.<name>.staged`` next to it); only when all of them are written (and, with
``verify``, have passed) are they renamed over their final names, so a failed or interrupted export never deletes or
replaces an existing ``model.onnx``. Verification runs ONNX Runtime and PyTorch on the same preprocessed check
images. fp32: max abs logit difference <= 1e-4 and 100 % top-1 agreement. fp16 (about 3 significant digits, so an
absolute bound would depend on the logits' scale): the logit difference relative to each image's logit range
(<= 2e-2), the largest class-probability difference (<= 1e-2), and top-1 agreement on every image whose top-2 margin
is larger than the error (images tied within fp16 noise may flip), the checks ONNX Runtime's float16 tools make
(tolerances relative to the magnitude plus top-1 parity) rather than fp32's absolute bound.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qpmcli.errors import ArtifactError, ConfigError, ImageError
from qpmcli.model import pruned
from qpmcli.modelfile import META_PREFIX, ClassifierMetadata, encode_onnx_metadata, metadata_from_run

TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}  # fp32: max abs logit diff; fp16: relative to each image's logit range
FP16_PROBABILITY = 1e-2  # fp16: max |softmax difference|
OUTPUT_NAMES = ["logits", "maps", "features"]
DEFAULT_OPSET = 17
MIN_OPSET = 7


def max_opset() -> int:
    """The newest opset torch's ONNX exporter writes (a higher --opset used to crash inside the exporter)."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET
    except ImportError:  # pragma: no cover - torch moved it: the TorchScript exporter's own limit
        return 20
    return int(ONNX_MAX_OPSET)
N_CHECK = 16


@dataclass(frozen=True)
class ExportRequest:
    """``qpm export --onnx``: where the full graph goes (``None``: ``<run>/model.onnx``), which siblings are written
    (fp16, the adapter graph, int8 with its :class:`~qpmcli.quantize.Int8Options`), whether to verify against PyTorch
    and on which images, the opset and the ONNX Runtime device of the checks."""

    out: str | None = None
    fp16: bool = False
    verify: bool = False
    adapter: bool = True
    prune: bool = True
    opset: int = DEFAULT_OPSET
    check_images: tuple[str, ...] | None = None
    n_check: int = N_CHECK
    device: str = "cpu"
    int8: Any = None  # qpmcli.quantize.Int8Options or None

    def checked(self) -> ExportRequest:
        """Every check that needs no model (one line, exit 2 each): the output path, the opset, the int8 options."""
        from qpmcli.checks import check_out_file, check_positive
        from qpmcli.device import check_device

        check_out_file(self.out, "--out")
        if self.out is not None and Path(self.out).suffix.lower() != ".onnx":
            raise ConfigError(f"--out {self.out}: the file name must end in .onnx")
        if not MIN_OPSET <= self.opset <= max_opset():
            raise ConfigError(f"--opset {self.opset}: the ONNX exporter writes opsets {MIN_OPSET} to {max_opset()}")
        check_positive(self.n_check, "the number of check images")
        check_device(self.device, tensorrt=True)
        if self.int8 is not None:
            self.int8.checked()
        return self


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
    int8: Any = None,
) -> dict[str, Any]:
    """Export the run's final model to ONNX (see the module docstring); returns a JSON-able report.

    ``out``: the full graph's path (default ``<run>/model.onnx``); the adapter graph goes next to it as
    ``<stem>.adapter.onnx`` and the fp16 variants as ``<stem>.fp16.onnx`` / ``<stem>.fp16.adapter.onnx``.
    ``weights``: the backbone weights file (default: looked up like in training; random-weight runs rebuild theirs);
    its digest must equal the run's. ``check_images``: files/folders for ``verify`` (default: the run's test split,
    else deterministic synthetic images). ``device`` is the ONNX Runtime device used by the check. ``prune``: export
    :class:`SelectedFeaturesModel` (the last adapter layer cut to the selected features; same outputs, less work).
    ``int8``: also write ``<stem>.int8.onnx`` (:func:`qpmcli.quantize.export_int8` with these
    :class:`~qpmcli.quantize.Int8Options`, or a dict of them, ``{}`` for the defaults), quantized from the staged fp32
    graph and verified against it before anything is renamed. The options are checked (:class:`ExportRequest`)
    before any work.
    """
    from qpmcli.artifact import ONNX_MODEL, load_model, staged_files
    from qpmcli.backbone import load_run_backbone
    from qpmcli.prototypes import embedded_prototypes
    from qpmcli.quantize import Int8Options

    if isinstance(int8, dict):
        int8 = Int8Options(**{**int8, "verify_images": tuple(map(str, int8["verify_images"]))
                              if int8.get("verify_images") else None})
    ExportRequest(out=None if out is None else str(out), fp16=fp16, verify=verify, adapter=adapter, prune=prune,
                  opset=opset, check_images=tuple(map(str, check_images)) if check_images else None, n_check=n_check,
                  device=device, int8=int8).checked()
    say = log or (lambda _m: None)
    run = Path(run_dir).expanduser()
    if settings is None:
        from qpmcli.settings import resolve_settings

        settings, _ = resolve_settings()
    model, info = load_model(run, "final", device="cpu")
    meta = metadata_from_run(model, info, run_dir=run)  # with the run's feature names and calibrations, if any
    out_path = Path(out).expanduser() if out is not None else run / ONNX_MODEL
    import tempfile

    from qpmcli.files import clean_stale_temps

    # what an earlier, killed export left: its staged files and quantization folders (only qpm's own temporary
    # names, only of processes that are gone)
    clean_stale_temps([out_path.parent, run])
    clean_stale_temps([tempfile.gettempdir()], dirs=True)
    prototypes = embedded_prototypes(run, log=say)  # checked (paths inside the run) before the backbone is built
    backbone = load_run_backbone(info, weights=weights, settings=settings, device="cpu")

    full = FullGraph(backbone, model).eval()  # the PyTorch reference for --verify
    exported = graph_model(model, prune)
    graph_full = FullGraph(backbone, exported).eval()
    tokens_dim = backbone.embed_dim
    h, w = meta.grid
    image = torch.zeros(2, 3, *meta.image_size)
    tokens = torch.zeros(2, 1 + h * w, tokens_dim)
    report: dict[str, Any] = {"run": str(run), "backbone": meta.backbone, "weights_digest": meta.weights_digest,
                              "image_size": list(meta.image_size), "grid": list(meta.grid),
                              "classes": meta.n_classes, "features": meta.n_features, "files": {},
                              "prototypes_embedded": prototypes is not None,
                              "calibrations_embedded": len((meta.conformal or {}).get("calibrations") or []),
                              "pruned_to_selection": exported is not model}
    with staged_files() as stage:  # renamed over the final names only when everything is written and verified
        t0 = time.perf_counter()
        say(f"exporting the full graph to {out_path}")
        _export(graph_full, image, "image", stage.aside(out_path), meta, "full", opset, prototypes)
        report["files"]["full"] = str(out_path)
        adapter_path = out_path.with_name(out_path.stem + ".adapter.onnx")
        if adapter:
            say(f"exporting the adapter graph to {adapter_path}")
            _export(AdapterGraph(exported).eval(), tokens, "tokens", stage.aside(adapter_path), meta, "adapter",
                    opset, prototypes)
            report["files"]["adapter"] = str(adapter_path)
        if fp16:
            for kind, src in [("full", out_path)] + ([("adapter", adapter_path)] if adapter else []):
                dst = src.with_name(src.name.replace(".onnx", "").replace(".adapter", "") + ".fp16"
                                    + (".adapter" if kind == "adapter" else "") + ".onnx")
                say(f"converting to fp16: {dst}")
                convert_fp16(stage[src], stage.aside(dst))
                report["files"][f"{kind}_fp16"] = str(dst)
        report["export_seconds"] = round(time.perf_counter() - t0, 2)
        if verify:
            x, source = check_batch(meta, run, check_images, n_check)
            report["check_set"] = source
            report["verify"] = {}
            ref = full.reference(x)
            for precision, key in [("fp32", "full")] + ([("fp16", "full_fp16")] if fp16 else []):
                res = compare(ref, stage[report["files"][key]], x, precision, device)
                res["file"] = report["files"][key]
                report["verify"][precision] = res
                say(f"verify {precision}: max |logit diff| {res['max_abs_diff']['logits']:.3g}, top-1 agreement "
                    f"{100 * res['top1_agreement']:.1f}% on {res['n']} images ({res['provider']})")
            if adapter:
                tok = full.tokens(x)
                res = compare(ref, stage[adapter_path], tok, "fp32", device)
                res["file"] = str(adapter_path)
                report["verify"]["adapter_fp32"] = res
            failed = [k for k, v in report["verify"].items() if not v["passed"]]
            if failed:
                detail = "; ".join(f"{k}: {report['verify'][k]['criterion']}" for k in failed)
                raise ArtifactError(f"ONNX verification failed ({detail}); nothing was written and existing files "
                                    f"were left as they were")
        if int8 is not None:  # qpmcli.quantize: from the staged fp32 graph, verified; renamed with the others below
            from qpmcli.quantize import export_int8, int8_path

            int8_final = int8_path(out_path)
            say(f"quantizing to int8: {int8_final}")
            q = export_int8(run, stage[out_path], stage.aside(int8_final), log=say, **int8.as_kwargs())
            q.update(file=str(int8_final), source=str(out_path))
            report["int8"] = q
            report["files"]["full_int8"] = str(int8_final)
        report["sizes_mb"] = stage.sizes_mb()  # every file written, before they are renamed
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
            cls, patches = self.backbone.raw_tokens(image)  # no autocast: the graph is exported in float32
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
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks are expected
                try:
                    torch.onnx.export(module, (example,), str(tmp), dynamo=False, input_names=[input_name],
                                      output_names=OUTPUT_NAMES, dynamic_axes=dyn, opset_version=opset,
                                      do_constant_folding=True)
                except Exception as legacy_exc:  # the TorchScript exporter cannot trace it: the dynamo exporter
                    try:  # (weights inside the file: no external .data file next to a temporary name)
                        torch.onnx.export(module, (example,), str(tmp), dynamo=True, input_names=[input_name],
                                          output_names=OUTPUT_NAMES, external_data=False,
                                          dynamic_shapes=({0: torch.export.Dim("batch")},),
                                          opset_version=max(opset, 18))
                    except Exception as exc:
                        raise ArtifactError(f"ONNX export of the {graph} graph failed: {legacy_exc}; dynamo "
                                            f"exporter: {str(exc).splitlines()[0][:300]}") from exc
            proto = onnx.load(str(tmp))
            set_metadata(proto, meta, graph, prototypes)
            proto.producer_name = "qpm"
            onnx.save(proto, str(tmp))
        finally:
            Path(f"{tmp}.data").unlink(missing_ok=True)  # what an exporter may have written beside the file


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

    from qpmcli.images import list_images, open_image, preprocess_array, synthetic_images

    images: list[Any] = []
    if check_images:
        paths = list_images(check_images)
        for p in paths[:n]:
            images.append(open_image(p))
        if not images:
            raise ImageError("no check images found in --check-images")
        source = f"{len(images)} given images"
    else:
        from qpmcli.artifact import RunFolder

        images, source = RunFolder(run).sample_images("test", n)
        if not images:
            images = synthetic_images(n, meta.image_size)
            source = f"{len(images)} synthetic images (the run's dataset is not available here)"
    x = np.stack([preprocess_array(im, meta.preprocess) for im in images])
    return x, source


def compare(ref: dict[str, Any], onnx_path: Path, x: Any, precision: str, device: str = "cpu") -> dict[str, Any]:
    """Run ``onnx_path`` with ONNX Runtime on ``x`` and compare with the PyTorch outputs ``ref``."""
    import numpy as np

    from qpmcli.predict import make_session

    session, _ = make_session(onnx_path, device)
    name = session.get_inputs()[0].name
    outs = session.run(OUTPUT_NAMES, {name: np.ascontiguousarray(x, dtype=np.float32)})
    got = dict(zip(OUTPUT_NAMES, outs, strict=True))
    res = {"file": str(onnx_path), "provider": session.get_providers()[0], "n": int(x.shape[0])}
    res.update(parity(ref, got, precision))
    return res


def parity(ref: dict[str, Any], got: dict[str, Any], precision: str) -> dict[str, Any]:
    """Compare ONNX outputs ``got`` with the PyTorch outputs ``ref`` by the criterion of ``precision`` (see the
    module docstring): fp32 an absolute logit bound, fp16 bounds relative to the logits' scale, on probabilities,
    and top-1 agreement wherever the reference's top-2 margin exceeds the error."""
    import numpy as np

    from qpmcli.modelfile import softmax

    diffs = {k: float(np.abs(got[k].astype(np.float64) - ref[k].astype(np.float64)).max()) for k in OUTPUT_NAMES}
    a, b = ref["logits"].astype(np.float64), got["logits"].astype(np.float64)
    same = a.argmax(1) == b.argmax(1)
    agree = float(np.mean(same))
    tol = TOLERANCE[precision]
    out: dict[str, Any] = {"max_abs_diff": diffs, "top1_agreement": agree, "tolerance": tol}
    if precision == "fp32":
        out["passed"] = bool(diffs["logits"] <= tol and agree == 1.0)
        out["criterion"] = (f"max |logit diff| {diffs['logits']:.3g} (limit {tol}), top-1 agreement "
                            f"{100 * agree:.1f}% (needs 100%)")
        return out
    err = np.abs(a - b).max(1)  # per image
    scale = np.maximum(a.max(1) - a.min(1), 1.0)  # each image's logit range (at least 1: tiny ranges are ties)
    rel = float((err / scale).max())
    prob = float(np.abs(softmax(a) - softmax(b)).max())
    top2 = np.sort(a, axis=1)[:, -2:] if a.shape[1] > 1 else np.concatenate([a, a], 1)
    decisive = (top2[:, 1] - top2[:, 0]) > 2 * err  # a flip there is an error, not a tie within fp16 noise
    flips = int(np.sum(decisive & ~same))
    out.update({"relative_logit_diff": rel, "max_probability_diff": prob, "decisive_top1_flips": flips,
                "probability_tolerance": FP16_PROBABILITY,
                "passed": bool(rel <= tol and prob <= FP16_PROBABILITY and flips == 0)})
    out["criterion"] = (f"max |logit diff| {diffs['logits']:.3g} = {rel:.3g} of the logit range (limit {tol:g}), "
                        f"max |probability diff| {prob:.3g} (limit {FP16_PROBABILITY:g}), top-1 agreement "
                        f"{100 * agree:.1f}% with {flips} flip(s) beyond fp16 noise (needs 0)")
    return out

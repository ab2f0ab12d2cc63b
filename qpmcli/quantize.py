"""int8 CPU inference: ONNX Runtime's own quantization of an exported fp32 graph, verified against that graph.

``qpm export RUN --onnx --int8`` writes ``<stem>.int8.onnx`` next to the fp32 file (``model.onnx`` ->
``model.int8.onnx``). Everything here is done by ``onnxruntime.quantization`` and ONNX Runtime's graph optimiser;
this module only chooses what to quantize and checks the result.

- **Dynamic** quantization (the default): the weights of the MatMul/Gemm nodes that carry one (the backbone's
  projections and MLPs, the adapter) become int8; activations are quantized per call by ONNX Runtime.
- Weights are quantized per output channel into a 7-bit range (``per_channel`` + ``reduce_range``). On x86 CPUs
  without VNNI (AVX2, AVX512 without VNNI) ONNX Runtime multiplies uint8 activations by int8 weights with
  ``vpmaddubsw``, whose 16-bit pair sums saturate with full 8-bit weights; the 7-bit range avoids that (ONNX
  Runtime's own advice). Measured on a demo-backbone model on such a CPU: top-1 agreement with fp32 95 % with full
  8-bit per-tensor weights, 99 % per channel with the 7-bit range (top-feature agreement 95 % -> 100 %).
- **Static QDQ** quantization (``--calibrate train|DIR``): weights and activations of MatMul/Gemm/Conv, activation
  ranges calibrated on N images (:class:`ImageCalibrationReader`, default :data:`DEFAULT_CALIBRATION_N`). Both
  models are built and measured; the static one is kept only when it is both faster and as accurate as the dynamic
  one (top-1 agreement and top-feature agreement no lower), and the report says which was kept and why.
- **Kept in fp32** (:func:`fp32_nodes`): the pooling that produces ``features`` and everything computed from it (the
  standardisation and the binary class-feature layer ``W``), so the head's arithmetic -- and therefore the five
  features that explain a class and their contributions -- works on float features exactly as in the fp32 graph.
  Only nodes with a constant weight are quantized, so LayerNorm, Softmax, GELU, the activation x activation attention
  products and the pooling are never touched (:func:`precision_report` inspects a quantized graph and says so).
- **Graph optimisation** before quantizing (:data:`OPTIMIZATIONS`): ``"basic"`` (the default) runs
  ``onnxruntime.quantization.quant_pre_process`` (symbolic shape inference + ONNX Runtime's basic graph optimisation
  offline: constant folding, redundant-node elimination), which ONNX Runtime recommends before quantizing;
  ``"transformer"`` additionally runs ``onnxruntime.transformers.optimizer`` (SkipLayerNormalization, BiasGelu,
  Attention fusion where its patterns match); ``"none"`` quantizes the exported graph as is. Measured
  (``benchmarks/bench_export.py``, ViT-B/14-reg, 2 shared cores, two runs): int8 after the transformer optimizer
  runs at 0.76-0.97x (batch 1) and 0.96-1.06x (batch 8), without optimisation at 0.87-1.05x and 0.97-1.04x the speed
  of int8 after the basic level (the optimizer fuses SkipLayerNormalization/BiasGelu but does not match DINOv2's
  attention pattern): no level helps beyond noise, so ``basic``, ONNX Runtime's recommended pre-processing, is the
  default.
  The session that runs the int8 file applies ONNX Runtime's full optimisation level on top, as for any exported
  model.

Verification is part of the export: the int8 and fp32 graphs run on the same preprocessed images (the run's test
split, or ``--verify-images``) and :func:`compare_outputs` reports top-1 agreement, the largest probability
difference, agreement of the explained (fp32-predicted) class's top feature and the rank correlation of that class's
feature contributions. The numbers go into the int8 file's metadata (``qpm.precision`` = ``"int8"``,
``qpm.quantization``) and to stdout. Below ``--min-agreement`` (default :data:`DEFAULT_MIN_AGREEMENT`) the export
fails with one line and no int8 file is written: the model is written aside, verified, and only then renamed.

This module imports neither torch nor timm: onnx, onnxruntime and numpy are imported inside the functions.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpmcli.errors import ArtifactError, ConfigError, ImageError
from qpmcli.files import temp_dir_prefix

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from qpmcli.modelfile import ClassifierMetadata

INT8_SUFFIX = ".int8.onnx"
DEFAULT_MIN_AGREEMENT = 0.99
DEFAULT_CALIBRATION_N = 64
DEFAULT_VERIFY_N = 256  # images spread over the test split; the demo's whole test split is 200
WEIGHT_OP_TYPES = ("MatMul", "Gemm")  # dynamic quantization: weight-bearing matrix products
STATIC_OP_TYPES = ("MatMul", "Gemm", "Conv")  # static QDQ quantization adds the convolutions (EfficientNet)
OPTIMIZATIONS = ("basic", "transformer", "none")
DEFAULT_OPTIMIZATION = "basic"
INTEGER_OP_TYPES = frozenset({  # op types that compute in integers (or convert to/from them)
    "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "QLinearMatMul",
    "QLinearConv", "QuantizeLinear", "DequantizeLinear", "QGemm", "QAttention", "MatMulIntegerToFloat",
    "DynamicQuantizeLSTM", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearSoftmax"})
FP32_OP_TYPES = ("LayerNormalization", "SkipLayerNormalization", "Softmax", "ReduceMean", "ReduceMax",
                 "GlobalAveragePool", "GlobalMaxPool")  # must stay float (checked by precision_report)
OUTPUTS = ("logits", "maps", "features")
WEIGHT_TYPE = "int8 per output channel, 7-bit range"  # see the module docstring: reduce_range
RUN_BATCH = 16  # images per ONNX Runtime call while verifying (bounds memory on big backbones)


@dataclass(frozen=True)
class Int8Options:
    """``qpm export --int8``: how to quantize and verify. ``calibrate``: ``"train"`` or a folder of images for static
    QDQ (kept only when faster and as accurate); ``n_calibrate`` images; ``verify_images``: files/folders to compare
    with fp32 on (default: the run's test split); ``min_agreement``: the least top-1 agreement with fp32."""

    calibrate: str | None = None
    n_calibrate: int = DEFAULT_CALIBRATION_N
    verify_images: tuple[str, ...] | None = None
    min_agreement: float = DEFAULT_MIN_AGREEMENT

    def checked(self) -> Int8Options:
        """Every check that needs no model (one line, exit 2 each)."""
        import math

        if not (math.isfinite(self.min_agreement) and 0.0 <= self.min_agreement <= 1.0):
            raise ConfigError(f"--min-agreement must be between 0 and 1 (a share of images), not "
                              f"{self.min_agreement}")
        if self.n_calibrate < 1:
            raise ConfigError(f"--calibrate-n must be at least 1, not {self.n_calibrate}")
        if self.calibrate is not None and self.calibrate != "train" and \
                not Path(self.calibrate).expanduser().is_dir():
            raise ConfigError(f"--calibrate {self.calibrate}: expected 'train' or an existing folder of images")
        return self

    def as_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`export_int8`."""
        return {"calibrate": self.calibrate, "n_calibrate": self.n_calibrate,
                "verify_images": list(self.verify_images) if self.verify_images else None,
                "min_agreement": self.min_agreement}


def int8_path(fp32_path: str | os.PathLike[str]) -> Path:
    """``<stem>.int8.onnx`` next to the fp32 file (``model.onnx`` -> ``model.int8.onnx``)."""
    p = Path(fp32_path)
    return p.with_name(p.name[: -len(".onnx")] + INT8_SUFFIX if p.name.lower().endswith(".onnx") else
                       p.name + INT8_SUFFIX)


# ------------------------------------------------------------------------------------------------ graph structure
def _producers(model: Any) -> dict[str, Any]:
    return {out: node for node in model.graph.node for out in node.output}


def fp32_nodes(model: Any) -> list[str]:
    """Names of the nodes that stay fp32: the node producing ``features`` (the pooling) and every node computed from
    ``features`` (standardisation and the class-feature layer that produces ``logits``).

    A graph without ``features``/``logits`` outputs is not a qpm full graph (:class:`ArtifactError`).
    """
    outputs = {o.name for o in model.graph.output}
    if not {"features", "logits"} <= outputs:
        raise ArtifactError("the graph has no 'features'/'logits' outputs: int8 needs a qpm full graph "
                            "(model.onnx from `qpm export`, not an adapter graph)")
    producers = _producers(model)
    if "features" not in producers:
        raise ArtifactError("the graph's 'features' output is not computed by any node")
    start = producers["features"]
    keep = [start.name]
    seen = {start.name}
    reached = set(start.output)
    changed = True
    while changed:  # forward closure over the consumers (a small graph tail; node order is topological anyway)
        changed = False
        for node in model.graph.node:
            if node.name not in seen and any(i in reached for i in node.input):
                seen.add(node.name)
                keep.append(node.name)
                reached.update(node.output)
                changed = True
    unnamed = [n for n in model.graph.node if not n.name]
    if unnamed:
        raise ArtifactError(f"{len(unnamed)} graph nodes have no name; cannot exclude them from quantization")
    return keep


def _constant_tensors(model: Any) -> set[str]:
    names = {i.name for i in model.graph.initializer}
    names.update(n.output[0] for n in model.graph.node if n.op_type == "Constant")
    return names


def weight_nodes(model: Any, op_types: Iterable[str], keep: Iterable[str] = ()) -> list[str]:
    """Nodes of ``op_types`` whose second input (the weight) is a constant, minus ``keep``."""
    const = _constant_tensors(model)
    skip = set(keep)
    types = set(op_types)
    return [n.name for n in model.graph.node
            if n.op_type in types and len(n.input) > 1 and n.input[1] in const and n.name not in skip]


def precision_report(model_or_path: Any) -> dict[str, Any]:
    """What a (quantized) graph computes in integers and what stays float.

    Returns op-type counts, ``quantized_nodes`` (integer ops), ``fp32_ops`` (counts of :data:`FP32_OP_TYPES`, all
    float), and ``head``: for every node of :func:`fp32_nodes` (the pooling, standardisation and class-feature layer)
    its op type and whether it reads a dequantized or integer tensor (``head_fp32`` is True when none does and all
    its constants are float).
    """
    import onnx

    model = onnx.load(str(model_or_path)) if isinstance(model_or_path, str | os.PathLike) else model_or_path
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    producers = _producers(model)
    inits = {i.name: i for i in model.graph.initializer}
    head = []
    head_fp32 = True
    for name in fp32_nodes(model):
        node = next(n for n in model.graph.node if n.name == name)
        int_inputs = [i for i in node.input if i in producers and producers[i].op_type in INTEGER_OP_TYPES]
        int_consts = [i for i in node.input if i in inits and inits[i].data_type != onnx.TensorProto.FLOAT]
        ok = node.op_type not in INTEGER_OP_TYPES and not int_inputs and not int_consts
        head_fp32 &= ok
        head.append({"node": name, "op_type": node.op_type, "fp32": ok})
    fp32_ops = {}
    for t in FP32_OP_TYPES:
        nodes = [n for n in model.graph.node if n.op_type == t]
        if nodes:
            fp32_ops[t] = len(nodes)
    return {"op_types": counts, "quantized_nodes": sum(v for k, v in counts.items() if k in INTEGER_OP_TYPES),
            "fp32_ops": fp32_ops, "head": head, "head_fp32": head_fp32}


# ----------------------------------------------------------------------------------------------- quantization
class ImageCalibrationReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over preprocessed images ``[N, 3, H, W]``, in batches."""

    def __init__(self, x: np.ndarray, input_name: str = "image", batch: int = 8) -> None:
        self.x = x
        self.input_name = input_name
        self.batch = max(1, int(batch))
        self._start = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        import numpy as np

        if self._start >= len(self.x):
            return None
        chunk = self.x[self._start:self._start + self.batch]
        self._start += self.batch
        return {self.input_name: np.ascontiguousarray(chunk, dtype=np.float32)}

    def rewind(self) -> None:
        self._start = 0

    def __len__(self) -> int:
        return len(self.x)


def _as_calibration_reader(reader: ImageCalibrationReader) -> Any:
    """Register the reader class with ORT's ABC (it duck-types ``get_next``) so quantize_static accepts it."""
    from onnxruntime.quantization import CalibrationDataReader

    CalibrationDataReader.register(ImageCalibrationReader)
    return reader


def optimize_for_quantization(src: Path, dst: Path, level: str, *, num_heads: int = 0,
                              hidden_size: int = 0) -> dict[str, Any]:
    """Offline graph optimisation before quantizing (see :data:`OPTIMIZATIONS`); returns what was done."""
    import onnx

    if level not in OPTIMIZATIONS:
        raise ConfigError(f"optimization must be one of {', '.join(OPTIMIZATIONS)}, not {level!r}")
    if level == "none":
        onnx.save(onnx.load(str(src)), str(dst))
        return {"level": "none"}
    from onnxruntime.quantization import quant_pre_process

    staged = src
    info: dict[str, Any] = {"level": level}
    if level == "transformer":
        import logging

        from onnxruntime.transformers.optimizer import optimize_model

        logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)  # "producer not matched" etc.
        opt = optimize_model(str(src), model_type="vit", num_heads=num_heads, hidden_size=hidden_size, opt_level=0)
        fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
        info["fused"] = fused
        staged = dst.with_name(dst.stem + ".fused.onnx")
        opt.save_model_to_file(str(staged))
    try:
        # skip_symbolic_shape for fused graphs: the symbolic shape inference knows the contrib ops too, but a
        # failure there must not stop the export, so fall back to plain onnx shape inference
        quant_pre_process(str(staged), str(dst), skip_optimization=level == "transformer",
                          skip_symbolic_shape=False)
    except Exception:  # noqa: BLE001 - symbolic shape inference gives up on some graphs: plain shape inference
        quant_pre_process(str(staged), str(dst), skip_optimization=level == "transformer",
                          skip_symbolic_shape=True)
    finally:
        if staged != src:
            Path(staged).unlink(missing_ok=True)
    return info


def quantize_dynamic_int8(src: Path, dst: Path) -> dict[str, Any]:
    """ONNX Runtime dynamic quantization of the weight-bearing MatMul/Gemm nodes (int8 weights, per tensor)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    keep = fp32_nodes(model)
    nodes = weight_nodes(model, WEIGHT_OP_TYPES, keep)
    if not nodes:
        raise ArtifactError("the graph has no weight-bearing MatMul/Gemm nodes to quantize")
    quantize_dynamic(model, str(dst), op_types_to_quantize=list(WEIGHT_OP_TYPES), nodes_to_quantize=nodes,
                     nodes_to_exclude=keep, per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return {"method": "dynamic", "op_types": list(WEIGHT_OP_TYPES), "quantized_nodes": len(nodes),
            "fp32_nodes": keep, "weight_type": WEIGHT_TYPE, "activation_type": "uint8 (per call)"}


def quantize_static_int8(src: Path, dst: Path, calibration: np.ndarray) -> dict[str, Any]:
    """ONNX Runtime static QDQ quantization of MatMul/Gemm/Conv (int8 per-channel weights, uint8 activations,
    MinMax ranges calibrated on ``calibration`` images)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(src))
    keep = fp32_nodes(model)
    nodes = weight_nodes(model, STATIC_OP_TYPES, keep)
    if not nodes:
        raise ArtifactError("the graph has no weight-bearing MatMul/Gemm/Conv nodes to quantize")
    reader = _as_calibration_reader(ImageCalibrationReader(calibration, model.graph.input[0].name))
    with tempfile.TemporaryDirectory(prefix=temp_dir_prefix("calib")) as tmp:  # ORT writes its augmented model here
        cwd = os.getcwd()
        try:
            os.chdir(tmp)
            quantize_static(model, str(dst), reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(STATIC_OP_TYPES), nodes_to_quantize=nodes,
                            nodes_to_exclude=keep, per_channel=True, reduce_range=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        finally:
            os.chdir(cwd)
    return {"method": "static-qdq", "op_types": list(STATIC_OP_TYPES), "quantized_nodes": len(nodes),
            "fp32_nodes": keep, "weight_type": WEIGHT_TYPE, "activation_type": "uint8 (calibrated, MinMax)",
            "calibration_images": int(len(calibration))}


# ------------------------------------------------------------------------------------------------- measuring
def cpu_session(path: str | os.PathLike[str]) -> Any:
    """An ONNX Runtime CPU session, opened exactly as ``qpm predict --device cpu`` opens one
    (:func:`qpmcli.predict.make_session`)."""
    from qpmcli.predict import make_session

    return make_session(Path(path), "cpu")[0]


def run_outputs(session: Any, x: np.ndarray, batch: int = RUN_BATCH) -> dict[str, np.ndarray]:
    """``logits``, ``maps``, ``features`` of ``x`` (float32), in batches."""
    import numpy as np

    name = session.get_inputs()[0].name
    parts: dict[str, list[np.ndarray]] = {k: [] for k in OUTPUTS}
    for start in range(0, len(x), batch):
        chunk = np.ascontiguousarray(x[start:start + batch], dtype=np.float32)
        for k, v in zip(OUTPUTS, session.run(list(OUTPUTS), {name: chunk}), strict=True):
            parts[k].append(np.asarray(v, dtype=np.float32))
    return {k: np.concatenate(v) for k, v in parts.items()}


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation of two vectors (scipy); None when either is constant."""
    import numpy as np
    from scipy.stats import spearmanr

    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def compare_outputs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], meta: ClassifierMetadata
                    ) -> dict[str, Any]:
    """int8 (``got``) against fp32 (``ref``) on the same images.

    ``top1_agreement``: share of images with the same predicted class. ``max_prob_diff``: the largest absolute
    difference of any class probability. ``top_feature_agreement``: for the class fp32 predicts (the class
    ``qpm explain`` explains), the share of images whose largest-contribution feature (among the class's features,
    ``W[c] != 0``) is the same. ``contribution_rank_correlation``: mean Spearman correlation of that class's feature
    contributions (images where either side is constant are skipped). ``max_abs_diff``: per output.
    """
    import numpy as np

    from qpmcli.modelfile import softmax

    cls = ref["logits"].argmax(1)
    agree = float(np.mean(got["logits"].argmax(1) == cls))
    prob = float(np.abs(softmax(got["logits"].astype(np.float64)) - softmax(ref["logits"].astype(np.float64))).max())
    c_ref = meta.contributions(ref["features"], cls)
    c_got = meta.contributions(got["features"], cls)
    same_top, rhos = [], []
    for i, c in enumerate(cls):
        cols = np.flatnonzero(meta.weight[c] != 0)
        if cols.size == 0:
            continue
        same_top.append(cols[np.argmax(c_ref[i, cols])] == cols[np.argmax(c_got[i, cols])])
        rho = _spearman(c_ref[i, cols], c_got[i, cols])
        if rho is not None:
            rhos.append(rho)
    diffs = {k: float(np.abs(got[k].astype(np.float64) - ref[k].astype(np.float64)).max()) for k in OUTPUTS}
    return {"n": int(len(cls)), "top1_agreement": agree, "max_prob_diff": prob,
            "top_feature_agreement": float(np.mean(same_top)) if same_top else None,
            "contribution_rank_correlation": float(np.mean(rhos)) if rhos else None,
            "max_abs_diff": diffs}


def images_per_second(paths: dict[str, Path], x: np.ndarray, repeats: int = 3, min_seconds: float = 0.5
                      ) -> dict[str, float]:
    """Median images/s of each model on the batch ``x``, each timed in a block of its own with only its session
    open: an idle session's spinning ONNX Runtime threads would take the cores from the one being timed."""
    out: dict[str, float] = {}
    for key, path in paths.items():
        session = cpu_session(path)
        feed = {session.get_inputs()[0].name: x}
        session.run(None, feed)  # warm-up
        times = []
        for _ in range(repeats):
            n, start = 0, time.perf_counter()
            while n < 1 or time.perf_counter() - start < min_seconds:
                session.run(None, feed)
                n += 1
            times.append((time.perf_counter() - start) / n)
        out[key] = len(x) / statistics.median(times)
        del session
    return out


# ---------------------------------------------------------------------------------------------------- images
def folder_images(inputs: Sequence[str | os.PathLike[str]], n: int | None, flag: str) -> tuple[list[Any], str]:
    """Images from files/folders (unreadable files are an error: they were named on purpose)."""
    from qpmcli.images import list_images, open_image

    paths = list_images(inputs)
    if n is not None:
        paths = paths[:n]
    if not paths:
        raise ImageError(f"{flag}: no images found in {', '.join(map(str, inputs))}")
    return [open_image(p) for p in paths], f"{len(paths)} images from {flag}"


def preprocess_batch(images: Sequence[Any], meta: ClassifierMetadata) -> np.ndarray:
    import numpy as np

    from qpmcli.images import preprocess_array

    return np.stack([preprocess_array(im, meta.preprocess) for im in images]).astype(np.float32)


# ------------------------------------------------------------------------------------------------------ the step
def build_int8(
    fp32_path: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    x_verify: np.ndarray,
    *,
    verify_source: str,
    calibration: np.ndarray | None = None,
    calibration_source: str | None = None,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    optimization: str = DEFAULT_OPTIMIZATION,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Quantize ``fp32_path`` (a qpm full graph) to ``dst``, verified; returns the report.

    The int8 model is built in a temporary folder, compared with the fp32 graph on ``x_verify`` and written to
    ``dst`` (atomically) only when its top-1 agreement is at least ``min_agreement``; otherwise a
    :class:`ConfigError` names the measured agreement and ``dst`` is left as it was. With ``calibration`` images a
    static QDQ model is built as well and kept only when it is faster and as accurate (see the module docstring).
    """
    import onnx

    from qpmcli.artifact import atomic_path
    from qpmcli.modelfile import META_PREFIX, decode_onnx_metadata

    say = log or (lambda _m: None)
    if not 0.0 <= min_agreement <= 1.0:
        raise ConfigError(f"--min-agreement must be between 0 and 1, not {min_agreement}")
    src = Path(fp32_path)
    dst = Path(dst)
    fp32_proto = onnx.load(str(src))
    props = {p.key: p.value for p in fp32_proto.metadata_props}
    meta, graph = decode_onnx_metadata(props, src)
    if graph != "full":
        raise ArtifactError(f"{src} is an adapter graph; int8 is made from the full graph (model.onnx)")
    if meta.extra.get("precision", "fp32") != "fp32":
        raise ArtifactError(f"{src} is already {meta.extra['precision']}; int8 is made from the fp32 graph")
    del fp32_proto
    report: dict[str, Any] = {"file": str(dst), "source": str(src), "min_agreement": min_agreement,
                              "verify_set": verify_source}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=temp_dir_prefix("int8")) as tmp_dir:
        tmp = Path(tmp_dir)
        staged = tmp / "optimized.onnx"
        heads = _attention_heads(meta)
        report["optimization"] = optimize_for_quantization(src, staged, optimization, **heads)
        candidates: dict[str, tuple[Path, dict[str, Any]]] = {}
        say(f"int8: dynamic quantization of the MatMul/Gemm weights ({optimization} graph optimisation first)")
        candidates["dynamic"] = (tmp / "dynamic.onnx", quantize_dynamic_int8(staged, tmp / "dynamic.onnx"))
        if calibration is not None:
            say(f"int8: static QDQ quantization calibrated on {calibration_source}")
            candidates["static-qdq"] = (tmp / "static.onnx",
                                        quantize_static_int8(staged, tmp / "static.onnx", calibration))
        report["quantize_seconds"] = round(time.perf_counter() - t0, 2)
        say(f"int8: comparing with fp32 on {verify_source}")
        ref = run_outputs(cpu_session(src), x_verify)
        results = {k: compare_outputs(ref, run_outputs(cpu_session(p), x_verify), meta)
                   for k, (p, _) in candidates.items()}
        chosen = "dynamic"
        if "static-qdq" in candidates:
            bench_x = x_verify[: min(8, len(x_verify))]
            speed = images_per_second({k: p for k, (p, _) in candidates.items()}, bench_x)
            d, s = results["dynamic"], results["static-qdq"]
            faster = speed["static-qdq"] > speed["dynamic"]
            as_accurate = s["top1_agreement"] >= d["top1_agreement"] and \
                (s["top_feature_agreement"] or 0) >= (d["top_feature_agreement"] or 0)
            chosen = "static-qdq" if faster and as_accurate else "dynamic"
            why = (f"static QDQ {speed['static-qdq']:.2f} vs dynamic {speed['dynamic']:.2f} images/s at batch "
                   f"{len(bench_x)}; top-1 agreement {100 * s['top1_agreement']:.1f}% vs "
                   f"{100 * d['top1_agreement']:.1f}%, top feature {_pct(s['top_feature_agreement'])} vs "
                   f"{_pct(d['top_feature_agreement'])}")
            verdict = ("kept static QDQ (faster and as accurate)" if chosen == "static-qdq" else
                       "kept dynamic (static QDQ was " + " and ".join(
                           w for w, bad in (("not faster", not faster), ("less accurate", not as_accurate)) if bad)
                       + ")")
            report["calibration"] = {"set": calibration_source, "images_per_second": speed,
                                     "candidates": results, "decision": f"{verdict}: {why}"}
            say(f"int8: {verdict}: {why}")
        path, quant = candidates[chosen]
        res = results[chosen]
        report.update(method=chosen, quantization={k: v for k, v in quant.items() if k != "fp32_nodes"},
                      fp32_nodes=quant["fp32_nodes"], verify=res,
                      passed=res["top1_agreement"] >= min_agreement)
        report["graph"] = precision_report(path)
        if not report["graph"]["head_fp32"]:  # a guard on our own exclusion logic, not a user error
            raise ArtifactError("int8: the class-feature head was quantized; refusing to write the model")
        if not report["passed"]:
            raise ConfigError(
                f"int8 verification failed: top-1 agreement with fp32 {100 * res['top1_agreement']:.2f}% < "
                f"--min-agreement {100 * min_agreement:.2f}% on {verify_source}; no int8 file was written")
        int8 = onnx.load(str(path))
        doc = {"method": chosen, "optimization": report["optimization"]["level"],
               "op_types": quant["op_types"], "quantized_nodes": quant["quantized_nodes"],
               "fp32_nodes": len(quant["fp32_nodes"]), "weight_type": quant["weight_type"],
               "activation_type": quant["activation_type"], "verify_set": verify_source,
               "min_agreement": min_agreement, **{k: res[k] for k in (
                   "n", "top1_agreement", "max_prob_diff", "top_feature_agreement", "contribution_rank_correlation")}}
        if "calibration" in report:
            doc["calibration"] = report["calibration"]["decision"]
        _set_props(int8, {**props, META_PREFIX + "precision": json.dumps("int8"),
                          META_PREFIX + "quantization": json.dumps(doc)})
        int8.producer_name = "qpm"
        with atomic_path(dst) as out:
            onnx.save(int8, str(out))
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["size_ratio"] = round(dst.stat().st_size / src.stat().st_size, 4)
    report["metadata"] = doc
    return report


def _set_props(proto: Any, props: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _attention_heads(meta: ClassifierMetadata) -> dict[str, int]:
    """num_heads/hidden_size for the transformer optimiser: DINO/DINOv2 ViTs use 64-dimensional heads."""
    dim = int(meta.embed_dim or 0)
    if dim and dim % 64 == 0 and not meta.backbone.startswith("efficientnet"):
        return {"num_heads": dim // 64, "hidden_size": dim}
    return {"num_heads": 0, "hidden_size": 0}


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def export_int8(
    run: str | os.PathLike[str] | None,
    fp32_path: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None = None,
    *,
    calibrate: str | None = None,
    n_calibrate: int = DEFAULT_CALIBRATION_N,
    verify_images: Sequence[str | os.PathLike[str]] | None = None,
    n_verify: int = DEFAULT_VERIFY_N,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    optimization: str = DEFAULT_OPTIMIZATION,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``--int8`` of ``qpm export``: quantize the exported fp32 full graph ``fp32_path`` to ``dst`` (default
    :func:`int8_path`), verified on the run's test split (or ``verify_images``), calibrated on the run's train split
    (``calibrate="train"``) or a folder of images (``calibrate=DIR``) when asked. See :func:`build_int8`."""
    from qpmcli.artifact import RunFolder
    from qpmcli.modelfile import read_onnx_metadata

    src = Path(fp32_path)
    out = Path(dst) if dst is not None else int8_path(src)
    Int8Options(calibrate, n_calibrate, tuple(map(str, verify_images)) if verify_images else None,
                min_agreement).checked()
    if n_verify < 1:
        raise ConfigError(f"the number of verification images must be at least 1, not {n_verify}")
    meta, _ = read_onnx_metadata(src)
    run_dir = Path(run).expanduser() if run is not None else None
    if verify_images:
        images, v_source = folder_images(verify_images, None, "--verify-images")
    else:
        images, v_source = RunFolder(run_dir).sample_images("test", n_verify) if run_dir else ([], "no run given")
        if not images:
            from qpmcli.images import synthetic_images

            reason = v_source
            images = synthetic_images(min(n_verify, 64), meta.image_size)
            v_source = (f"{len(images)} synthetic images ({reason}; pass --verify-images DIR to verify on real "
                        f"images)")
    x_verify = preprocess_batch(images, meta)
    calib = c_source = None
    if calibrate is not None:
        if calibrate == "train":
            if run_dir is None:
                raise ConfigError("--calibrate train needs the run; pass --calibrate DIR")
            c_images, c_source = RunFolder(run_dir).sample_images("train", n_calibrate)
            if not c_images:
                raise ConfigError(f"--calibrate train: {c_source}; pass --calibrate DIR (a folder of images)")
        else:
            if not Path(calibrate).expanduser().exists():
                raise ConfigError(f"--calibrate {calibrate}: expected 'train' or an existing folder of images")
            c_images, c_source = folder_images([calibrate], n_calibrate, "--calibrate")
        calib = preprocess_batch(c_images, meta)
    return build_int8(src, out, x_verify, verify_source=v_source, calibration=calib, calibration_source=c_source,
                      min_agreement=min_agreement, optimization=optimization, log=log)

"""Fast inference: one :class:`Classifier` interface over a run directory (PyTorch) and an exported ``.onnx`` file
(ONNX Runtime), plus ``qpm predict`` (top-k classes and the features that drove the top class, per image).

Why one interface: ``qpm predict`` and ``qpm explain`` need the same things from a model whatever its format: its
metadata (class names, selected features, W, mu, sigma, preprocessing, backbone, grid) and
``run(images) -> {logits [B, C], maps [B, K, h, w], features [B, K]}`` as numpy. An ONNX file carries the metadata in
its ``metadata_props`` (the format of :mod:`qpmcli.modelfile`, written by :mod:`qpmcli.export`), so the file alone is
enough; the ONNX path imports neither torch nor timm, and preprocessing is :func:`qpmcli.images.preprocess_array`, the
numpy function that :func:`qpmcli.backbone.preprocess_image` also uses. This module only reads models.

Execution providers: ``device="auto"`` uses CUDA (with IO binding) when a GPU and the CUDA EP are present, else the
CPU; ``"tensorrt"`` opts into the TensorRT EP. :attr:`Classifier.provider` names the provider that actually ran.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpmcli.device import check_device, ort_providers, torch_device
from qpmcli.errors import ArtifactError, ConfigError, ImageError, QpmError
from qpmcli.images import list_images, preprocess_array
from qpmcli.modelfile import ClassifierMetadata, decode_onnx_metadata, metadata_from_run, softmax
from qpmcli.progress import progress_bar

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

DEVICES = ("auto", "cpu", "cuda", "tensorrt")


# --------------------------------------------------------------------------------------------------- classifiers
class Classifier(ABC):
    """A ready-to-run classifier: ``.metadata``, ``.provider``, ``.run(images)``, ``.run_array(x)``.

    ``run`` takes PIL images (any mode/size) and returns numpy ``logits [B, C]``, ``maps [B, K, h, w]`` (selected
    feature maps) and ``features [B, K]`` (pooled, un-standardised). ``kind`` is ``"torch"`` or ``"onnx"``.
    """

    kind: str = ""
    path: Path
    metadata: ClassifierMetadata
    provider: str = ""

    def preprocess(self, images: Sequence[Any]) -> np.ndarray:
        """PIL images -> float32 batch ``[B, 3, H, W]`` with the model's own preprocessing."""
        import numpy as np

        if not images:
            raise ConfigError("no images to preprocess")
        return np.stack([preprocess_array(im, self.metadata.preprocess) for im in images])

    def run(self, images: Sequence[Any]) -> dict[str, np.ndarray]:
        """Preprocess and classify a batch of PIL images."""
        return self.run_array(self.preprocess(list(images)))

    @abstractmethod
    def run_array(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Classify an already preprocessed batch ``[B, 3, H, W]`` (float32)."""

    @property
    def precision(self) -> str:
        """``fp32``, or the precision an exported file records in its metadata (``fp16``, ``int8``)."""
        return str(self.metadata.extra.get("precision", "fp32"))

    def describe(self) -> dict[str, Any]:
        return {"model": str(self.path), "kind": self.kind, "provider": self.provider, "precision": self.precision,
                "backbone": self.metadata.backbone, "classes": self.metadata.n_classes,
                "features": self.metadata.n_features}


class TorchClassifier(Classifier):
    """A run directory: the frozen backbone (rebuilt by name, digest checked) + the trained QPMModel, in PyTorch."""

    kind = "torch"

    def __init__(self, path: Path, backbone: Any, model: Any, metadata: ClassifierMetadata, device: str) -> None:
        self.path = path
        self.backbone = backbone
        self.model = model.eval()
        self.metadata = metadata
        self.device = device
        self.provider = f"torch-{device}"

    def run_array(self, x: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            xt = torch.from_numpy(x).to(self.device)
            cls, patches = self.backbone(xt)
            out = self.model(torch.cat([cls[:, None], patches], dim=1))
        return {"logits": out.logits.float().cpu().numpy(), "maps": out.maps.float().cpu().numpy(),
                "features": out.features.float().cpu().numpy()}


class OnnxClassifier(Classifier):
    """An exported ``.onnx`` file run by ONNX Runtime; metadata from the file's ``metadata_props``.

    A full graph takes the preprocessed image; an adapter-only graph takes tokens ``[B, 1 + h*w, D]`` (CLS first):
    for it :meth:`run_tokens` works directly, and :meth:`run` rebuilds the backbone in PyTorch from the metadata.
    """

    kind = "onnx"

    def __init__(self, path: Path, session: Any, metadata: ClassifierMetadata, graph: str,
                 io_binding: bool, backbone_loader: Callable[[], Any] | None = None) -> None:
        self.path = path
        self.session = session
        self.metadata = metadata
        self.graph = graph
        self.provider = session.get_providers()[0]
        self.io_binding = io_binding
        self.input_name = session.get_inputs()[0].name
        self.output_names = [o.name for o in session.get_outputs()]
        self._backbone_loader = backbone_loader
        self._backbone: Any = None

    def _session_run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        import numpy as np

        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.io_binding:
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.input_name, x)
            for name in self.output_names:
                binding.bind_output(name, "cuda")
            self.session.run_with_iobinding(binding)
            outs = binding.copy_outputs_to_cpu()
        else:
            outs = self.session.run(self.output_names, {self.input_name: x})
        return {n: np.asarray(o, dtype=np.float32) for n, o in zip(self.output_names, outs, strict=True)}

    def run_array(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if self.graph == "adapter":
            return self.run_tokens(self._tokens(x))
        return self._session_run(x)

    def run_tokens(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Adapter-only graphs: classify backbone tokens ``[B, 1 + h*w, D]`` extracted elsewhere (CLS first)."""
        if self.graph != "adapter":
            raise ConfigError(f"{self.path} is a full (image-input) graph; use run(images) or the .adapter.onnx file")
        return self._session_run(tokens)

    def _tokens(self, x: np.ndarray) -> np.ndarray:
        import torch

        if self._backbone is None:
            if self._backbone_loader is None:
                raise ConfigError(f"{self.path} is an adapter-only graph and no backbone is available")
            self._backbone = self._backbone_loader()
        with torch.inference_mode():
            cls, patches = self._backbone(torch.from_numpy(x))
            return torch.cat([cls[:, None], patches], dim=1).cpu().numpy()


# ----------------------------------------------------------------------------------------------------- loading
def load_classifier(model_path: str | os.PathLike[str], device: str = "auto", *, weights: str | None = None,
                    settings: Any = None) -> Classifier:
    """Open a run directory (PyTorch) or an ``.onnx`` file (ONNX Runtime) as a :class:`Classifier`.

    ``device``: ``auto`` (CUDA when present), ``cpu``, ``cuda``/``cuda:N``, or ``tensorrt`` (ONNX only, opt-in).
    ``weights`` (run directories and adapter graphs): the backbone weights file; by default it is looked up like in
    training (settings' weights folder, local caches), and runs trained on random weights rebuild them. The loaded
    backbone's weights digest must equal the run's.
    """
    path = Path(model_path).expanduser()
    check_device(device, tensorrt=True)
    if path.is_dir():
        return _load_run(path, device, weights=weights, settings=settings)
    if path.is_file() and path.suffix.lower() == ".onnx":
        return _load_onnx(path, device, weights=weights, settings=settings)
    if path.is_file():
        raise ArtifactError(f"{path} is neither a run directory nor an .onnx file; pass a run folder or model.onnx")
    raise ArtifactError(f"model {path} does not exist; pass a run directory or an .onnx file from `qpm export`")


def _load_run(path: Path, device: str, *, weights: str | None, settings: Any) -> TorchClassifier:
    from qpmcli.artifact import load_model
    from qpmcli.backbone import load_run_backbone
    from qpmcli.prototypes import embedded_prototypes

    if settings is None:
        from qpmcli.settings import resolve_settings

        settings, _ = resolve_settings()
    dev = torch_device(device)
    model, info = load_model(path, "final", device=dev)
    meta = metadata_from_run(model, info, run_dir=path)
    try:  # the same {feature_id: [...]} document an exported file embeds
        meta.prototypes = embedded_prototypes(path)
    except QpmError:
        meta.prototypes = None  # broken prototypes must not stop predictions; `qpm explain --class` says why
    backbone = load_run_backbone(info, weights=weights, settings=settings, device=dev)
    return TorchClassifier(path, backbone, model, meta, dev)


def make_session(path: Path, device: str) -> tuple[Any, bool]:
    """An ONNX Runtime session for ``path`` on ``device`` (see :func:`load_classifier`) and whether to use IO
    binding; a file ONNX Runtime cannot load is an :class:`ArtifactError`."""
    import onnxruntime as ort

    providers, io_binding = ort_providers(device)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # warnings about unused initialisers or EP fallbacks are noise for users
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable/invalid graphs
        raise ArtifactError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0][:300]}") from exc
    io_binding = io_binding and session.get_providers()[0] != "CPUExecutionProvider"
    return session, io_binding


def _load_onnx(path: Path, device: str, *, weights: str | None, settings: Any) -> OnnxClassifier:
    session, io_binding = make_session(path, device)
    meta, graph = decode_onnx_metadata(session.get_modelmeta().custom_metadata_map, path)
    from qpmcli.modelfile import check_graph

    check_graph(meta, graph, session.get_inputs()[0].shape, {o.name: o.shape for o in session.get_outputs()}, path)
    loader = None
    if graph == "adapter":
        info = {"backbone": meta.backbone, "weights_digest": meta.weights_digest, "preprocess": meta.preprocess,
                "image_size": list(meta.image_size), "backbone_options": meta.extra.get("backbone_options") or {},
                "dataset": meta.extra.get("dataset")}

        def loader() -> Any:
            s = settings
            if s is None:
                from qpmcli.settings import resolve_settings

                s, _ = resolve_settings()
            from qpmcli.backbone import load_run_backbone

            return load_run_backbone(info, weights=weights, settings=s, device="cpu")

    return OnnxClassifier(path, session, meta, graph, io_binding, backbone_loader=loader)


# ------------------------------------------------------------------------------------------------------ predict
def describe_prediction(meta: ClassifierMetadata, logits: np.ndarray, features: np.ndarray, *, top_k: int = 5,
                        n_features: int = 5) -> dict[str, Any]:
    """One image's result: top-k classes with probabilities and the features that drove the top class.

    Features are those with a nonzero weight for the top class (all 5 for QPM), ordered by contribution
    ``W[c, j] * (f_j - mu_j) / sigma_j`` (largest first); ``feature`` is the index into the dense adapter's features,
    ``name`` its best name (``qpm name-features``; ``None`` without one) and ``label`` how it is printed
    (:meth:`~qpmcli.modelfile.ClassifierMetadata.feature_label`).
    """
    import numpy as np

    probs = softmax(logits[None])[0]
    order = np.argsort(-logits, kind="stable")[: max(1, min(top_k, meta.n_classes))]
    top = int(order[0])
    contrib = meta.contributions(features[None], top)[0]
    cand = np.flatnonzero(meta.weight[top] != 0)
    cand = cand[np.argsort(-contrib[cand], kind="stable")][:n_features]
    return {
        "top_k": [{"class": meta.class_names[i], "index": int(i), "probability": float(probs[i]),
                   "logit": float(logits[i])} for i in order],
        "features": [{"feature": int(meta.features[j]), "name": meta.feature_name(meta.features[j]),
                      "label": meta.feature_label(meta.features[j]), "position": int(j),
                      "weight": float(meta.weight[top, j]), "activation": float(features[j]),
                      "contribution": float(contrib[j])} for j in cand],
    }


def predict(inputs: Sequence[str | os.PathLike[str]], model: str | os.PathLike[str] | Classifier, *,
            top_k: int = 5, batch_size: int = 16, device: str = "auto", weights: str | None = None,
            settings: Any = None, progress: bool = False, coverage: float | None = None,
            set_score: str | None = None) -> dict[str, Any]:
    """Classify images/folders; unreadable images are reported per file and do not stop the batch.

    Returns ``{"model", "kind", "provider", "precision", "num_images", "num_failed", "predictions": [{"path",
    "top_k": [{class, index, probability, logit}], "features": [{feature, name, label, position, weight, activation,
    contribution}]} or {"path", "error"}]}`` in input order. With ``coverage`` (e.g. 0.9) every prediction also has
    ``set`` (class names, best first) and ``set_detail`` (:func:`qpmcli.conformal.prediction_set`), and the result
    ``calibration`` (the entry used: ``qpm conformal``'s, with alpha = 1 - coverage and ``set_score`` if given).
    """
    from qpmcli.conformal import check_coverage, prediction_set, select_calibration

    if top_k < 1:
        raise ConfigError("--top-k must be at least 1")
    if batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    if coverage is not None:
        check_coverage(coverage)
    paths = list_images(inputs)  # a missing file is reported per image, like a corrupt one
    if not paths:
        raise ImageError("no images found in the given files/folders")
    clf = model if isinstance(model, Classifier) else load_classifier(model, device, weights=weights,
                                                                      settings=settings)
    calibration = None if coverage is None else select_calibration(
        clf.metadata, coverage, set_score, model=str(clf.path), onnx=clf.kind == "onnx")
    from qpmcli.images import open_image

    results: list[dict[str, Any] | None] = [None] * len(paths)
    pending: list[tuple[int, Any]] = []

    def flush() -> None:
        if not pending:
            return
        try:
            x = clf.preprocess([im for _, im in pending])
            out = clf.run_array(x)
        except QpmError:
            raise
        except Exception as exc:  # a runtime failure of the batch (e.g. GPU out of memory): say which files
            raise ArtifactError(f"inference failed on a batch of {len(pending)} images: {exc}") from exc
        for row, (i, _) in enumerate(pending):
            results[i] = {"path": str(paths[i]), **describe_prediction(
                clf.metadata, out["logits"][row], out["features"][row], top_k=top_k)}
            if calibration is not None:
                detail = prediction_set(calibration, clf.metadata, out["logits"][row], out["features"][row])
                results[i].update(set=detail["set"], set_detail=detail)
        pending.clear()

    with progress_bar(enabled=progress, stderr=True) as bar:
        task = bar.add_task("predict", total=len(paths))
        for i, p in enumerate(paths):
            try:
                pending.append((i, open_image(p)))
            except ImageError as exc:
                results[i] = {"path": str(p), "error": str(exc)}
            if len(pending) >= batch_size:
                flush()
            bar.update(task, completed=i + 1)
        flush()
    done = [r for r in results if r is not None]
    failed = sum(1 for r in done if "error" in r)
    out = {"model": str(clf.path), "kind": clf.kind, "provider": clf.provider, "precision": clf.precision,
           "num_images": len(done), "num_failed": failed, "predictions": done}
    if calibration is not None:
        out["calibration"] = {k: calibration.get(k) for k in ("alpha", "coverage", "score", "per_class", "level",
                                                              "n", "threshold", "source", "test")}
    return out

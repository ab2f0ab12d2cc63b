"""The portable model format: what a trained classifier *is*, independent of PyTorch, ONNX Runtime or a run folder.

One module owns the format so that every reader and writer agrees on it:

- :class:`ClassifierMetadata`: class names, selected features, the sparse head (``W``, ``mu``, ``sigma``, ``bias``),
  preprocessing, backbone name and weights digest, image size, token grid and the prototypes document. It carries the
  head arithmetic (:meth:`~ClassifierMetadata.standardize`, :meth:`~ClassifierMetadata.contributions`,
  :meth:`~ClassifierMetadata.evidence_weights`) so that predict, explain and a server compute the same numbers;
- :func:`metadata_from_run`: builds it from a loaded run model (``qpmcli.artifact.load_model``);
- :func:`encode_onnx_metadata` / :func:`decode_onnx_metadata`: the ONNX ``metadata_props`` encoding
  (``qpm.<field>`` -> JSON text, format :data:`ONNX_FORMAT` version :data:`FORMAT_VERSION`; the prototypes under
  :data:`PROTOTYPES_KEY`), and :func:`read_onnx_metadata` to read it from a file;
- a run's calibrations (``<run>/conformal.json``, the document of :mod:`qpmcli.calibfile`, checked against the
  model) as :attr:`ClassifierMetadata.conformal`, and hence as ``qpm.conformal`` in ONNX metadata;
- the prototypes document: ``<run>/prototypes/prototypes.json`` (:data:`PROTOTYPES_FORMAT`, written by
  :mod:`qpmcli.prototypes`) and its embedded form ``{"<feature id>": [{"png_b64", "class", "activation",
  "patch_box"}, ...]}`` (:func:`embed_prototypes`, :func:`parse_prototypes`);
- a run's feature names (:func:`run_feature_names`, the document of :mod:`qpmcli.featurenames`) as
  :attr:`ClassifierMetadata.feature_names`, printed by :meth:`ClassifierMetadata.feature_label`.

This module imports only :mod:`qpmcli.errors`, :mod:`qpmcli.featurenames`, :mod:`qpmcli.calibfile` and
:mod:`qpmcli.version` from the package (the bottom of the import graph), and neither torch nor numpy nor matplotlib
(numpy, onnx and onnxruntime are imported inside the functions that need them), so ``qpm predict model.onnx`` and
``qpm serve`` start fast.

Writers: :mod:`qpmcli.export` (ONNX files), :mod:`qpmcli.prototypes` (the prototypes folder). Readers:
:mod:`qpmcli.predict` (``Classifier.metadata``), :mod:`qpmcli.explain` (renders from a :class:`ClassifierMetadata`).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpmcli.calibfile import CONFORMAL_JSON, check_conformal, read_conformal
from qpmcli.errors import ArtifactError, validation_problems
from qpmcli.featurenames import (
    FEATURE_NAMES_JSON,
    feature_names_of,
    parse_feature_names,
    read_feature_names_document,
    weights_fingerprint,
)

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = [
    "EMBEDDED_PROTOTYPE_FIELDS", "FORMAT_VERSION", "MAX_PROTOTYPE_BYTES", "META_PREFIX", "ONNX_FORMAT",
    "PROTOTYPES_FORMAT", "PROTOTYPES_FORMAT_VERSION", "PROTOTYPES_JSON", "PROTOTYPES_KEY", "SIGMA_MIN",
    "ClassifierMetadata", "decode_onnx_metadata", "embed_prototypes", "encode_onnx_metadata", "metadata_from_run",
    "parse_prototypes", "read_onnx_metadata", "read_onnx_props", "run_feature_names", "softmax",
    "check_graph", "confined", "validate_model_document", "validate_onnx_document",
]

# ---------------------------------------------------------------------------------------------------- constants
ONNX_FORMAT = "qpm-onnx"  # value of the ``qpm.format`` metadata entry of every exported graph
FORMAT_VERSION = 1  # value of ``qpm.format_version``; bump when a reader of version N could misread a new file
MODEL_FORMAT_VERSION = 1  # ``format_version`` of a run's model.json/dense.json (artifact.save_model writes it)
META_PREFIX = "qpm."  # metadata_props keys: "qpm.<field>" -> JSON text (fields of ClassifierMetadata.to_json())
PROTOTYPES_KEY = "qpm_prototypes"  # metadata_props key of the embedded prototypes document (JSON text)
SIGMA_MIN = 1e-6  # METHOD.md §3.3 / B4: the sparse head's sigma clamp, max(sigma, SIGMA_MIN)

PROTOTYPES_JSON = "prototypes.json"  # the index file inside <run>/prototypes/
PROTOTYPES_FORMAT = "qpm-prototypes"  # its "format" entry
PROTOTYPES_FORMAT_VERSION = 1  # its "format_version" entry
EMBEDDED_PROTOTYPE_FIELDS = ("png_b64", "class", "activation", "patch_box")  # per entry, in an embedded document
MAX_PROTOTYPE_BYTES = 8 << 20  # larger embedded documents are not written into ONNX metadata


# ------------------------------------------------------------------------------------------------------ metadata
@dataclass
class ClassifierMetadata:
    """Everything needed to preprocess, predict and explain, independent of the model format.

    ``features`` are the selected indices into the dense adapter's n_f features (``range(n_f)`` for a dense model),
    ``weight [C, K]`` the class-feature matrix (binary for QPM), ``mu``/``sigma [K]`` the frozen standardisation
    (0/1 for a dense head), ``bias [C]`` or ``None``. ``preprocess`` is the backbone's preprocessing config
    (mode, size, mean, std, interpolation, minmax; see :func:`qpmcli.images.preprocess_array`). ``prototypes`` is the
    embedded prototypes document ``{feature_id (str): [{"png_b64", "class", "activation", ...}]}`` or ``None``.
    ``extra`` holds optional facts (dataset, head, model config, metrics, ``precision`` of an ONNX file,
    ``standardized: False`` for a head without mu/sigma). ``feature_names`` (``None`` when the model has none) maps
    a dense feature id to ``{"names": [best first], "user": bool (names[0] was set by a person), "support",
    "stability", "alignment": [one value per name, None for a person's name]}`` (``qpm name-features``); every
    surface prints a feature as :meth:`feature_label`. ``conformal`` is the calibration document (the run's
    ``conformal.json``: :func:`read_conformal`) or ``None`` for a model without a calibration.

    The head computes ``logits = W @ ((f - mu) / max(sigma, SIGMA_MIN)) + bias`` on pooled features ``f [B, K]``.
    """

    class_names: list[str]
    features: list[int]
    weight: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    bias: np.ndarray | None
    preprocess: dict[str, Any]
    backbone: str
    weights_digest: str
    image_size: tuple[int, int]
    grid: tuple[int, int]
    qpm_version: str = ""
    embed_dim: int | None = None
    prototypes: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    feature_names: dict[int, dict[str, Any]] | None = None
    conformal: dict[str, Any] | None = None

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def standardized(self) -> bool:
        """False for a head built from a bare ``weight`` (no mu/sigma): its z-scores are the raw features."""
        return bool(self.extra.get("standardized", True))

    def standardize(self, features: np.ndarray, dtype: Any = None) -> np.ndarray:
        """``(f - mu) / max(sigma, SIGMA_MIN)``: the head's input, on pooled features ``[B, K]`` or ``[K]``.

        Computed in ``dtype`` (default float32, the dtype the models run in; explain uses float64).
        """
        import numpy as np

        dt = np.float32 if dtype is None else dtype
        mu = np.asarray(self.mu, dtype=dt)
        sigma = np.maximum(np.asarray(self.sigma, dtype=dt), SIGMA_MIN)
        return (np.asarray(features, dtype=dt) - mu) / sigma

    def contributions(self, features: np.ndarray, class_index: int | Sequence[int], dtype: Any = None) -> np.ndarray:
        """Per-feature contribution to a class logit: ``W[c, j] * (f_j - mu_j) / sigma_j`` -> ``[B, K]``.

        ``class_index`` is one class for all rows or one per row. The contributions plus ``bias[c]`` sum to logit c.
        """
        import numpy as np

        z = self.standardize(np.atleast_2d(features), dtype)
        cls = np.broadcast_to(np.asarray(class_index, dtype=np.int64), (z.shape[0],))
        weight = self.weight if dtype is None else np.asarray(self.weight, dtype=dtype)
        return weight[cls] * z

    def evidence_weights(self, class_index: int, dtype: Any = None) -> np.ndarray:
        """``W[c, k] / max(sigma_k, SIGMA_MIN)`` ``[K]``: weights of the feature maps in a class's per-location
        evidence ``sum_k W[c, k] * F_k / sigma_k`` (whose spatial mean minus ``W[c] @ (mu / sigma)`` is the logit)."""
        import numpy as np

        dt = np.float64 if dtype is None else dtype
        sigma = np.maximum(np.asarray(self.sigma, dtype=dt), SIGMA_MIN)
        return np.asarray(self.weight[class_index], dtype=dt) / sigma

    def feature_name(self, feature_id: int) -> str | None:
        """The best name of dense feature ``feature_id`` (a person's name wins), or ``None`` when it has no stable
        name (or the model has no names)."""
        entry = (self.feature_names or {}).get(int(feature_id))
        return str(entry["names"][0]) if entry and entry.get("names") else None

    def feature_label(self, feature_id: int) -> str:
        """How every surface (figures, HTML, predict, serve) prints a feature: ``"f12 red circle"``, or ``"f12"``
        when it has no name."""
        name = self.feature_name(feature_id)
        return f"f{int(feature_id)}" if name is None else f"f{int(feature_id)} {name}"

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (the ONNX metadata fields and ``--json`` output); ``prototypes`` are not included."""
        return {
            "class_names": list(self.class_names), "features": [int(i) for i in self.features],
            "weight": self.weight.tolist(), "mu": self.mu.tolist(), "sigma": self.sigma.tolist(),
            "bias": None if self.bias is None else self.bias.tolist(), "preprocess": self.preprocess,
            "backbone": self.backbone, "weights_digest": self.weights_digest, "image_size": list(self.image_size),
            "grid": list(self.grid), "qpm_version": self.qpm_version, "embed_dim": self.embed_dim,
            "extra": self.extra,
            "feature_names": None if self.feature_names is None else
            {str(fid): entry for fid, entry in sorted(self.feature_names.items())},
            "conformal": self.conformal,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], prototypes: dict[str, Any] | None = None) -> ClassifierMetadata:
        """Inverse of :meth:`to_json`; an incomplete document or disagreeing shapes are an :class:`ArtifactError`."""
        import numpy as np

        try:
            bias = doc.get("bias")
            meta = cls(
                class_names=[str(c) for c in doc["class_names"]], features=[int(i) for i in doc["features"]],
                weight=np.asarray(doc["weight"], dtype=np.float32), mu=np.asarray(doc["mu"], dtype=np.float32),
                sigma=np.asarray(doc["sigma"], dtype=np.float32),
                bias=None if bias is None else np.asarray(bias, dtype=np.float32),
                preprocess=dict(doc["preprocess"]), backbone=str(doc["backbone"]),
                weights_digest=str(doc["weights_digest"]), image_size=tuple(int(v) for v in doc["image_size"]),
                grid=tuple(int(v) for v in doc["grid"]), qpm_version=str(doc.get("qpm_version", "")),
                embed_dim=doc.get("embed_dim"), prototypes=prototypes, extra=dict(doc.get("extra") or {}),
                conformal=doc.get("conformal"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"model metadata is incomplete or malformed: {exc!r}") from exc
        meta.check_shapes()
        if doc.get("feature_names") is not None:
            meta.feature_names = parse_feature_names(doc["feature_names"], meta.features, "the model's feature names")
        if meta.conformal is not None:
            check_conformal(meta.conformal, meta, "the model's 'qpm.conformal' metadata")
        return meta

    def check_shapes(self) -> None:
        """``weight [C, K]``, ``mu``/``sigma [K]`` and ``bias [C]`` must agree with the class and feature lists."""
        k = len(self.features)
        bias = None if self.bias is None else self.bias.shape
        if self.weight.shape != (self.n_classes, k) or self.mu.shape != (k,) or self.sigma.shape != (k,) or \
                bias not in (None, (self.n_classes,)):
            raise ArtifactError(f"model metadata shapes disagree: W {self.weight.shape}, mu {self.mu.shape}, "
                                f"sigma {self.sigma.shape}, bias {bias} for {self.n_classes} classes and {k} "
                                f"features")

    @classmethod
    def from_head(cls, head: Mapping[str, Any]) -> ClassifierMetadata:
        """A metadata object from a plain mapping holding at least ``weight`` (the form explain's pure functions
        accept): ``features`` default to the columns, class names to the row numbers, a missing ``mu``/``sigma``
        means no standardisation (``extra["standardized"] = False``). Arrays keep their precision."""
        import numpy as np

        if "weight" not in head:
            raise ArtifactError("the model metadata has no class-feature weight matrix ('weight')")
        w = np.asarray(head["weight"], dtype=np.float64)
        c, k = w.shape
        ids = head.get("features")
        ids = [int(i) for i in ids] if ids is not None else list(range(k))
        if len(ids) != k:
            raise ArtifactError(f"the model metadata lists {len(ids)} features but its weight has {k} columns")
        standardized = head.get("mu") is not None and head.get("sigma") is not None
        mu = np.asarray(head["mu"], dtype=np.float64).reshape(-1) if standardized else np.zeros(k)
        sigma = np.asarray(head["sigma"], dtype=np.float64).reshape(-1) if standardized else np.ones(k)
        bias = head.get("bias")
        bias = None if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
        names = head.get("class_names")
        grid = head.get("grid") or (0, 0)
        size = head.get("image_size") or (0, 0)
        named = head.get("feature_names")
        return cls(class_names=[str(n) for n in (names if names is not None else range(c))], features=ids,
                   weight=w, mu=mu, sigma=sigma, bias=bias,
                   preprocess=dict(head.get("preprocess") or {}), backbone=str(head.get("backbone") or ""),
                   weights_digest=str(head.get("weights_digest") or ""), image_size=(int(size[0]), int(size[1])),
                   grid=(int(grid[0]), int(grid[1])), prototypes=head.get("prototypes"),
                   extra={} if standardized else {"standardized": False},
                   feature_names=None if named is None else parse_feature_names(named, ids, "feature_names"))

    @classmethod
    def coerce(cls, meta: ClassifierMetadata | Mapping[str, Any]) -> ClassifierMetadata:
        """``meta`` itself, or :meth:`from_head` of a mapping."""
        return meta if isinstance(meta, ClassifierMetadata) else cls.from_head(meta)


def metadata_from_run(model: Any, info: Mapping[str, Any],
                      run_dir: str | os.PathLike[str] | None = None) -> ClassifierMetadata:
    """Metadata of a loaded run model (``qpmcli.artifact.load_model`` output), sparse or dense head.

    ``model`` is a :class:`qpmcli.model.QPMModel` (only its tensors are read; torch is not imported here), ``info``
    the stage's JSON document (``model.json``). A run without backbone/preprocess facts is an :class:`ArtifactError`.
    ``run_dir`` (the run folder) adds what the run holds beside the model: its feature names
    (:func:`run_feature_names`) and its calibrations (``conformal.json``, when present:
    :attr:`~ClassifierMetadata.conformal`; one that is malformed or belongs to another model is an
    :class:`ArtifactError`).
    """
    import numpy as np

    from qpmcli.version import qpm_version

    def arr(t: Any) -> np.ndarray:
        return np.asarray(t.detach().cpu().numpy(), dtype=np.float32)

    if getattr(model, "is_sparse", False):
        features = [int(i) for i in model.sel_index.tolist()]
        weight, mu, sigma = arr(model.sel_weight), arr(model.sel_mu), arr(model.sel_sigma)
        bias_t = getattr(model, "sel_bias", None)
    else:  # dense head (e.g. the linear probe): contributions are W[c, j] * f_j
        features = list(range(model.n_features))
        weight = arr(model.linear.weight)
        mu = np.zeros(model.n_features, dtype=np.float32)
        sigma = np.ones(model.n_features, dtype=np.float32)
        bias_t = model.linear.bias
    n_classes = int(model.n_classes)
    names = info.get("class_names") or [str(i) for i in range(n_classes)]
    preprocess = info.get("preprocess")
    if not preprocess or "backbone" not in info:
        raise ArtifactError("the run's model.json lacks backbone/preprocess information; retrain or re-save the run")
    extra = {k: info[k] for k in ("dataset", "head", "backbone_options", "metrics", "seed", "selection_result")
             if k in info}  # selection_result: status/objective/bound/gap of the feature selection (qpm serve)
    extra["model"] = info.get("model")
    meta = ClassifierMetadata(
        class_names=[str(c) for c in names], features=features, weight=weight, mu=mu, sigma=sigma,
        bias=None if bias_t is None else arr(bias_t), preprocess=dict(preprocess), backbone=str(info["backbone"]),
        weights_digest=str(info.get("weights_digest")),
        image_size=tuple(int(v) for v in info.get("image_size", preprocess["size"])),
        grid=tuple(int(v) for v in info.get("grid", model.grid)), qpm_version=qpm_version(),
        embed_dim=info.get("embed_dim", getattr(model, "embed_dim", None)), extra=extra)
    if run_dir is not None:
        meta.feature_names = run_feature_names(run_dir, info, features)
        if (Path(run_dir) / CONFORMAL_JSON).is_file():
            meta.conformal = read_conformal(Path(run_dir) / CONFORMAL_JSON, meta)
    return meta


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in the input's floating dtype."""
    import numpy as np

    z = np.asarray(logits)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------------- ONNX metadata
def encode_onnx_metadata(meta: ClassifierMetadata, graph: str,
                         prototypes: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The ``metadata_props`` entries of an exported graph (all values JSON text).

    ``qpm.format`` = :data:`ONNX_FORMAT`, ``qpm.format_version`` = :data:`FORMAT_VERSION`, ``qpm.graph`` =
    ``graph`` (``"full"``: image input, ``"adapter"``: token input), then every field of
    :meth:`ClassifierMetadata.to_json` as ``qpm.<field>``; ``prototypes`` (an embedded document) under
    :data:`PROTOTYPES_KEY`.
    """
    props = {META_PREFIX + "format": json.dumps(ONNX_FORMAT),
             META_PREFIX + "format_version": json.dumps(FORMAT_VERSION), META_PREFIX + "graph": json.dumps(graph)}
    for key, value in meta.to_json().items():
        props[META_PREFIX + key] = json.dumps(value)
    if prototypes is not None:
        props[PROTOTYPES_KEY] = json.dumps(prototypes, separators=(",", ":"))
    return props


def decode_onnx_metadata(props: Mapping[str, str], source: str | os.PathLike[str] = "the model"
                         ) -> tuple[ClassifierMetadata, str]:
    """``(metadata, graph kind)`` from ``metadata_props`` (written by :func:`encode_onnx_metadata`).

    ``source`` names the file in error messages. A file without qpm metadata, malformed JSON or an incomplete
    document is an :class:`ArtifactError`. ``metadata.extra["precision"]`` is ``"fp32"`` unless the file says else.
    """
    try:
        doc = {k[len(META_PREFIX):]: json.loads(v) for k, v in props.items() if k.startswith(META_PREFIX)}
    except (ValueError, RecursionError) as exc:  # bad JSON, or nested beyond reason
        raise ArtifactError(f"{source} has malformed qpm metadata: {str(exc) or type(exc).__name__}") from exc
    if doc.get("format") != ONNX_FORMAT:
        raise ArtifactError(f"{source} has no qpm metadata; export it with `qpm export RUN --onnx`")
    check_format_version(doc, FORMAT_VERSION, source, default=1)
    validate_onnx_document(doc, source)
    prototypes = None
    if PROTOTYPES_KEY in props:
        try:
            prototypes = json.loads(props[PROTOTYPES_KEY])
        except (ValueError, RecursionError) as exc:
            raise ArtifactError(f"{source} has malformed prototypes metadata: {exc}") from exc
    meta = ClassifierMetadata.from_json(doc, prototypes=prototypes)
    meta.extra.setdefault("precision", doc.get("precision", "fp32"))
    return meta, str(doc.get("graph", "full"))


def read_onnx_props(path: str | os.PathLike[str]) -> dict[str, str]:
    """An ONNX file's ``metadata_props`` without running anything (the onnx package, else ONNX Runtime)."""
    p = Path(path)
    try:
        import onnx

        model = onnx.load(str(p), load_external_data=False)
        return {entry.key: entry.value for entry in model.metadata_props}
    except ImportError:
        import onnxruntime as ort

        try:
            sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
            raise ArtifactError(f"cannot read ONNX file {p}: {exc}") from exc
        return dict(sess.get_modelmeta().custom_metadata_map)
    except Exception as exc:  # a corrupt protobuf
        raise ArtifactError(f"cannot read ONNX file {p}: {exc}") from exc


def read_onnx_metadata(path: str | os.PathLike[str]) -> tuple[ClassifierMetadata, str]:
    """``(metadata, graph kind)`` of an exported ``.onnx`` file (no torch; no inference session)."""
    return decode_onnx_metadata(read_onnx_props(path), path)


# -------------------------------------------------------------------------------------------- prototypes document
def embed_prototypes(prototypes: Mapping[int, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The embedded (ONNX metadata) form: string feature ids, only :data:`EMBEDDED_PROTOTYPE_FIELDS` per entry."""
    return {str(fid): [{k: e[k] for k in EMBEDDED_PROTOTYPE_FIELDS if k in e} for e in entries]
            for fid, entries in prototypes.items()}


def parse_prototypes(raw: Any) -> dict[int, list[dict[str, Any]]]:
    """An embedded document (JSON text or already parsed) as ``{feature_id (int): [entry, ...]}``."""
    try:
        doc = json.loads(raw) if isinstance(raw, str | bytes) else raw
        out = {}
        for fid, entries in doc.items():
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise ValueError(f"feature {fid!s:.20}: expected a list of objects")
            if len(str(fid)) > 18:  # a feature id is a small index; int() of thousands of digits is refused anyway
                raise ValueError(f"feature id {str(fid)[:20]}... is not an index")
            out[int(fid)] = [dict(e) for e in entries]
        return out
    except (ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise ArtifactError(f"the model's '{PROTOTYPES_KEY}' metadata is malformed: {exc}") from exc


# ------------------------------------------------------------------------------------------ feature names
def run_feature_names(run_dir: str | os.PathLike[str], info: Mapping[str, Any], features: Sequence[int]
                      ) -> dict[int, dict[str, Any]] | None:
    """The feature names of a run's final model from ``<run>/feature_names.json``, or ``None`` when the run has
    none or they were computed for an earlier model of the run (its weights file changed since: retrained).

    A damaged file is an :class:`ArtifactError` that says how to recover.
    """
    path = Path(run_dir) / FEATURE_NAMES_JSON
    if not path.is_file():
        return None
    doc = read_feature_names_document(path)
    weights = confined(run_dir, info.get("weights_file", "model.safetensors"), "model.json weights_file")
    if doc["model"].get("weights_sha256") != weights_fingerprint(weights) or \
            sorted(doc["model"].get("features", [])) != sorted(int(f) for f in features):
        return None
    return feature_names_of(doc, features, str(path))


# ------------------------------------------------------------------------------------------ paths inside a run
def confined(base: str | os.PathLike[str], name: Any, what: str) -> Path:
    """``base / name`` for a file name read from an artifact, refused unless it stays inside ``base``.

    ``..``, absolute paths and symlinks leading out are resolved before the check, so a tampered ``model.json``
    (``weights_file``), ``prototypes.json`` (``file``) or checkpoint record cannot make qpm read, and then embed or
    load, a file outside its run. ``what`` names the entry in the :class:`ArtifactError`.
    """
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise ArtifactError(f"{what} must be a file name inside {base}, not {name!r}")
    root = Path(base).resolve()
    target = (root / name).resolve()
    if target == root or not target.is_relative_to(root):
        raise ArtifactError(f"{what} {name!r} points outside {base}; a run only reads its own files (the run was "
                            f"edited or damaged: re-save or retrain it)")
    return target


# ------------------------------------------------------------------------------------------ validation at load
@functools.cache
def _schemas() -> dict[str, Any]:
    """pydantic models of the run files and the ONNX metadata (built on first use: pydantic stays off the import
    path of ``qpm --help``)."""
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

    Pair = tuple[PositiveInt, PositiveInt]

    class Open(BaseModel):
        model_config = ConfigDict(extra="allow", strict=False)

    def size_problems(preprocess: Any, image_size: Any) -> list[str]:
        """The one rule both documents share: preprocess.size is the image size (when both are given)."""
        if preprocess is None or image_size is None or tuple(preprocess.size) == tuple(image_size):
            return []
        return [f"image_size {list(image_size)} but preprocess.size is {list(preprocess.size)}"]

    def raise_problems(problems: list[str]) -> None:
        if problems:
            raise ValueError("; ".join(problems))

    class Preprocess(Open):
        size: Pair
        mean: tuple[float, float, float]
        std: tuple[PositiveFloat, PositiveFloat, PositiveFloat]

    class Selection(Open):
        features: list[NonNegativeInt]

    class ModelConfig(Open):
        embed_dim: PositiveInt
        n_classes: PositiveInt
        grid: Pair
        n_features: PositiveInt
        selection: Selection | None = None

        @model_validator(mode="after")
        def _features_exist(self) -> ModelConfig:
            if self.selection is not None:
                f = self.selection.features
                if not f or len(set(f)) != len(f) or max(f) >= self.n_features:
                    raise ValueError(f"selection.features must be distinct indices below n_features "
                                     f"({self.n_features}), not {f}")
            return self

    class ModelDocument(Open):
        """``model.json`` / ``dense.json``: what ``artifact.save_model`` writes (plus train's info)."""

        format: Literal["qpm-model"]
        format_version: int
        stage: str
        weights_file: str
        model: ModelConfig
        grid: Pair
        n_classes: PositiveInt
        class_names: list[str] | None = None
        backbone: str | None = None
        weights_digest: str | None = None
        preprocess: Preprocess | None = None
        image_size: Pair | None = None
        embed_dim: PositiveInt | None = None

        @model_validator(mode="after")
        def _consistent(self) -> ModelDocument:
            problems = []
            if self.model.n_classes != self.n_classes:
                problems.append(f"n_classes {self.n_classes} but the model has {self.model.n_classes} classes")
            if self.class_names is not None and len(self.class_names) != self.n_classes:
                problems.append(f"class_names lists {len(self.class_names)} names for {self.n_classes} classes")
            if tuple(self.grid) != tuple(self.model.grid):
                problems.append(f"grid {list(self.grid)} but the model's grid is {list(self.model.grid)}")
            if self.embed_dim is not None and self.embed_dim != self.model.embed_dim:
                problems.append(f"embed_dim {self.embed_dim} but the model takes {self.model.embed_dim}")
            raise_problems(problems + size_problems(self.preprocess, self.image_size))
            return self

    class OnnxDocument(Open):
        """The ``qpm.*`` metadata of an exported graph (:func:`encode_onnx_metadata`)."""

        format: Literal["qpm-onnx"]
        format_version: int = 1
        graph: Literal["full", "adapter"] = "full"
        class_names: list[str]
        features: list[NonNegativeInt]
        weight: list[list[float]]
        mu: list[float]
        sigma: list[float]
        bias: list[float] | None = None
        preprocess: Preprocess
        backbone: str
        weights_digest: str
        image_size: Pair
        grid: Pair
        embed_dim: PositiveInt | None = None

        @model_validator(mode="after")
        def _consistent(self) -> OnnxDocument:
            c, k = len(self.class_names), len(self.features)
            problems = []
            if c == 0:
                problems.append("class_names is empty")
            if len(self.weight) != c or any(len(row) != k for row in self.weight):
                problems.append(f"weight must be {c} x {k} (classes x features)")
            if len(self.mu) != k or len(self.sigma) != k:
                problems.append(f"mu and sigma must have {k} entries (one per feature)")
            if self.bias is not None and len(self.bias) != c:
                problems.append(f"bias must have {c} entries (one per class)")
            raise_problems(problems + size_problems(self.preprocess, self.image_size))
            return self

    return {"model": ModelDocument, "onnx": OnnxDocument}


def check_format_version(doc: Mapping[str, Any], supported: int, source: str | os.PathLike[str], *,
                         key: str = "format_version", default: int | None = None) -> int:
    """The document's format version, refused (:class:`ArtifactError`, one line naming both versions) when it is
    newer than ``supported`` -- a newer qpm wrote it, and reading it as version ``supported`` could silently misread
    it -- or not a positive integer. ``default``: the version of documents written before the field existed."""
    from qpmcli.version import qpm_version

    version = doc.get(key, default)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ArtifactError(f"{source}: {key} must be a positive integer, not {version!r}")
    if version > supported:
        raise ArtifactError(f"{source} has format version {version}, but this qpm ({qpm_version()}) reads format "
                            f"version {supported} and older; upgrade qpm (pip install -U qpm) to read it")
    return version


def validate_model_document(doc: Any, source: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a run's ``model.json``/``dense.json`` once, at load: types, shapes and cross-field agreement (class
    names vs classes, grid, image size, selected features). Returns ``doc``; every problem found is listed in one
    :class:`ArtifactError` line."""
    from pydantic import ValidationError

    if not isinstance(doc, dict):
        raise ArtifactError(f"{source} must hold a JSON object (a qpm model description), not a JSON "
                            f"{type(doc).__name__}")
    check_format_version(doc, MODEL_FORMAT_VERSION, source)  # before the schema: a newer file may differ anywhere
    try:
        _schemas()["model"].model_validate(doc)
    except ValidationError as exc:
        raise ArtifactError(f"{source} is not a valid qpm model description: {validation_problems(exc)}") from exc
    return doc


def validate_onnx_document(doc: Mapping[str, Any], source: str | os.PathLike[str]) -> None:
    """Check the decoded ``qpm.*`` metadata of an ONNX file (see :func:`validate_model_document`)."""
    from pydantic import ValidationError

    try:
        _schemas()["onnx"].model_validate(dict(doc))
    except ValidationError as exc:
        raise ArtifactError(f"{source} has invalid qpm metadata: {validation_problems(exc)}") from exc


def check_graph(meta: ClassifierMetadata, graph: str, inputs: Sequence[Sequence[Any]],
                outputs: Mapping[str, Sequence[Any]], source: str | os.PathLike[str]) -> None:
    """The ONNX graph's input/output shapes (static dims; named dims are free) must match its metadata: a graph
    paired with another run's ``qpm.*`` metadata is refused instead of failing later with an IndexError.

    ``inputs``: the first input's shape; ``outputs``: ``{"logits": shape, "maps": shape, "features": shape}``.
    """
    h, w = meta.grid
    k, c = meta.n_features, meta.n_classes
    if graph == "adapter":
        want_in = [None, 1 + h * w, meta.embed_dim]
    else:
        want_in = [None, 3, meta.image_size[0], meta.image_size[1]]
    want = {"logits": [None, c], "maps": [None, k, h, w], "features": [None, k]}
    problems = []
    for name, got, exp in [("input", list(inputs), want_in)] + [(n, list(outputs.get(n, [])), e)
                                                                for n, e in want.items()]:
        if name != "input" and name not in outputs:
            problems.append(f"the graph has no output {name!r}")
            continue
        if len(got) != len(exp) or any(isinstance(g, int) and e is not None and g != e
                                       for g, e in zip(got, exp, strict=False)):
            problems.append(f"{name} shape {got} does not fit the metadata ({exp}, None = any)")
    if problems:
        raise ArtifactError(f"{source}: its graph does not match its qpm metadata ({'; '.join(problems)}); the "
                            f"metadata belongs to another model")

"""The calibration document: ``<run>/conformal.json``, written by ``qpm conformal`` (:mod:`qpmcli.calibrate`).

``{"format": "qpm-conformal", "format_version", "model": {"fingerprint", "classes", "features"}, "calibrations":
[entry, ...]}``; an entry holds ``alpha``, ``coverage``, ``score`` (:data:`CONFORMAL_SCORES`), ``per_class``,
``level`` (hier), ``n``, ``threshold`` or ``thresholds`` (per class), the seed, its ``source`` (the calibration split)
and the ``test`` measurement. :func:`model_fingerprint` names the model a document belongs to (the same for a run and
its ONNX files); :func:`check_conformal` checks a document against the model it is used with and
:func:`read_conformal` reads a run's file. The document travels as
:attr:`qpmcli.modelfile.ClassifierMetadata.conformal` (``qpm.conformal`` in ONNX metadata).

Like :mod:`qpmcli.featurenames`, this module imports only :mod:`qpmcli.errors` from the package (the model format,
:mod:`qpmcli.modelfile`, imports it), and pydantic and numpy only inside the functions that need them.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Protocol

from qpmcli.errors import ArtifactError, validation_problems


class ClassifierMetadata(Protocol):
    """What a calibration document is checked against: the facts of :class:`qpmcli.modelfile.ClassifierMetadata` it
    reads (a protocol, so that this module does not import the model format that imports it)."""

    class_names: list[str]
    features: Any
    weight: Any
    mu: Any
    sigma: Any
    bias: Any

    @property
    def n_classes(self) -> int: ...

__all__ = ["CONFORMAL_FORMAT", "CONFORMAL_FORMAT_VERSION", "CONFORMAL_JSON", "CONFORMAL_SCORES", "check_conformal",
           "model_fingerprint", "read_conformal"]

CONFORMAL_JSON = "conformal.json"  # a run's calibrations (``qpm conformal``); artifact.CONFORMAL
CONFORMAL_FORMAT = "qpm-conformal"  # its "format" entry
CONFORMAL_FORMAT_VERSION = 1  # its "format_version" entry
CONFORMAL_SCORES = ("lac", "aps", "hier")  # the nonconformity scores of qpmcli.conformal


def model_fingerprint(meta: ClassifierMetadata) -> str:
    """A short SHA-256 of what decides a calibration's scores: class names, selected features and the head (``W``,
    ``mu``, ``sigma``, ``bias`` as float32 bytes). A run and every ONNX file exported from it give the same value, so
    a calibration document names the model it belongs to."""
    import hashlib

    import numpy as np

    h = hashlib.sha256(json.dumps([list(meta.class_names), [int(i) for i in meta.features]]).encode("utf-8"))
    for arr in (meta.weight, meta.mu, meta.sigma, meta.bias):
        h.update(b"none" if arr is None else np.ascontiguousarray(arr, dtype=np.float32).tobytes())
    return h.hexdigest()[:24]


@functools.cache
def _schema() -> Any:
    """The pydantic model of a calibration document (built on first use)."""
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt

    class Open(BaseModel):
        model_config = ConfigDict(extra="allow", strict=False)

    class Entry(Open):
        alpha: float = Field(gt=0.0, lt=1.0)
        score: Literal[CONFORMAL_SCORES]  # type: ignore[valid-type]
        per_class: bool = False
        level: NonNegativeInt | None = None
        n: NonNegativeInt
        threshold: float | None = None
        thresholds: list[float | None] | None = None

    class Model(Open):
        fingerprint: str
        classes: PositiveInt

    class Document(Open):
        format: Literal["qpm-conformal"]
        format_version: PositiveInt
        model: Model
        calibrations: list[Entry]

    return Document


def check_conformal(doc: Any, meta: ClassifierMetadata, source: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a calibration document against the model it is used with: its schema, that it names this model
    (:func:`model_fingerprint`), and that per-class thresholds and hierarchy levels fit the head. Returns ``doc``;
    every problem is one :class:`ArtifactError` line."""
    from pydantic import ValidationError

    if not isinstance(doc, dict):
        raise ArtifactError(f"{source} must hold a JSON object (a qpm calibration), not a JSON {type(doc).__name__}")
    try:
        parsed = _schema().model_validate(doc)
    except ValidationError as exc:
        raise ArtifactError(f"{source} is not a valid qpm calibration: {validation_problems(exc)}") from exc
    if parsed.format_version > CONFORMAL_FORMAT_VERSION:
        raise ArtifactError(f"{source} has calibration format version {parsed.format_version}; this qpm reads "
                            f"{CONFORMAL_FORMAT_VERSION}: upgrade qpm")
    own = model_fingerprint(meta)
    if parsed.model.fingerprint != own or parsed.model.classes != meta.n_classes:
        raise ArtifactError(f"{source} belongs to another model (fingerprint {parsed.model.fingerprint}, this model's "
                            f"is {own}); delete it and calibrate this model with `qpm conformal`")
    per_class_features = int((meta.weight != 0).sum(axis=1).max()) if meta.weight.size else 0
    for i, entry in enumerate(parsed.calibrations):
        if entry.per_class and (entry.thresholds is None or len(entry.thresholds) != meta.n_classes):
            raise ArtifactError(f"{source}: calibration {i} is per class but does not list {meta.n_classes} "
                                f"thresholds")
        if entry.score == "hier" and (entry.level is None or entry.level > per_class_features):
            raise ArtifactError(f"{source}: calibration {i} (hier) needs a level between 0 and {per_class_features}")
    return doc


def read_conformal(path: str | os.PathLike[str], meta: ClassifierMetadata) -> dict[str, Any]:
    """A run's ``conformal.json``, checked against ``meta`` (:func:`check_conformal`)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise ArtifactError(f"{p} is not readable JSON: {exc}") from exc
    return check_conformal(doc, meta, p)

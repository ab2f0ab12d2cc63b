"""The feature-names document: ``<run>/feature_names.json`` (written by :mod:`qpmcli.naming`, ``qpm name-features``)
and its form in a model's metadata, ``{"<feature id>": {"names", "user", "support", "stability", "alignment"}}``
(:attr:`qpmcli.modelfile.ClassifierMetadata.feature_names`, the ONNX entry ``qpm.feature_names``).

The file::

    {"format": "qpm-feature-names", "format_version": 1, "qpm_version",
     "model": {"features": [selected dense ids], "weights_sha256": SHA-256 of model.safetensors},
     "source": "dataset cub200" | "attributes labels.csv" | null, "images", "attributes", "settings",
     "user_names": {"<feature id>": name}, "named": count,
     "features": [{"feature", "column", "names" (best first), "user", "support", "stability", "alignment", "note"}],
     "classes": {class name: [its feature ids]}}

``user`` marks a first name set by a person; ``support``/``stability``/``alignment`` hold one value per name
(``None`` for a person's name). Like :mod:`qpmcli.modelfile`, this module imports only :mod:`qpmcli.errors`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qpmcli.errors import ArtifactError

__all__ = ["FEATURE_NAMES_FORMAT", "FEATURE_NAMES_FORMAT_VERSION", "FEATURE_NAMES_JSON", "MAX_NAME_CHARS",
           "clean_feature_name", "feature_names_of", "parse_feature_names", "read_feature_names_document",
           "weights_fingerprint"]

FEATURE_NAMES_JSON = "feature_names.json"  # <run>/feature_names.json (qpmcli.artifact.FEATURE_NAMES)
FEATURE_NAMES_FORMAT = "qpm-feature-names"  # its "format" entry
FEATURE_NAMES_FORMAT_VERSION = 1  # its "format_version" entry
MAX_NAME_CHARS = 120  # a feature name longer than this is refused (figures and tables show names in one line)


def clean_feature_name(value: Any, where: str) -> str:
    """A feature name as stored: one line of printable text, at most :data:`MAX_NAME_CHARS` characters."""
    if not isinstance(value, str) or not value.strip():
        raise ArtifactError(f"{where}: a feature name must be non-empty text, not {value!r}")
    text = " ".join(value.split())
    if len(text) > MAX_NAME_CHARS or not text.isprintable():
        raise ArtifactError(f"{where}: feature name {text[:40]!r}... must be printable text of at most "
                            f"{MAX_NAME_CHARS} characters")
    return text


def parse_feature_names(raw: Any, features: Sequence[int] | None = None, source: str = "feature names"
                        ) -> dict[int, dict[str, Any]]:
    """The metadata form ``{"<feature id>": {"names", "user", "support", "stability", "alignment"}}`` (JSON text or
    parsed) as ``{feature_id: entry}``, checked: names are one-line texts, the per-name lists have one value per
    name, and (when ``features`` is given) every id is one of the model's features. Malformed: :class:`ArtifactError`.
    """
    try:
        doc = json.loads(raw) if isinstance(raw, str | bytes) else raw
        items = list(doc.items())
    except (ValueError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"{source} are malformed: {exc}") from exc
    allowed = None if features is None else {int(f) for f in features}
    out: dict[int, dict[str, Any]] = {}
    for key, entry in items:
        where = f"{source}, feature {key}"
        try:
            fid = int(key)
        except (TypeError, ValueError):
            raise ArtifactError(f"{source}: {key!r} is not a feature id") from None
        if allowed is not None and fid not in allowed:
            raise ArtifactError(f"{source} name feature {fid}, which the model does not have (they belong to "
                                f"another model)")
        if not isinstance(entry, Mapping) or not isinstance(entry.get("names"), list):
            raise ArtifactError(f"{where}: expected an object with a 'names' list")
        names = [clean_feature_name(n, where) for n in entry["names"]]
        clean: dict[str, Any] = {"names": names, "user": bool(entry.get("user", False))}
        for key2, kind in (("support", int), ("stability", float), ("alignment", float)):
            values = entry.get(key2, [None] * len(names))
            if not isinstance(values, list) or len(values) != len(names):
                raise ArtifactError(f"{where}: '{key2}' must list one value per name")
            try:
                clean[key2] = [None if v is None else kind(v) for v in values]
            except (TypeError, ValueError):
                raise ArtifactError(f"{where}: '{key2}' must hold numbers") from None
        if entry.get("note") is not None:
            clean["note"] = str(entry["note"])
        out[fid] = clean
    return out


def weights_fingerprint(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a model's weights file: what a run's feature names record of the model they describe."""
    import hashlib

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise ArtifactError(f"cannot read the model weights {path}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def read_feature_names_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``<run>/feature_names.json`` parsed and checked (format, version, a ``features`` list, the ``model`` it
    describes); its per-feature entries are checked by :func:`feature_names_of`."""
    hint = f"rerun `qpm name-features {Path(path).parent}` or delete the file"
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is unreadable ({exc}); {hint}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FEATURE_NAMES_FORMAT:
        raise ArtifactError(f"{path} is not a qpm feature-names file; {hint}")
    if doc.get("format_version") != FEATURE_NAMES_FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {doc.get('format_version')!r}; this qpm reads version "
                            f"{FEATURE_NAMES_FORMAT_VERSION}; {hint}")
    if not isinstance(doc.get("features"), list) or not isinstance(doc.get("model"), dict):
        raise ArtifactError(f"{path} lacks its 'features' list or 'model' entry; {hint}")
    return doc


def feature_names_of(doc: Mapping[str, Any], features: Sequence[int] | None = None, source: str = "feature names"
                     ) -> dict[int, dict[str, Any]]:
    """``{feature_id: entry}`` from a feature-names document's ``features`` list (entries with ``"feature"``)."""
    try:
        raw = {str(int(e["feature"])): e for e in doc["features"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{source}: every entry of 'features' needs a feature id ({exc!r})") from exc
    return parse_feature_names(raw, features, source)

"""Runs made from another run (``qpm edit``, ``qpm add-class``): the parent's class-feature head read without torch,
the output-folder rule, the parent's digest, which parent files carry over, and the write-aside-then-rename that
leaves nothing half-written and never touches the parent.

A child run is a complete run folder (every command works on it) plus ``edit.json`` (:data:`qpmcli.artifact.EDIT`):
the parent's path and digest, the operations and the diff. Parent files are carried over by an allowlist
(:data:`PARENT_FILES`); everything else (exports, calibrations such as ``conformal.json``, checkpoints, files we do
not know) stays behind, because it describes the parent's model, not the child's.

Core layer: numpy and safetensors are imported inside functions; no torch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpmcli.artifact import (
    CONFIG,
    DENSE,
    DENSE_FEATURES,
    DENSE_JSON,
    EDIT,
    LOG_CSV,
    LOG_JSONL,
    MODEL,
    MODEL_JSON,
    PROTOTYPES,
    atomic_write_json,
    read_json,
)
from qpmcli.errors import ArtifactError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

EDIT_FORMAT = "qpm-edit"  # edit.json's "format"
EDIT_FORMAT_VERSION = 1
# Parent files that stay valid for a child whatever the edit changed: the training request and caches, the dense
# model and its pooled features (the selection problem), the training log.
PARENT_FILES = (CONFIG, DENSE, DENSE_JSON, DENSE_FEATURES, LOG_JSONL, LOG_CSV)
FEATURE_NAMES = "feature_names.json"  # `qpm name-features`: carried only while the adapter and the features stay


# ---------------------------------------------------------------------------------------------- the parent's head
@dataclass
class ParentHead:
    """The class-feature layer of a finished QPM run, read from ``model.json`` + ``model.safetensors`` (numpy).

    ``features`` are the dense feature ids in the model's column order, ``weight`` the binary ``W [C, K]``, ``n_dense``
    the adapter's feature count n_f (every id in ``0..n_dense-1`` is computed by the adapter), ``per_class`` k.
    """

    run: Path
    info: dict[str, Any]
    class_names: list[str]
    features: np.ndarray
    weight: np.ndarray
    n_dense: int
    per_class: int
    has_bias: bool

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def row(self, c: int, weight: np.ndarray | None = None) -> list[int]:
        """Class ``c``'s dense feature ids (in column order) under ``weight`` (default: the parent's)."""
        import numpy as np

        w = self.weight if weight is None else weight
        return [int(self.features[j]) for j in np.flatnonzero(w[c])]


def read_head(run: str | os.PathLike[str]) -> ParentHead:
    """The head of ``run`` (a finished QPM run: binary W, exactly k features per class); anything else is an
    :class:`ArtifactError` saying what the run is instead."""
    import numpy as np

    from qpmcli.modelfile import confined, validate_model_document

    run = Path(run).expanduser()
    if not run.is_dir():
        raise ArtifactError(f"run directory {run} does not exist")
    if not (run / MODEL_JSON).is_file():
        raise ArtifactError(f"{run} has no {MODEL_JSON}: it is not a finished run (train it with qpm train)")
    info = read_json(run / MODEL_JSON)
    if not isinstance(info, dict) or info.get("format") != "qpm-model" or "model" not in info:
        raise ArtifactError(f"{run / MODEL_JSON} is not a qpm model description")
    validate_model_document(info, run / MODEL_JSON)
    sel = info.get("selection") or {}
    if not sel.get("features"):
        raise ArtifactError(f"{run} has a dense head (no feature selection); edit and add-class need a QPM run")
    if sel.get("trainable_norm"):
        raise ArtifactError(f"{run} has an SLDD/Q-SENN head (real-valued W); edit and add-class need a QPM run "
                            f"(binary class-feature matrix)")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    weights = confined(run, info.get("weights_file", MODEL), f"{MODEL_JSON} weights_file")
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError) as exc:
        raise ArtifactError(f"{weights} is not a readable safetensors file: {exc}") from exc
    if "sel_weight" not in state:
        raise ArtifactError(f"{weights} holds no class-feature matrix (sel_weight); the run is damaged")
    W = np.asarray(state["sel_weight"], dtype=np.float64)
    names = [str(c) for c in info.get("class_names") or []]
    feats = np.asarray(sel["features"], dtype=np.int64)
    if W.shape != (len(names), len(feats)):
        raise ArtifactError(f"{weights}: W is {W.shape} for {len(names)} classes and {len(feats)} features")
    if not np.isin(W, (0.0, 1.0)).all():
        raise ArtifactError(f"{run} has a real-valued class-feature matrix; edit and add-class need a QPM run "
                            f"(binary W)")
    counts = W.sum(1).astype(int)
    per_class = int(counts.max()) if counts.size else 0
    return ParentHead(run=run, info=info, class_names=names, features=feats, weight=W.astype(bool),
                      n_dense=int(info["model"].get("n_features", 0)), per_class=per_class,
                      has_bias=bool(sel.get("has_bias")))


def duplicate_rows(weight: np.ndarray) -> tuple[int, int] | None:
    """The first pair of classes with the same feature set in ``weight [C, K]``, or ``None``."""
    seen: dict[bytes, int] = {}
    for c, row in enumerate(weight):
        key = bytes(row.astype(bool))
        if key in seen:
            return seen[key], c
        seen[key] = c
    return None


def feature_label(meta: Any, fid: int) -> str:
    """How a feature is printed: the metadata's own label (``f12 red circle`` once ``qpm name-features`` has named
    it) where the metadata offers one, else ``f12``."""
    label = getattr(meta, "feature_label", None)
    return str(label(int(fid))) if callable(label) else f"f{int(fid)}"


# ------------------------------------------------------------------------------------------------------ digests
def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the tensors of a safetensors file (names sorted, each name, dtype, shape and bytes): equal for equal
    weights, whatever order the file's metadata was serialised in (safetensors writes it in hash-map order)."""
    import numpy as np
    from safetensors.numpy import load_file

    digest = hashlib.sha256()
    for name, arr in sorted(load_file(str(path)).items()):
        arr = np.ascontiguousarray(arr)
        digest.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def model_digest(run: str | os.PathLike[str]) -> dict[str, str]:
    """SHA-256 of a run's model files (``model.safetensors``, ``model.json``) and of the two together (``digest``)."""
    run = Path(run)
    files = {name: file_sha256(run / name) for name in (MODEL, MODEL_JSON)}
    files["digest"] = hashlib.sha256("".join(files[n] for n in (MODEL, MODEL_JSON)).encode()).hexdigest()
    return files


# ----------------------------------------------------------------------------------------------- output folder
def check_out(out: str | os.PathLike[str] | None, parent: str | os.PathLike[str], *, force: bool = False,
              flag: str = "--out") -> Path:
    """The folder a child run goes to. Refused: none given, the parent itself, a folder inside the parent or holding
    it, an existing file, and a non-empty folder that is not a child run (``edit.json``) unless ``force``."""
    from qpmcli.checks import check_out_dir

    if out is None or not str(out).strip():
        raise ConfigError(f"{flag} NEW_RUN is required: edits write a new run and never change the parent")
    p = Path(out).expanduser()
    check_out_dir(p, flag)
    target, source = p.resolve(), Path(parent).expanduser().resolve()
    if target == source:
        raise ConfigError(f"{flag} {p} is the parent run itself; edits never change their parent: choose a new folder")
    if target.is_relative_to(source):
        raise ConfigError(f"{flag} {p} lies inside the parent run {parent}; choose a folder outside it")
    if source.is_relative_to(target):
        raise ConfigError(f"{flag} {p} holds the parent run {parent}; choose a folder that does not contain it")
    if p.is_dir() and any(p.iterdir()) and not (p / EDIT).is_file() and not force:
        raise ConfigError(f"{flag} {p} already holds files that are not a run made by qpm edit or add-class; choose "
                          f"a new folder, or pass --force to replace them")
    return p


@contextmanager
def staged_run(out: Path) -> Iterator[Path]:
    """Yield an empty folder next to ``out``; when the block succeeds it takes ``out``'s place (an existing ``out``
    is replaced), otherwise it is deleted and ``out`` is untouched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(stage, 0o777 & ~mask)  # mkdtemp makes 0700 folders; give the run the usual permissions
    try:
        yield stage
        old = None
        if out.exists() or out.is_symlink():
            old = stage.with_name(stage.name.removesuffix(".partial") + ".old")
            os.replace(out, old)
        try:
            os.replace(stage, out)
        except OSError:
            if old is not None:
                os.replace(old, out)
            raise
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- carrying
def carry_parent_files(parent: Path, child: Path) -> list[str]:
    """Copy :data:`PARENT_FILES` (those the parent has) into ``child``; returns their names."""
    copied = []
    for name in PARENT_FILES:
        src = parent / name
        if src.is_file():
            shutil.copyfile(src, child / name)
            copied.append(name)
    return copied


def carry_prototypes(parent: Path, child: Path) -> bool:
    """Copy the parent's ``prototypes/`` folder (valid while the adapter and the selected features are unchanged)."""
    src = parent / PROTOTYPES
    if not src.is_dir():
        return False
    shutil.copytree(src, child / PROTOTYPES, symlinks=False)
    return True


def carry_feature_names(parent: Path, child: Path) -> str | None:
    """Copy ``feature_names.json`` re-pointed at the child's weights file (its names describe adapter channels; the
    caller carries it only when the adapter and the selected features are those of the parent). Returns a note when
    the file exists but cannot be carried, else ``None``."""
    src = parent / FEATURE_NAMES
    if not src.is_file():
        return None
    try:
        doc = read_json(src)
    except ArtifactError as exc:
        return f"{FEATURE_NAMES} not carried: {exc}"
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        return f"{FEATURE_NAMES} not carried: not a feature-names document"
    doc["model"]["weights_sha256"] = file_sha256(child / MODEL)
    atomic_write_json(child / FEATURE_NAMES, doc)
    return None


def edit_record(kind: str, parent: Path, parent_digest: dict[str, str], **fields: Any) -> dict[str, Any]:
    """The ``edit.json`` document: format, kind (``edit`` or ``add-class``), the parent and ``fields``."""
    import time

    from qpmcli.version import qpm_version

    return {"format": EDIT_FORMAT, "format_version": EDIT_FORMAT_VERSION, "kind": kind, "qpm_version": qpm_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "parent": {"path": str(Path(parent).resolve()), "digest": parent_digest}, **fields}


def child_info(info: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The parent's ``model.json`` entries a child keeps (class names, backbone, preprocessing, ...), without what
    :func:`qpmcli.artifact.save_model` rewrites or what described the parent's model only; plus ``extra``."""
    drop = {"format", "format_version", "stage", "weights_file", "model", "selection", "n_classes",
            "metrics", "selection_result", "versions", "edit"}
    return {**{k: v for k, v in info.items() if k not in drop}, **extra}

"""Run directories and model artifacts: safetensors + JSON only (never pickle), every write atomic.

A run directory (docs/design.md "Artifacts")::

    config.json  dense.safetensors dense.json  selection.json  model.safetensors model.json  metrics.json
    log.jsonl log.csv  dense_features.npz  checkpoints/  feature_names.json  conformal.json
    edit.json (runs made by qpm edit / add-class)

``model.json`` / ``dense.json`` carry everything needed to predict and explain without the data: the model config
(including the selected features), backbone name and weights digest, preprocessing, image size, grid, class names,
metrics and library versions. ``load_model(run_dir)`` rebuilds the :class:`qpmcli.model.QPMModel` from them.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpmcli.calibfile import CONFORMAL_JSON
from qpmcli.errors import ArtifactError, ConfigError, QpmError
from qpmcli.featurenames import FEATURE_NAMES_JSON
from qpmcli.files import TEMP_FILE_RE, FolderLock, read_regular_bytes
from qpmcli.modelfile import MODEL_FORMAT_VERSION

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from qpmcli.model import QPMModel

CONFIG = "config.json"
DENSE = "dense.safetensors"
DENSE_JSON = "dense.json"
SELECTION = "selection.json"
MODEL = "model.safetensors"
MODEL_JSON = "model.json"
METRICS = "metrics.json"
LOG_JSONL = "log.jsonl"
LOG_CSV = "log.csv"
DENSE_FEATURES = "dense_features.npz"
CHECKPOINTS = "checkpoints"
PROTOTYPES = "prototypes"
FORMAT_VERSION = MODEL_FORMAT_VERSION  # of model.json / dense.json (the reader refuses newer ones)

STAGE_FILES = {"dense": (DENSE, DENSE_JSON), "final": (MODEL, MODEL_JSON)}
ONNX_MODEL = "model.onnx"  # qpm export's default output inside the run
STALE = "stale.json"  # written by `qpm select --force` when it replaces a finetuned run's selection.json
PROTOTYPES_PARTIAL = ".prototypes.partial"  # prototypes/ while it is being written
FEATURE_NAMES = FEATURE_NAMES_JSON  # `qpm name-features` (qpmcli/naming.py); its format: qpmcli.featurenames
EDIT = "edit.json"  # a run made from another by `qpm edit` / `qpm add-class` (qpmcli/childrun.py): parent, diff
CONFORMAL = CONFORMAL_JSON  # `qpm conformal`'s calibrations (format owned by qpmcli.calibfile)
LOCK = ".qpm.lock"  # the run-folder lock (:func:`run_lock`): who holds it (pid, command, host, since)

# The files of a run folder (the one list: ``qpm select -o`` refuses them, writers that must not replace a run's own
# files check it). Commands that add a run file append its name here.
RUN_FILES: tuple[str, ...] = (CONFIG, DENSE, DENSE_JSON, SELECTION, MODEL, MODEL_JSON, METRICS, LOG_JSONL, LOG_CSV,
                              DENSE_FEATURES, STALE, ONNX_MODEL, EDIT, FEATURE_NAMES, CONFORMAL)
RUN_FOLDERS: tuple[str, ...] = (CHECKPOINTS, PROTOTYPES)
_RUN_FILE_PATTERNS = (re.compile(r"selection-\d+\.json"),  # earlier Q-SENN iterations (iteration_files)
                      re.compile(r"model(\.fp16)?(\.adapter|\.int8)?\.onnx"))  # qpm export's siblings of model.onnx


def is_run_file(name: str) -> bool:
    """Whether ``name`` is one of the files a run folder holds (:data:`RUN_FILES`, a Q-SENN iteration's selection,
    an exported model's sibling)."""
    return name in RUN_FILES or name in RUN_FOLDERS or any(p.fullmatch(name) for p in _RUN_FILE_PATTERNS)


def checkpoint_json(phase: str) -> str:
    """``checkpoints/<phase>.json``: a training phase's checkpoint state (step, RNG, the tensor file it uses)."""
    return f"{phase}.json"


def checkpoint_data(phase: str, epoch: int, step: int) -> str:
    """``checkpoints/<phase>-<epoch>-<step>.safetensors``: the tensors of one checkpoint."""
    return f"{phase}-{int(epoch)}-{int(step)}.safetensors"


def is_checkpoint_data(name: str, phase: str) -> bool:
    """Whether ``name`` is a :func:`checkpoint_data` file of ``phase``."""
    prefix, suffix = f"{phase}-", ".safetensors"
    if not (name.startswith(prefix) and name.endswith(suffix)):
        return False
    parts = name[len(prefix):-len(suffix)].split("-")
    return len(parts) == 2 and all(p.isdigit() for p in parts)


def iteration_files(iteration: int, iterations: int) -> tuple[str, str, str]:
    """``(selection, state JSON, weights)`` file names of select/finetune iteration ``iteration`` (0-based) of
    ``iterations``: the last one writes ``selection.json``; earlier ones (Q-SENN) ``selection-<i>.json`` and keep their
    finished state as ``checkpoints/iteration-<i>.json`` + ``.safetensors``."""
    tag = "" if iterations == 1 else f"-{iteration + 1}"
    last = iteration == iterations - 1
    return (SELECTION if last else f"selection{tag}.json", f"iteration{tag}.json", f"iteration{tag}.safetensors")


# -------------------------------------------------------------------------------------------------- the run folder
@dataclass(frozen=True)
class RunRecord:
    """How a run was made, as its ``config.json`` records it (the ``request`` of ``qpm train``), typed. Runs written
    by other tools may hold only part of it: missing fields are ``None`` (``head`` defaults to ``qpm``)."""

    backbone: str | None = None
    dataset: str | None = None
    data_root: str | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    head: str = "qpm"
    selector: str | None = None
    seed: int | None = None

    @classmethod
    def from_request(cls, request: Any, source: str = "config.json") -> RunRecord:
        """The record of a ``config.json`` ``request`` mapping; wrong value types are one :class:`ArtifactError`."""
        if not isinstance(request, dict):
            raise ArtifactError(f"{source}: 'request' must be an object, not {type(request).__name__}")
        types = {"backbone": str, "dataset": str, "data_root": str, "dataset_options": dict, "head": str,
                 "selector": str, "seed": int}
        values: dict[str, Any] = {}
        for name, typ in types.items():
            value = request.get(name)
            if value is None:
                continue
            if not isinstance(value, typ) or isinstance(value, bool):
                raise ArtifactError(f"{source}: request {name!r} must be {typ.__name__}, not {value!r}"[:300])
            values[name] = value
        return cls(**values)


class RunFolder:
    """A run directory: typed access to its files, so that no module reads ``config.json`` by hand.

    ``run / name`` is the path of a run file (names are the constants of this module). Reads are validated and
    raise :class:`ArtifactError` with one line.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def is_run(self) -> bool:
        """Whether the folder holds a run (its ``config.json``)."""
        return (self.path / CONFIG).is_file()

    def config(self) -> dict[str, Any]:
        """``config.json`` (resolved settings, the request, the token caches)."""
        doc = read_json(self.path / CONFIG)
        if not isinstance(doc, dict):
            raise ArtifactError(f"{self.path / CONFIG} is not a JSON object")
        return doc

    def record(self) -> RunRecord:
        """How the run was made (:class:`RunRecord`); an empty record when it has no ``config.json``."""
        if not self.is_run:
            return RunRecord()
        return RunRecord.from_request(self.config().get("request", {}), str(self.path / CONFIG))

    def cache_paths(self) -> dict[str, Path]:
        """The token caches the run was trained on (``{"train": path, "test": path}``; empty when none recorded)."""
        caches = self.config().get("caches") or {}
        if not isinstance(caches, dict) or not all(isinstance(v, str) for v in caches.values()):
            raise ArtifactError(f"{self.path / CONFIG}: 'caches' must map split names to folders")
        return {str(k): Path(v) for k, v in caches.items()}

    def calibration_split(self) -> dict[str, Any] | None:
        """The calibration split ``qpm train --cal-fraction`` held out of training (``config.json``'s
        ``calibration_split``: fraction, seed, rows; read by :func:`qpmcli.conformal.held_out_rows`), or ``None``."""
        split = self.config().get("calibration_split") if self.is_run else None
        if split is not None and not isinstance(split, dict):
            raise ArtifactError(f"{self.path / CONFIG}: 'calibration_split' must be an object, not {split!r}"[:300])
        return split or None

    def class_names(self) -> list[str] | None:
        """The class names that ``model.json``, ``dense.json`` or ``config.json`` lists (the first that does)."""
        for name in (MODEL_JSON, DENSE_JSON, CONFIG):
            if not (self.path / name).is_file():
                continue
            try:
                doc = read_json(self.path / name)
            except ArtifactError:
                continue
            found = doc.get("class_names") if isinstance(doc, dict) else None
            if isinstance(found, list) and found:
                return [str(c) for c in found]
        return None

    def dataset(self, split: str, settings: Any = None) -> Any:
        """The run's dataset (name, root and options from its record) for ``split``; a run that names no dataset, or
        a dataset that cannot be opened here, is a :class:`QpmError`."""
        from qpmcli.data import load_dataset

        rec = self.record()
        if rec.dataset is None:
            raise ArtifactError(f"{self.path} has no config.json naming its dataset")
        return load_dataset(rec.dataset, root=rec.data_root, split=split, settings=settings, **rec.dataset_options)

    def sample_images(self, split: str, n: int) -> tuple[list[Any], str]:
        """Up to ``n`` images spread evenly over the run's ``split`` and where they came from, or ``([], why not)``
        when the dataset cannot be opened here (a missing data root is not an error for a sample)."""
        try:
            ds = self.dataset(split)
            total = len(ds)
            if total == 0:
                return [], f"the {split} split of {self.record().dataset} is empty"
            idx = sorted({int(i * total / min(n, total)) for i in range(min(n, total))})
            return [ds[i].image for i in idx], f"{len(idx)} images of {self.record().dataset} ({split} split)"
        except (QpmError, OSError) as exc:
            return [], f"the {split} split of the run's dataset cannot be opened here ({str(exc).splitlines()[0]})"

    def stale_reason(self) -> str | None:
        """Why the finetuned model no longer matches the run's selection, or ``None`` (file stats only: fast).

        ``qpm train`` writes selection.json before it finetunes (model.json comes later); a selection.json newer
        than model.json was written afterwards, by ``qpm select --force`` (which also leaves stale.json) or by hand.
        """
        if (self.path / STALE).is_file():
            return "selection replaced"
        try:
            if (self.path / SELECTION).stat().st_mtime > (self.path / MODEL_JSON).stat().st_mtime:
                return "selection.json is newer than the model"
        except FileNotFoundError:
            return None
        return None

    def mark_stale(self, reason: str, **facts: Any) -> Path:
        """Write ``stale.json``: the finetuned model no longer matches the run (``qpm runs`` shows it)."""

        return atomic_write_json(self.path / STALE, {"reason": reason, **facts,
                                                     "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


# ------------------------------------------------------------------------------------------------------ atomic writes
@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (``.<name>.<pid>.<random>.tmp``, see :mod:`qpmcli.files`); on
    success it replaces ``path`` (readers never see half files)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; give artifacts the usual permissions
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


class StagedFiles:
    """Files written aside (``.<name>.<pid>.staged`` next to their final names) that :func:`staged_files` renames over
    their final names together, or deletes together."""

    def __init__(self) -> None:
        self._staged: dict[Path, Path] = {}  # final path -> staged path, in the order they were asked for

    def aside(self, path: str | os.PathLike[str]) -> Path:
        """The staged path to write instead of ``path``."""
        final = Path(path)
        staged = final.with_name(f".{final.name}.{os.getpid()}.staged")
        self._staged[final] = staged
        return staged

    def __getitem__(self, path: str | os.PathLike[str]) -> Path:
        """The staged path of the final ``path``."""
        return self._staged[Path(path)]

    def sizes_mb(self) -> dict[str, float]:
        """Final name -> size in MB of every staged file written so far."""
        return {f.name: round(s.stat().st_size / 2**20, 2) for f, s in self._staged.items() if s.exists()}


@contextmanager
def staged_files() -> Iterator[StagedFiles]:
    """Write several files aside; only when the block succeeds are they renamed over their final names (each write
    that was staged must exist), and in every case no staged file is left behind: a failed or interrupted block
    leaves every existing final file untouched."""
    stage = StagedFiles()
    try:
        yield stage
        for staged in stage._staged.values():
            with open(staged, "rb+") as fh:  # a staged write that never happened is an error here, not a skip
                os.fsync(fh.fileno())
        for final, staged in stage._staged.items():
            os.replace(staged, final)
    finally:
        for staged in stage._staged.values():
            staged.unlink(missing_ok=True)


@functools.cache
def _umask() -> int:
    """The process umask (read once: reading it means setting it briefly)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------------ run-folder lock
def run_lock(folder: str | os.PathLike[str], command: str) -> FolderLock:
    """``with run_lock(run, "qpm train"):`` one writer per run folder (``<run>/.qpm.lock``); a second one gets one
    line naming the holder (:class:`qpmcli.files.FolderLock`)."""
    return FolderLock(folder, command, LOCK)


# ------------------------------------------------------------------------------------------ folders of the user
def is_qpm_entry(name: str) -> bool:
    """Whether a folder entry is qpm's own bookkeeping (the lock, a temporary file), not content."""
    return name == LOCK or TEMP_FILE_RE.fullmatch(name) is not None


def user_entries(folder: str | os.PathLike[str]) -> list[str]:
    """The names in ``folder`` other than qpm's own bookkeeping (sorted); ``[]`` when it is missing or empty."""
    try:
        return sorted(e.name for e in os.scandir(folder) if not is_qpm_entry(e.name))
    except FileNotFoundError:
        return []


def check_output_folder(folder: str | os.PathLike[str], flag: str, *, owned: bool, force: bool = False) -> None:
    """Refuse to write into a folder that holds the user's files: ``folder`` may be missing, empty, or ``owned``
    (the caller recognised it as its own kind of qpm folder: a run, a demo); anything else is a
    :class:`ConfigError` naming a few of its files, unless ``force``."""
    if force or owned:
        return
    names = user_entries(folder)
    if names:
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise ConfigError(f"{flag} {folder} is not empty and is not a qpm folder (it holds {shown}); qpm would "
                          f"write its files among yours: choose a new or empty folder, or pass --force")


def owned_names(folder: str | os.PathLike[str], manifest: str, fmt: str) -> set[str] | None:
    """The files an earlier qpm command wrote into a folder that may also hold the user's files: the names listed
    by the manifest ``<folder>/<manifest>`` it keeps there (its ``files``; for manifests of older versions, every
    path it names inside the folder), plus the manifest itself. ``set()`` when there is no manifest; ``None`` when a
    file of that name exists but is not a qpm manifest (format ``fmt`` or older), i.e. it is the user's."""
    folder = Path(folder)
    path = folder / manifest
    try:
        raw = read_regular_bytes(path, limit=256 << 20)
        doc = None if raw is None else json.loads(raw)
    except (ArtifactError, OSError, ValueError, RecursionError):
        return None
    if raw is None:
        return set()
    older = isinstance(doc, dict) and "format" not in doc and {"out_dir", "images"} <= set(doc)  # qpm explain <= 0.1
    if not older and not (isinstance(doc, dict) and doc.get("format") == fmt):
        return None
    names = {manifest}
    if isinstance(doc.get("files"), list):
        names.update(n for n in doc["files"] if isinstance(n, str) and "/" not in n)
        return names
    stack: list[Any] = [doc]
    root = os.path.realpath(folder)
    while stack:  # an older manifest: the absolute paths it lists inside the folder
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and os.path.isabs(item) and os.path.dirname(item) == root:
            names.add(os.path.basename(item))
    return names


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_json_default, allow_nan=True)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON (paths, numpy and torch scalars/arrays converted)."""
    return atomic_write_text(path, to_json(obj) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """A JSON file of a run (regular files only: a pipe never hangs the reader); a missing, unreadable or malformed
    file is an :class:`ArtifactError` naming it."""
    p = Path(path)
    try:
        raw = read_regular_bytes(p)
        if raw is None:
            raise ArtifactError(f"{p} is missing")
        return json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8; RecursionError: nesting
        raise ArtifactError(f"{p} is not readable JSON: {str(exc) or type(exc).__name__}") from exc


def atomic_write_safetensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor],
                             metadata: dict[str, str] | None = None) -> Path:
    """Save tensors (moved to CPU, made contiguous, shared storage broken) as one safetensors file."""
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)
    return Path(path)


def read_safetensors(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{p} is missing")
    try:
        return load_file(str(p), device=device)
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ArtifactError(f"{p} is not a readable safetensors file: {exc}") from exc


def atomic_write_npz(path: str | os.PathLike[str], **arrays: np.ndarray) -> Path:
    """Save arrays as an uncompressed ``.npz`` (loadable with ``np.load(path, allow_pickle=False)``)."""
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return Path(path)


def read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{p} is missing")
    with np.load(p, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one JSON line (a log record); a torn last line is skipped by :func:`read_jsonl`."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=_json_default) + "\n")
        fh.flush()


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except (ValueError, RecursionError):  # a torn or damaged line
            continue
    return out


# --------------------------------------------------------------------------------------------------------- versions
def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a model's numbers (saved in every artifact)."""
    import importlib.metadata as md
    import platform

    from qpmcli.version import qpm_version

    out = {"python": platform.python_version(), "qpm": qpm_version()}
    for name in ("torch", "timm", "numpy", "safetensors", "ortools", "schedulefree"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


# ------------------------------------------------------------------------------------------------------ model files
def save_model(model: QPMModel, run_dir: str | os.PathLike[str], stage: str = "final",
               info: dict[str, Any] | None = None) -> Path:
    """Write ``<stage>`` weights (safetensors) and its JSON (``info`` + model config + versions); returns the JSON path.

    ``info`` should hold what predicting/explaining needs without data: ``class_names``, ``backbone``,
    ``weights_digest``, ``preprocess``, ``image_size``, ``grid``, ``metrics``...
    """
    if stage not in STAGE_FILES:
        raise ArtifactError(f"unknown model stage {stage!r}; use one of {', '.join(STAGE_FILES)}")
    weights_name, json_name = STAGE_FILES[stage]
    run = Path(run_dir)
    config = model.config
    atomic_write_safetensors(run / weights_name, dict(model.state_dict()),
                             metadata={"format": "qpm-model", "format_version": str(FORMAT_VERSION), "stage": stage,
                                       "model_config": json.dumps(config, default=_json_default)})
    doc: dict[str, Any] = dict(info or {})
    doc.update({"format": "qpm-model", "format_version": FORMAT_VERSION, "stage": stage, "weights_file": weights_name,
                "model": config, "grid": list(model.grid), "n_classes": model.n_classes,
                "selection": config.get("selection")})
    doc.setdefault("versions", library_versions())
    return atomic_write_json(run / json_name, doc)


def load_model(run_dir: str | os.PathLike[str], stage: str = "final", device: str = "cpu",
               ) -> tuple[QPMModel, dict[str, Any]]:
    """Rebuild the model of a run (``stage`` ``final`` or ``dense``) in eval mode; returns ``(model, info)``.

    ``info`` is the stage's JSON document (class names, backbone, weights digest, preprocess, image size, grid,
    selection, metrics, versions, ``model`` config).
    """
    from qpmcli.model import QPMModel

    if stage not in STAGE_FILES:
        raise ArtifactError(f"unknown model stage {stage!r}; use one of {', '.join(STAGE_FILES)}")
    run = Path(run_dir)
    if not run.is_dir():
        raise ArtifactError(f"run directory {run} does not exist; train one with `qpm train --run-dir {run}`")
    weights_name, json_name = STAGE_FILES[stage]
    if not (run / json_name).is_file():
        hint = "the run has not finished finetuning" if stage == "final" else "the dense phase has not finished"
        raise ArtifactError(f"{run / json_name} is missing ({hint}); rerun `qpm train --resume --run-dir {run}`")
    from qpmcli.modelfile import confined, validate_model_document

    info = read_json(run / json_name)
    if not isinstance(info, dict) or info.get("format") != "qpm-model" or "model" not in info:
        raise ArtifactError(f"{run / json_name} is not a qpm model description")
    validate_model_document(info, run / json_name)  # every problem in one line, before anything is built
    state = read_safetensors(confined(run, info.get("weights_file", weights_name), f"{json_name} weights_file"))
    try:
        model = QPMModel.from_config(info["model"])
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, KeyError) as exc:
        raise ArtifactError(f"{run / weights_name} does not match {run / json_name}: {exc}") from exc
    model.eval()
    return model.to(device), info

"""Evaluation: run a trained model over the token caches and compute the metrics of METHOD.md §8.

The model runs batch by batch over the memory-mapped caches; test feature maps are scored as they come
(:class:`qpmcli.metrics.TestMapScorer`) and never held for the whole test set, so a dense 512-feature model on CUB
(3 GB of maps) evaluates in bounded memory. Only the pooled train features [N, K] and the test logits are kept.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qpmcli import metrics as M
from qpmcli.errors import ArtifactError, CacheError, DatasetError, QpmError
from qpmcli.files import clean_stale_temps
from qpmcli.progress import progress_bar

if TYPE_CHECKING:  # pragma: no cover
    from qpmcli.cache import TokenCache
    from qpmcli.model import QPMModel


def iter_outputs(model: QPMModel, cache: TokenCache, *, batch_size: int = 256, device: str = "cpu",
                 progress: Any = None, description: str = "evaluate") -> Iterator[tuple[int, int, Any]]:
    """Yield ``(start, end, ModelOutput)`` for consecutive batches of the cache (eval mode, no gradients)."""
    import torch

    model.eval()
    n = len(cache)
    task = progress.add_task(description, total=n) if progress is not None else None
    with torch.inference_mode():
        for s in range(0, n, batch_size):
            e = min(s + batch_size, n)
            x = torch.from_numpy(np.array(cache.tokens[s:e])).to(device=device, dtype=torch.float32)
            yield s, e, model(x)
            if task is not None:
                progress.advance(task, e - s)


def collect_outputs(model: QPMModel, cache: TokenCache, batch_size: int = 256, device: str = "cpu",
                    maps: bool = False, progress: bool = False) -> dict[str, np.ndarray]:
    """Run ``model`` over a cache: ``logits`` [N, C] and ``features`` [N, K] (float32), ``labels`` [N], and with
    ``maps=True`` also ``maps`` [N, K, h, w] as float16 (large: N*K*h*w*2 bytes)."""
    n = len(cache)
    out: dict[str, np.ndarray] = {"labels": np.asarray(cache.labels, dtype=np.int64)}
    with progress_bar(enabled=progress) as bar:
        for s, e, o in iter_outputs(model, cache, batch_size=batch_size, device=device, progress=bar):
            if "logits" not in out:
                out["logits"] = np.empty((n, o.logits.shape[1]), np.float32)
                out["features"] = np.empty((n, o.features.shape[1]), np.float32)
                if maps:
                    out["maps"] = np.empty((n, *o.maps.shape[1:]), np.float16)
            out["logits"][s:e] = o.logits.float().cpu().numpy()
            out["features"][s:e] = o.features.float().cpu().numpy()
            if maps:
                out["maps"][s:e] = o.maps.half().cpu().numpy()
    return out


def head_parameters(model: QPMModel) -> dict[str, np.ndarray | None]:
    """The head as arrays: ``weight`` [C, K] and the ``head_mean``/``head_std``/``head_bias`` the pooling baseline
    applies (sparse head: frozen mu, sigma and optional bias; dense head: the Linear bias)."""
    def arr(t: Any) -> np.ndarray | None:
        return None if t is None else t.detach().float().cpu().numpy()

    if model.is_sparse:
        return {"weight": arr(model.head_weight()), "head_mean": arr(model.sel_mu), "head_std": arr(model.sel_sigma),
                "head_bias": arr(getattr(model, "sel_bias", None))}
    return {"weight": arr(model.head_weight()), "head_mean": None, "head_std": None,
            "head_bias": arr(model.linear.bias)}


def evaluate_model(model: QPMModel, train_cache: TokenCache, test_cache: TokenCache, *,
                   class_attributes: Any = None, image_attributes: Any = None, image_attribute_known: Any = None,
                   which: str | list[str] = "all", seed: int = 0, device: str = "cpu", batch_size: int = 256,
                   progress: bool = True, calibration: dict[str, Any] | None = None,
                   per_class: list[float | None] | None = None) -> dict[str, float | None]:
    """Metrics of ``model`` (dense or sparse) on the caches: one pass over train (pooled features) and one over test.

    ``class_attributes`` [C, A] enables Structural-Grounding, ``image_attributes`` [N_train, A] bool (rows in the
    train cache's order; ``image_attribute_known`` the labels the dataset is sure of, None = all) enables Alignment;
    segmentation overlap needs the test cache's masks; the prediction-set metrics (Coverage, Set-Size,
    Set-Coherence: :func:`qpmcli.conformal.evaluate_sets`) need a ``calibration`` entry of ``qpm conformal``.
    Absent inputs give ``None`` for those metrics. A ``per_class`` list receives each class's test accuracy
    (:func:`qpmcli.metrics.confusion`; ``None`` for a class without test images).
    """
    keys = M.checked_metric_names(which)
    model = model.to(device).eval()
    head = head_parameters(model)
    weight = head["weight"]
    if weight.shape[0] != model.n_classes:
        raise ArtifactError(f"head weight has {weight.shape[0]} rows for {model.n_classes} classes")
    needs_train = bool({"Class-Independence", "Contrastiveness", "Correlation", "Alignment"} & set(keys))
    scorer = M.map_scorer(weight, keys, head_mean=head["head_mean"], head_std=head["head_std"],
                          head_bias=head["head_bias"], device=device)
    test_masks = test_cache.masks if scorer is not None and scorer.seg_keys else None
    n_test = len(test_cache)
    test_logits = np.empty((n_test, model.n_classes), np.float32)
    test_features = np.empty((n_test, weight.shape[1]), np.float32)
    train_features = np.zeros((0, weight.shape[1]), np.float32)
    with progress_bar(enabled=progress) as bar:
        if needs_train:
            train_features = collect_train_features(model, train_cache, device=device, batch_size=batch_size,
                                                    progress=bar)
        for s, e, o in iter_outputs(model, test_cache, batch_size=batch_size, device=device, progress=bar,
                                    description="test outputs"):
            logits = o.logits.float().cpu().numpy()
            test_logits[s:e] = logits
            test_features[s:e] = o.features.float().cpu().numpy()
            if scorer is not None:
                scorer.update(M.predictions(logits), test_cache.labels[s:e], o.maps,
                              None if test_masks is None else test_masks[s:e])
    if image_attributes is not None and needs_train and len(image_attributes) != len(train_cache):
        raise ArtifactError(f"image attributes have {len(image_attributes)} rows, the train cache "
                            f"{len(train_cache)}; pass them in the cache's row order")
    values = M.finish_metrics(keys, train_features=train_features, train_labels=train_cache.labels,
                              test_logits=test_logits, test_labels=test_cache.labels, weight=weight,
                              class_attributes=class_attributes, image_attributes=image_attributes,
                              image_attribute_known=image_attribute_known, seed=seed, scorer=scorer)
    if per_class is not None:
        cm = M.confusion(M.predictions(test_logits), test_cache.labels, model.n_classes)
        per_class[:] = cm["per_class_accuracy"]
    if calibration is not None and set(M.SET_KEYS) & set(keys):
        values.update({k: v for k, v in set_metrics(calibration, head, test_logits, test_features,
                                                    test_cache.labels).items() if k in keys})
    return values


def set_metrics(calibration: dict[str, Any], head: dict[str, Any], logits: np.ndarray, features: np.ndarray,
                labels: Any) -> dict[str, float | None]:
    """Coverage, Set-Size and Set-Coherence of the sets of a calibration entry on labelled outputs (``head``:
    :func:`head_parameters`)."""
    from qpmcli.conformal import TREE_MAX_FEATURES, class_features, evaluate_sets
    from qpmcli.modelfile import ClassifierMetadata

    meta = ClassifierMetadata.from_head({"weight": head["weight"], "mu": head["head_mean"],
                                         "sigma": head["head_std"]})
    sparse = class_features(meta.weight)[0].shape[1] <= TREE_MAX_FEATURES
    res = evaluate_sets(calibration, logits, labels, values=meta.standardize(features, np.float64) if sparse else None,
                        weight=meta.weight if sparse else None)
    return {"Coverage": res["coverage"], "Set-Size": res["set_size"], "Set-Coherence": res["set_coherence"]}


@dataclass
class ImageAttributes:
    """Per-image attribute labels of the train images, rows in the train cache's order.

    ``present [N, A]`` bool; ``known [N, A]`` bool, the labels the source is sure of (CUB: certainty >= 3; an
    unknown label counts neither as present nor as absent); ``names [A]``; ``source`` says where they come from.
    """

    present: np.ndarray
    known: np.ndarray
    names: list[str]
    source: str = ""


def dataset_attributes(dataset: str, settings: Any, *, data_root: str | None = None,
                       dataset_options: dict[str, Any] | None = None, train_cache: TokenCache | None = None,
                       n_classes: int | None = None) -> tuple[np.ndarray | None, ImageAttributes | None, list[str]]:
    """``(class_attributes [C, A], image attributes of the train split, notes)`` of a dataset, where it has them.

    Image attributes (:class:`ImageAttributes`: present, known mask, names; the dataset's optional
    ``image_attributes()``, ``image_attribute_known()`` and ``attribute_names()``) are reordered to the train cache's
    rows (``cache.indices``). Attributes whose class count does not match the model are dropped (METHOD.md §13 C6:
    never score one dataset's model with another's attributes). A dataset that cannot be opened any more (moved
    data) yields ``None`` and a note instead of an error.
    """
    notes: list[str] = []
    try:
        from qpmcli.data import load_dataset

        ds = load_dataset(dataset, root=data_root, split="train", settings=settings, **(dataset_options or {}))
    except QpmError as exc:
        return None, None, [f"dataset {dataset} not readable, attribute metrics skipped: {exc}"]
    class_attrs = ds.class_attributes()
    if class_attrs is not None:
        class_attrs = np.asarray(class_attrs, dtype=np.float64)
        if n_classes is not None and class_attrs.shape[0] != n_classes:
            notes.append(f"class attributes have {class_attrs.shape[0]} rows for {n_classes} classes; ignored")
            class_attrs = None
    image_attrs = None
    if getattr(ds, "has_image_attributes", False):
        try:
            image_attrs = _image_attributes_of(ds, dataset)
        except QpmError as exc:
            notes.append(f"image attributes not readable: {exc}")
        if image_attrs is not None and train_cache is not None:
            idx = np.asarray(train_cache.indices, dtype=np.int64)
            if idx.size and int(idx.max()) >= image_attrs.present.shape[0]:
                notes.append("image attributes do not cover the train cache; ignored")
                image_attrs = None
            else:
                image_attrs = ImageAttributes(image_attrs.present[idx], image_attrs.known[idx], image_attrs.names,
                                              image_attrs.source)
    return class_attrs, image_attrs, notes


def _image_attributes_of(ds: Any, dataset: str) -> ImageAttributes:
    """A dataset's image attributes in its own item order; the known mask and names are optional methods."""
    present = np.asarray(ds.image_attributes(), dtype=bool)
    if present.ndim != 2 or present.shape[0] != len(ds):
        raise DatasetError(f"dataset {dataset}: image_attributes() must be [{len(ds)}, A], got {present.shape}")
    known_fn, names_fn = getattr(ds, "image_attribute_known", None), getattr(ds, "attribute_names", None)
    known = known_fn() if callable(known_fn) else None
    known = np.ones_like(present) if known is None else np.asarray(known, dtype=bool)
    if known.shape != present.shape:
        raise DatasetError(f"dataset {dataset}: image_attribute_known() must be {list(present.shape)}, got "
                            f"{list(known.shape)}")
    names = names_fn() if callable(names_fn) else None
    names = [str(n) for n in names] if names is not None else [f"attribute {a + 1}" for a in range(present.shape[1])]
    if len(names) != present.shape[1]:
        raise DatasetError(f"dataset {dataset}: attribute_names() lists {len(names)} names for "
                            f"{present.shape[1]} attributes")
    return ImageAttributes(present, known, names, f"dataset {dataset}")


def collect_train_features(model: QPMModel, train_cache: TokenCache, *, device: str = "cpu", batch_size: int = 256,
                   progress: Any = None) -> np.ndarray:
    """Pooled, un-standardised features ``[N, K]`` (float32) of the train cache's images under ``model`` (what the
    train-feature metrics and ``qpm name-features`` read); ``progress`` is an open progress bar or None."""
    out = np.empty((len(train_cache), model.head_weight().shape[1]), np.float32)
    for s, e, o in iter_outputs(model, train_cache, batch_size=batch_size, device=device, progress=progress,
                                description="train features"):
        out[s:e] = o.features.float().cpu().numpy()
    return out


def open_run_caches(run_dir: str | os.PathLike[str], info: dict[str, Any] | None = None,
                    ) -> tuple[TokenCache, TokenCache]:
    """The train and test token caches a run was trained on (``config.json``), opened and checked against the run
    (:func:`_check_run_cache`; ``info``: the model's JSON, for its backbone, weights digest and grid); a missing,
    unusable or foreign cache is one line that says how to rebuild it."""
    from qpmcli.artifact import RunFolder
    from qpmcli.cache import TokenCache

    folder = RunFolder(run_dir)
    run, config = folder.path, folder.config()
    paths = folder.cache_paths()
    out = []
    for split in ("train", "test"):
        p = paths.get(split)
        if not p:
            raise ArtifactError(f"{run / 'config.json'} names no {split} token cache; rerun `qpm train --resume "
                                f"--run-dir {run}`")
        try:
            cache = TokenCache.open(p)
        except CacheError as exc:
            raise ArtifactError(f"the run's {split} token cache is unusable ({exc}); rebuild it with `qpm train "
                                f"--resume --run-dir {run}`") from exc
        _check_run_cache(cache, split, run, config, info or {})
        out.append(cache)
    return out[0], out[1]


def _check_run_cache(cache: TokenCache, split: str, run: Path, config: dict[str, Any], info: dict[str, Any]) -> None:
    """The cache that ``config.json`` names for ``split`` must be that split of the run's dataset, extracted by the
    run's backbone (name and weights digest) at its grid, and -- for runs that recorded them -- have the fingerprint
    the run was trained on: a swapped or foreign cache would silently rewrite metrics.json with wrong numbers."""
    from qpmcli.cache import cache_digest

    key = cache.manifest.get("key_fields")
    key = key if isinstance(key, dict) else {}
    dataset = key.get("dataset") if isinstance(key.get("dataset"), dict) else {}
    request = config.get("request") if isinstance(config.get("request"), dict) else {}
    problems = []
    found_split = key.get("split", cache.manifest.get("split"))
    if found_split != split or dataset.get("split", split) != split:
        problems.append(f"it holds the {found_split or dataset.get('split')} split")
    for what, want, got in (("backbone", info.get("backbone"), key.get("backbone")),
                            ("backbone weights digest", info.get("weights_digest"), key.get("weights_digest")),
                            ("dataset", request.get("dataset"), dataset.get("name"))):
        if want is not None and got != want:
            problems.append(f"its {what} is {got!r}, the run's is {want!r}")
    if info.get("grid") is not None and list(cache.grid) != list(info["grid"]):
        problems.append(f"its token grid is {list(cache.grid)}, the model's is {list(info['grid'])}")
    recorded = (config.get("cache_keys") or {}).get(split) if isinstance(config.get("cache_keys"), dict) else None
    if not problems and recorded is not None and cache_digest(key) != recorded:
        problems.append(f"its fingerprint {cache_digest(key)} is not the {recorded} the run was trained on")
    if problems:
        raise ArtifactError(f"{run / 'config.json'} names {cache.path} as the {split} token cache, but it does not "
                            f"belong to this run ({'; '.join(problems)}); fix config.json or rebuild the caches with "
                            f"`qpm train --resume --run-dir {run}`")


def evaluate_run(run_dir: str | os.PathLike[str], which: str | list[str] = "all", *, stage: str = "final",
                 device: str | None = None, batch_size: int = 256, progress: bool = True, settings: Any = None,
                 save: bool = True, coverage: float | None = None, set_score: str | None = None) -> dict[str, Any]:
    """``qpm evaluate``: load a run's model (``stage`` final or dense) and caches, compute the metrics and merge them
    into the run's ``metrics.json`` under ``stage``. Returns ``{"run", "stage", "metrics", "device", "seconds",
    "n_train", "n_test", "notes", "per_class_accuracy", "calibration"}`` (``per_class_accuracy[c]``: class c's
    accuracy on the test split, ``None`` without test images).

    The prediction-set metrics use the run's calibration at ``coverage`` (and ``set_score``), by default the one
    calibrated last; ``all`` includes them when the final model has a calibration."""
    from qpmcli import artifact
    from qpmcli.conformal import check_coverage, select_calibration
    from qpmcli.modelfile import metadata_from_run

    t0 = time.perf_counter()
    run = Path(run_dir)
    keys = M.checked_metric_names(which)
    if coverage is not None:
        check_coverage(coverage)
    if not run.is_dir():
        raise ArtifactError(f"run directory {run} does not exist; train one with `qpm train --run-dir {run}`")
    if settings is None:
        from qpmcli.settings import resolve_settings

        settings, _ = resolve_settings()
    device = device or settings.torch_device()
    # one writer per run folder: not while a `qpm train` of this run rewrites its model and metrics.json
    with artifact.run_lock(run, "qpm evaluate") if save else nullcontext():
        model, info = artifact.load_model(run, stage=stage, device=device)
        calibration = None
        if stage == "final" and (coverage is not None or (run / artifact.CONFORMAL).is_file()):
            calibrations = None  # the run's calibrations, checked against its model
            if (run / artifact.CONFORMAL).is_file():
                calibrations = metadata_from_run(model, info, run_dir=run).conformal
            entries = (calibrations or {}).get("calibrations") or []
            if coverage is not None:
                calibration = select_calibration(calibrations, coverage, set_score, model=str(run))
            elif entries:
                calibration = entries[-1]
            if calibration is not None and isinstance(which, str) and which.strip().lower() == "all":
                keys += list(M.SET_KEYS)
        record = artifact.RunFolder(run).record()
        train_cache, test_cache = open_run_caches(run, info)
        class_attrs = image_attrs = None
        notes: list[str] = []
        if {"Structural-Grounding", "Alignment"} & set(keys) and record.dataset:
            class_attrs, image_attrs, notes = dataset_attributes(
                record.dataset, settings, data_root=record.data_root, dataset_options=record.dataset_options,
                train_cache=train_cache, n_classes=model.n_classes)
        if test_cache.masks is None and any(k.startswith("SegOverlap-") or k == "Plausibility" for k in keys):
            notes.append("the test cache has no object masks: segmentation overlap is not applicable")
        if "SID@5" in keys and int(((model.head_weight() != 0).sum(dim=1) >= 5).sum()) == 0:
            notes.append("no class has 5 features, so no image is eligible for SID@5 (reported as 0, as the "
                         "reference)")
        if set(M.SET_KEYS) & set(keys) and calibration is None:
            notes.append(f"no calibration{' of the final model' if stage != 'final' else ''}: prediction-set "
                         f"metrics need `qpm conformal {run}` first")
        per_class: list[float | None] = []
        values = evaluate_model(model, train_cache, test_cache, class_attributes=class_attrs,
                                image_attributes=None if image_attrs is None else image_attrs.present,
                                image_attribute_known=None if image_attrs is None else image_attrs.known,
                                which=keys, seed=record.seed or 0, device=device, batch_size=batch_size,
                                progress=progress, calibration=calibration, per_class=per_class)
        if save:
            clean_stale_temps([run])  # what a killed evaluate or train left (qpm's names, dead pids)
            path = run / artifact.METRICS
            doc = artifact.read_json(path) if path.is_file() else {}
            if not isinstance(doc, dict):
                raise ArtifactError(f"{path} is not a qpm metrics file (a JSON object); move it away and rerun")
            doc[stage] = {**(doc.get(stage) or {}), **values}
            artifact.atomic_write_json(path, doc)
        summary = {"run": str(run), "stage": stage, "metrics": values, "device": device,
                   "seconds": round(time.perf_counter() - t0, 3), "n_train": len(train_cache),
                   "n_test": len(test_cache), "notes": notes, "per_class_accuracy": per_class}
        if calibration is not None:
            summary["calibration"] = {k: calibration.get(k) for k in ("alpha", "coverage", "score", "per_class",
                                                                       "level")}
        return summary

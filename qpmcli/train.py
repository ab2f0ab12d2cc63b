"""``qpm train`` as a short list of named stages: extract -> dense -> dense features -> evaluate (dense) ->
select + finetune -> evaluate (final) -> prototypes (the linear probe ends after the dense evaluation).

:func:`train_run` checks the request (names, sizes, metric names) before any work, opens the run directory, and runs
the stages of :func:`stages` in order. Each :class:`Stage` is a function of one :class:`TrainContext` (run directory,
distributed info, device, caches, timings, metrics and what earlier stages produced); *resume* is a property of each
stage: ``done(ctx)`` says that an earlier run of the directory finished it, and ``load(ctx)`` then reads its outputs
back instead of running it. The training loop itself (epochs, checkpoints, BatchNorm recompute) is
:mod:`qpmcli.loop`; file names come from :mod:`qpmcli.artifact`; rank checks and barriers from
:mod:`qpmcli.distributed`.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpmcli import artifact
from qpmcli.distributed import DistInfo, init_distributed, local_device
from qpmcli.errors import ArtifactError, ConfigError, DatasetError, QpmError
from qpmcli.files import clean_stale_temps
from qpmcli.loop import (
    DENSE_PHASE,
    FINETUNE_PHASE,
    LINEAR_PROBE_PHASE,
    PhaseOptions,
    TokenData,
    checkpoint_epoch,
    clear_checkpoint,
    collect_pooled,
    collect_token_outputs,
    feature_stats,
    phase_presets,
    train_phase,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qpmcli.model import QPMModel

__all__ = ["DENSE_PHASE", "FINETUNE_PHASE", "HEADS", "LINEAR_PROBE_PHASE", "Stage", "TrainContext", "TrainRequest",
           "default_run_dir", "phase_presets", "stages", "train_run"]


# --------------------------------------------------------------------------------------------------- the request
HEADS = ("qpm", "linear-probe")


@dataclass
class TrainRequest:
    """Everything ``qpm train`` needs; saved (resolved) as ``config.json`` of the run."""

    backbone: str = "dinov2-vitb14-reg"
    dataset: str = "cub200"
    data_root: str | None = None
    weights: str | None = None
    preprocess: str = "official"
    dataset_options: dict[str, Any] = field(default_factory=dict)
    backbone_options: dict[str, Any] = field(default_factory=dict)
    selector: str = "qpm"
    selector_options: dict[str, Any] = field(default_factory=dict)  # the selector's declared options (bound=...)
    n_selected: int = 50
    per_class: int = 5
    time_limit: float = 60.0
    workers: int = 8
    head: str = "qpm"
    n_layers: int = 4
    hidden_size: int = 2048
    n_features: int = 512
    activation: str = "relu"
    pooling: str = "avg"
    dense: PhaseOptions = DENSE_PHASE
    finetune: PhaseOptions = FINETUNE_PHASE
    seed: int = 383534468
    metrics: str = "all"
    cal_fraction: float = 0.0  # > 0: hold this share of each class's training images out for `qpm conformal`

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dense"] = self.dense.to_dict()
        d["finetune"] = self.finetune.to_dict()
        return d

    @classmethod
    def from_options(cls, *, head: str = "qpm", selector: str = "qpm", dense_epochs: int | None = None,
                     finetune_epochs: int | None = None, batch_size: int | None = None,
                     dense_lr: float | None = None, finetune_lr: float | None = None, recompute_bn: bool = True,
                     bf16: bool = False, eval_every: int = 0, checkpoint_steps: int = 0, **fields: Any,
                     ) -> TrainRequest:
        """A request whose phases are the paper's settings for its head and selector (``phase_presets``: the row of
        its table), with the given epochs, batch size and learning rates (``None``: the preset's) and switches
        applied to both phases. ``fields`` are the request's other fields. ``qpm train`` builds its request here."""
        dense, finetune = phase_presets(head, selector)
        common = dict(recompute_bn=recompute_bn, bf16=bf16, eval_every=eval_every, checkpoint_steps=checkpoint_steps)

        def phase(preset: PhaseOptions, epochs: int | None, lr: float | None) -> PhaseOptions:
            given = {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)) if v is not None}
            return replace(preset, **common, **given)

        return cls(head=head, selector=selector, dense=phase(dense, dense_epochs, dense_lr),
                   finetune=phase(finetune, finetune_epochs, finetune_lr), **fields)

    def checked(self, settings: Any = None) -> TrainRequest:
        """Every check that needs no images, made before any work (one line, exit 2 each): plugin names, choices,
        sizes, the phases' schedules, the time limit, metric names and, given ``settings``, C <= binomial(K, k) with
        the class count read from the dataset's lists (a dataset that cannot be opened yet is reported by the run
        itself, after the weights check). Returns the request."""
        from qpmcli.checks import (
            check_choice,
            check_positive,
            check_selection_sizes,
            check_time_limit,
            check_workers,
        )
        from qpmcli.metricnames import checked_metric_names
        from qpmcli.model import ACTIVATIONS, MAX_FEATURES, MAX_HIDDEN, MAX_LAYERS, POOLINGS
        from qpmcli.registry import get_registry

        reg = get_registry()
        reg.get("backbone", self.backbone)
        reg.get("dataset", self.dataset)
        check_choice(self.head, HEADS, "--head")
        check_choice(self.preprocess, ("official", "reference"), "--preprocess")
        check_choice(self.pooling, POOLINGS, "--pooling")
        check_choice(self.activation, tuple(ACTIVATIONS), "--activation")
        check_positive(self.n_layers, "--layers", 0)
        check_positive(self.hidden_size, "--hidden-size")
        if self.n_layers > MAX_LAYERS or self.hidden_size > MAX_HIDDEN:  # found now, not as a failed allocation
            raise ConfigError(f"--layers {self.n_layers} / --hidden-size {self.hidden_size}: the adapter allows at "
                              f"most {MAX_LAYERS} layers of at most {MAX_HIDDEN} units")
        if self.n_layers > 0 and not 1 <= self.n_features <= MAX_FEATURES:
            raise ConfigError(f"--dense-features {self.n_features} cannot be trained (allowed 1..{MAX_FEATURES})")
        if self.head == "qpm":
            from qpmcli.selection import make_selector

            make_selector(self.selector, self.selector_options)  # name, option keys and values
            check_selection_sizes(self.n_selected, self.per_class,
                                  n_total=self.n_features if self.n_layers > 0 else None)
        check_time_limit(self.time_limit)
        check_workers(self.workers)
        for name, ph in (("dense", self.dense), ("finetune", self.finetune)):
            check_positive(ph.epochs, f"--{name}-epochs")
            check_positive(ph.batch_size, "--batch-size")
            if not (math.isfinite(ph.lr) and ph.lr > 0):
                raise ConfigError(f"--{name}-lr must be a positive number, got {ph.lr}")
            check_positive(ph.eval_every, "--eval-every", 0)
            check_positive(ph.checkpoint_steps, "--checkpoint-steps", 0)
        if not (math.isfinite(self.cal_fraction) and 0 <= self.cal_fraction < 1):
            raise ConfigError(f"--cal-fraction must be at least 0 and below 1, got {self.cal_fraction}")
        checked_metric_names(self.metrics)
        if self.head == "qpm" and settings is not None:
            from qpmcli.data import load_dataset

            try:
                n_classes = load_dataset(self.dataset, root=self.data_root, split="train", settings=settings,
                                         **self.dataset_options).num_classes
            except QpmError:
                n_classes = None
            if n_classes is not None:
                check_selection_sizes(self.n_selected, self.per_class, n_classes)
        return self


def default_run_dir(settings: Any, req: TrainRequest) -> Path:
    import re

    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{req.dataset}-{req.backbone}")
    return Path(settings.runs_dir) / label


def _check_classes(labels: Any, class_names: list[str], split: str) -> None:
    import numpy as np

    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    empty = np.flatnonzero(counts == 0)
    if split == "train" and len(empty):
        names = ", ".join(str(class_names[i]) for i in empty[:5])
        more = ", ..." if len(empty) > 5 else ""
        raise DatasetError(f"{len(empty)} class(es) have no training images ({names}{more})"
                           f"; every class needs at least one")
    if len(counts) > len(class_names):
        raise DatasetError(f"{split} labels go up to {len(counts) - 1} but the dataset has {len(class_names)} classes")


class _RunLog:
    """log.jsonl + log.csv (one row per epoch of every phase), rewritten atomically from the JSONL each time."""

    def __init__(self, run_dir: Path) -> None:
        self.jsonl = run_dir / artifact.LOG_JSONL
        self.csv = run_dir / artifact.LOG_CSV

    def drop_phase(self, phase: str, keep_epochs: int = 0) -> None:
        rows = [r for r in artifact.read_jsonl(self.jsonl) if r.get("phase") != phase or r["epoch"] <= keep_epochs]
        artifact.atomic_write_text(self.jsonl, "".join(artifact.to_json(r).replace("\n", "") + "\n" for r in rows))
        self._write_csv(rows)

    def __call__(self, record: dict[str, Any]) -> None:
        artifact.append_jsonl(self.jsonl, record)
        self._write_csv(artifact.read_jsonl(self.jsonl))

    def _write_csv(self, rows: list[dict[str, Any]]) -> None:
        import io

        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
        artifact.atomic_write_text(self.csv, buf.getvalue())


def _evaluate(model: QPMModel, train_cache: Any, test_cache: Any, req: TrainRequest, device: str,
              settings: Any) -> dict[str, Any]:
    """The metrics of METHOD.md §8 (``req.metrics``) on the run's caches, with the dataset's attributes if any."""
    from qpmcli.evaluate import dataset_attributes, evaluate_model
    from qpmcli.metricnames import checked_metric_names

    keys = checked_metric_names(req.metrics)
    class_attrs = image_attrs = None
    if {"Structural-Grounding", "Alignment"} & set(keys):
        class_attrs, image_attrs, _ = dataset_attributes(req.dataset, settings, data_root=req.data_root,
                                                         dataset_options=req.dataset_options,
                                                         train_cache=train_cache, n_classes=model.n_classes)
    return evaluate_model(model, train_cache, test_cache, class_attributes=class_attrs,
                          image_attributes=None if image_attrs is None else image_attrs.present,
                          image_attribute_known=None if image_attrs is None else image_attrs.known,
                          which=keys, seed=req.seed, device=device, progress=False)


# --------------------------------------------------------------------------------------------------- the context
@dataclass
class TrainContext:
    """What the stages of one ``qpm train`` share. The first block is fixed when the run starts; the second is
    filled by the stages in order (``caches``/``train_data``/... by extract, ``dense_model`` by dense, ...)."""

    req: TrainRequest
    settings: Any
    run: Path
    dist: DistInfo
    device: str
    resume: bool = False
    progress: bool = True
    say: Callable[[str], None] = print
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    backbone: Any = None
    caches: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # what model.json/dense.json carry besides the model
    train_data: TokenData | None = None
    test_data: TokenData | None = None
    run_log: _RunLog | None = None
    dense_model: QPMModel | None = None
    dense_features: torch.Tensor | None = None
    mu: torch.Tensor | None = None
    sigma: torch.Tensor | None = None
    final_model: QPMModel | None = None
    selection: Any = None

    @property
    def ckpt_dir(self) -> Path:
        return self.run / artifact.CHECKPOINTS

    @property
    def metrics_path(self) -> Path:
        return self.run / artifact.METRICS

    def seed_all(self, offset: int) -> None:
        """Seed Python, numpy and torch with the request's seed + ``offset`` (0: dense, 1 + i: finetune i)."""
        import random

        import numpy as np
        import torch

        random.seed(self.req.seed + offset)
        np.random.seed((self.req.seed + offset) % 2**32)
        torch.manual_seed(self.req.seed + offset)

    def save_model(self, model: QPMModel, stage: str, **extra: Any) -> None:
        """``artifact.save_model`` with the run's info plus ``extra`` (metrics, selection facts)."""
        artifact.save_model(model, self.run, stage, info={**self.info, **extra})

    def write_metrics(self) -> None:
        artifact.atomic_write_json(self.metrics_path, self.metrics)


@dataclass(frozen=True)
class Stage:
    """One named step of ``qpm train``. ``run(ctx)`` does the work; ``done(ctx)`` is true when an earlier run of the
    same directory finished it (then ``load(ctx)`` reads its outputs back instead); ``timing`` is the key under which
    its wall time goes into ``timings`` (``None``: the stage records its own)."""

    name: str
    run: Callable[[TrainContext], None]
    done: Callable[[TrainContext], bool] = lambda ctx: False
    load: Callable[[TrainContext], None] = lambda ctx: None
    timing: str | None = None

    def __call__(self, ctx: TrainContext) -> None:
        t0 = time.perf_counter()
        if self.done(ctx):
            self.load(ctx)
        else:
            self.run(ctx)
        if self.timing:
            ctx.timings.setdefault(self.timing, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------- the stages
def extract(ctx: TrainContext) -> None:
    """Build (resumably) or open the train/test token caches; write ``config.json``; hold the tokens for training.

    Collective under ``torchrun``: every rank extracts a disjoint share of each cache."""
    from qpmcli.cache import cache_digest, ensure_cache

    req, dist = ctx.req, ctx.dist
    if ctx.backbone is None:
        from qpmcli.backbone import load_backbone

        opts = {"dataset": req.dataset, **req.backbone_options}
        device = ctx.device if ctx.device.startswith("cuda") else None
        ctx.backbone = load_backbone(req.backbone, weights=req.weights, preprocess=req.preprocess,
                                     settings=ctx.settings, device=device, **opts)
    backbone = ctx.backbone
    for split in ("train", "test"):
        ctx.caches[split] = ensure_cache(req.backbone, req.dataset, split, ctx.settings, data_root=req.data_root,
                                         dataset_options=req.dataset_options, progress=ctx.progress and dist.is_main,
                                         backbone_obj=backbone, preprocess=req.preprocess)
    train_cache, test_cache = ctx.caches["train"], ctx.caches["test"]
    manifest = train_cache.manifest
    key = manifest.get("key_fields", manifest)
    if key.get("backbone", backbone.name) != backbone.name:
        raise ArtifactError(f"the token cache {train_cache.path} holds {key.get('backbone')} tokens, not "
                            f"{backbone.name}; delete it or use another cache_dir")
    class_names = [str(c) for c in (train_cache.classes or range(int(train_cache.labels.max()) + 1))]
    ctx.class_names = class_names
    _check_classes(train_cache.labels, class_names, "train")
    _check_classes(test_cache.labels, class_names, "test")
    from qpmcli.conformal import held_out_split

    fit_rows, cal_split = held_out_split(train_cache.labels, req.cal_fraction, req.seed)  # (None, None) at 0
    embed_dim = int(train_cache.tokens.shape[-1])
    if req.head == "qpm":
        from qpmcli.checks import check_selection_sizes

        n_f = embed_dim if req.n_layers == 0 else req.n_features
        check_selection_sizes(req.n_selected, req.per_class, len(class_names), n_f)
    ctx.info = {
        "class_names": class_names, "backbone": backbone.name, "weights_digest": backbone.weights_digest,
        "preprocess": backbone.preprocess_config, "image_size": list(backbone.image_size),
        "grid": list(train_cache.grid), "embed_dim": embed_dim, "dataset": req.dataset, "head": req.head,
        "backbone_options": req.backbone_options, "seed": req.seed,
    }
    if dist.is_main:
        ctx.run.mkdir(parents=True, exist_ok=True)
        artifact.atomic_write_json(ctx.run / artifact.CONFIG, {
            "request": req.to_dict(), "settings": ctx.settings.model_dump(mode="json"), "device": ctx.device,
            "world_size": dist.world, "caches": {"train": str(train_cache.path), "test": str(test_cache.path)},
            "cache_keys": {split: cache_digest(c.manifest.get("key_fields") or {}) for split, c in ctx.caches.items()},
            "versions": artifact.library_versions(), **({"calibration_split": cal_split} if cal_split else {})})
    dist.barrier()
    ctx.run_log = _RunLog(ctx.run)
    if dist.is_main:
        ctx.ckpt_dir.mkdir(parents=True, exist_ok=True)
    ctx.train_data = TokenData(train_cache.tokens, train_cache.labels, ctx.device, rows=fit_rows)
    ctx.test_data = TokenData(test_cache.tokens, test_cache.labels, ctx.device)
    ctx.summary.update({"run_dir": str(ctx.run), "device": ctx.device, "world_size": dist.world,
                        "cache_on_device": ctx.train_data.held, "n_train": len(ctx.train_data),
                        "n_test": len(ctx.test_data), "n_classes": len(class_names)})
    if cal_split:
        ctx.summary["n_calibration"] = len(cal_split["rows"])


def _model_config(ctx: TrainContext) -> dict[str, Any]:
    from qpmcli.model import linear_probe_config

    req, embed_dim, n_classes, grid = ctx.req, ctx.info["embed_dim"], len(ctx.class_names), ctx.info["grid"]
    if req.head == "linear-probe":
        return linear_probe_config(embed_dim, n_classes, grid)
    return dict(embed_dim=embed_dim, n_classes=n_classes, grid=list(grid), n_layers=req.n_layers,
                hidden_size=req.hidden_size, n_features=req.n_features, activation=req.activation,
                pooling=req.pooling, batch_norm=True, head_dropout=0.2)


def dense(ctx: TrainContext) -> None:
    """The dense phase (METHOD.md §5.1): adapter + dense head, saved as ``dense.safetensors`` + ``dense.json``."""
    from qpmcli.model import QPMModel

    ctx.seed_all(0)
    ctx.dense_model = QPMModel(**_model_config(ctx)).to(ctx.device)
    if ctx.dist.is_main:
        ctx.run_log.drop_phase("dense", keep_epochs=checkpoint_epoch(ctx.ckpt_dir, "dense"))
    res = train_phase(ctx.dense_model, ctx.train_data, ctx.req.dense, phase="dense", seed=ctx.req.seed,
                      test_data=ctx.test_data, checkpoint_dir=ctx.ckpt_dir, on_epoch=ctx.run_log,
                      progress=ctx.progress)
    ctx.summary["dense_tokens_per_second"] = res.tokens_per_second
    if ctx.dist.is_main:
        ctx.save_model(ctx.dense_model, "dense")
        clear_checkpoint(ctx.ckpt_dir, "dense")
    ctx.dist.barrier()


def _dense_done(ctx: TrainContext) -> bool:
    return ctx.resume and (ctx.run / artifact.DENSE_JSON).is_file()


def _dense_load(ctx: TrainContext) -> None:
    ctx.dense_model, _ = artifact.load_model(ctx.run, "dense", device=ctx.device)
    ctx.say("dense model found, skipping the dense phase")
    ctx.summary["dense_skipped"] = True


def dense_features(ctx: TrainContext) -> None:
    """Pooled dense train features (the selection's input; mu/sigma of the sparse head), kept as
    ``dense_features.npz``."""
    import numpy as np

    feats = collect_token_outputs(ctx.dense_model, ctx.train_data, 256, ctx.req.dense.bf16)["features"]
    if ctx.dist.is_main:
        artifact.atomic_write_npz(ctx.run / artifact.DENSE_FEATURES, features=feats.numpy().astype(np.float32),
                                  labels=ctx.train_data.labels.numpy().astype(np.int64),
                                  class_names=np.asarray(ctx.class_names))
    ctx.dist.barrier()
    _set_dense_features(ctx, feats)


def _dense_features_done(ctx: TrainContext) -> bool:
    return (ctx.run / artifact.DENSE_FEATURES).is_file()


def _dense_features_load(ctx: TrainContext) -> None:
    import torch

    _set_dense_features(ctx, torch.from_numpy(artifact.read_npz(ctx.run / artifact.DENSE_FEATURES)["features"]))


def _set_dense_features(ctx: TrainContext, feats: torch.Tensor) -> None:
    ctx.dense_features = feats
    ctx.mu, ctx.sigma = feature_stats(feats)


def _evaluate_stage(stage: str) -> Stage:
    """The metrics of METHOD.md §8 of the ``dense`` or ``final`` model (rank 0), into ``metrics.json`` and the model's
    JSON; done when ``metrics.json`` (read at the start of a resumed run) holds them."""

    def run(ctx: TrainContext) -> None:
        if not ctx.dist.is_main:
            return
        model = ctx.dense_model if stage == "dense" else ctx.final_model
        t0 = time.perf_counter()
        ctx.metrics[stage] = _evaluate(model, ctx.caches["train"], ctx.caches["test"], ctx.req, ctx.device,
                                       ctx.settings)
        ctx.timings[f"evaluate_{stage}"] = time.perf_counter() - t0
        ctx.write_metrics()
        extra = {} if stage == "dense" else {"selection_result": ctx.summary["selection"]}
        ctx.save_model(model, stage, metrics=ctx.metrics[stage], **extra)

    return Stage(f"evaluate_{stage}", run, done=lambda ctx: stage in ctx.metrics)


def probe_final(ctx: TrainContext) -> None:
    """The paper's linear probe has no selection and no finetuning (METHOD.md §5.3): the dense model is final."""
    ctx.final_model = ctx.dense_model
    if ctx.dist.is_main:
        ctx.metrics["final"] = ctx.metrics["dense"]
        ctx.write_metrics()
        ctx.save_model(ctx.final_model, "final", metrics=ctx.metrics["final"])
    ctx.dist.barrier()
    ctx.summary["selection"] = None


def select_and_finetune(ctx: TrainContext) -> None:
    """Selection (rank 0 solves, the others read the file) and finetuning of the sparse head, repeated
    ``selector.iterations`` times (Q-SENN); the final model is ``model.safetensors`` + ``model.json``."""
    ctx.final_model, ctx.selection, ft_timings = _select_and_finetune(ctx)
    ctx.timings.update(ft_timings)
    if ctx.dist.is_main:
        ctx.save_model(ctx.final_model, "final")
        ctx.metrics.pop("final", None)
    ctx.dist.barrier()
    _selection_summary(ctx)


def _final_done(ctx: TrainContext) -> bool:
    return ctx.resume and (ctx.run / artifact.MODEL_JSON).is_file()


def _final_load(ctx: TrainContext) -> None:
    from qpmcli.selection import load_selection

    ctx.final_model, _ = artifact.load_model(ctx.run, "final", device=ctx.device)
    ctx.selection = load_selection(ctx.run / artifact.SELECTION)
    ctx.say("final model found, skipping selection and finetuning")
    _selection_summary(ctx)


def _selection_summary(ctx: TrainContext) -> None:
    from qpmcli.selection import selection_summary

    ctx.summary["selection"] = selection_summary(ctx.selection)


def prototypes(ctx: TrainContext) -> None:
    """Representative training patches per selected feature (``<run>/prototypes/``, for ``qpm explain --class``)."""
    if ctx.dist.is_main:
        t0 = time.perf_counter()
        ctx.summary["prototypes"] = _prototypes(ctx)
        ctx.timings["prototypes"] = time.perf_counter() - t0
    ctx.dist.barrier()


def _prototypes(ctx: TrainContext) -> dict[str, Any]:
    from qpmcli.data import load_dataset
    from qpmcli.prototypes import build_prototypes

    req = ctx.req
    try:
        dataset = load_dataset(req.dataset, root=req.data_root, split="train", settings=ctx.settings,
                               **req.dataset_options)
    except QpmError as exc:  # the tokens are cached but the images moved: the model is still complete
        return {"written": False, "reason": f"train images not readable: {exc}"}
    return build_prototypes(ctx.final_model, ctx.caches["train"], dataset, ctx.run, device=ctx.device)


def _prototypes_done(ctx: TrainContext) -> bool:
    return (ctx.run / artifact.PROTOTYPES).is_dir()


def _barrier(ctx: TrainContext) -> None:
    ctx.dist.barrier()


def stages(req: TrainRequest) -> list[Stage]:
    """The stages of ``qpm train`` for ``req``, in order."""
    head = [
        Stage("extract", extract, timing="extract"),
        Stage("dense", dense, done=_dense_done, load=_dense_load, timing="dense"),
        Stage("dense_features", dense_features, done=_dense_features_done, load=_dense_features_load),
        _evaluate_stage("dense"),
    ]
    if req.head == "linear-probe":
        return head + [Stage("probe_final", probe_final)]
    return head + [
        Stage("select_and_finetune", select_and_finetune, done=_final_done, load=_final_load,
              timing="select_and_finetune"),
        _evaluate_stage("final"),
        Stage("prototypes", prototypes, done=_prototypes_done, load=_barrier),
    ]


# -------------------------------------------------------------------------------------------------- the pipeline
def train_run(req: TrainRequest, settings: Any, *, run_dir: str | os.PathLike[str] | None = None,
              resume: bool = False, progress: bool = True, backbone_obj: Any = None,
              log: Callable[[str], None] | None = None, force: bool = False) -> dict[str, Any]:
    """``qpm train``: the :func:`stages` for ``req`` in one run directory. Finished stages are skipped with
    ``resume``; an interrupted phase continues from its checkpoint. A folder that holds other files than a run's is
    refused unless ``force``. Returns a JSON-able summary (paths, metrics, selection facts, timings).
    """
    req.checked(settings)
    if run_dir is not None:
        from qpmcli.checks import check_out_dir

        check_out_dir(run_dir, "--run-dir")
    dist = init_distributed()
    run = Path(run_dir) if run_dir is not None else default_run_dir(settings, req)
    artifact.check_output_folder(run, "--run-dir", owned=(run / artifact.CONFIG).is_file(), force=force)
    # one writer per run folder: a second `qpm train` (or --resume) of it stops here, naming the first
    lock = artifact.run_lock(run, "qpm train" + (" --resume" if resume else "")) if dist.is_main else nullcontext()
    with lock:
        _check_run_dir(run, req, resume)
        if dist.is_main:  # what a killed training left (qpm's own temporary names of processes that are gone)
            clean_stale_temps([run, run / artifact.CHECKPOINTS])
        ctx = TrainContext(req=req, settings=settings, run=run, dist=dist,
                           device=local_device(settings.torch_device()), resume=resume, progress=progress,
                           say=log or (lambda _msg: None), backbone=backbone_obj)
        if resume and ctx.metrics_path.is_file():
            ctx.metrics = artifact.read_json(ctx.metrics_path)
        for stage in stages(req):
            stage(ctx)
    ctx.summary.update(metrics=ctx.metrics, timings=ctx.timings)
    return ctx.summary


# selector options that, like the time limit and workers, say how long a selection runs, not what the run is: a run
# resumes with other values (a finished selection is kept; the qpm selector's work limit, e.g. the demo's)
RESUMABLE_SELECTOR_OPTIONS = ("work_limit",)


def _check_run_dir(run: Path, req: TrainRequest, resume: bool) -> None:
    """A directory that holds a run is continued only with ``resume`` and the same options."""
    cfg_path = run / artifact.CONFIG
    if not cfg_path.is_file():
        return
    if not resume:
        raise ArtifactError(f"run directory {run} already holds a run; pass --resume to continue it or choose "
                            f"another --run-dir")
    cfg = artifact.read_json(cfg_path)
    old = cfg.get("request") if isinstance(cfg, dict) else None
    if not isinstance(old, dict):
        raise ArtifactError(f"{cfg_path} holds no training request (a JSON object under 'request'): the run folder "
                            f"is damaged; use another --run-dir")
    request_doc = req.to_dict()
    defaults = TrainRequest().to_dict()  # a run written before an option existed was trained with its default

    def value(doc: dict[str, Any], key: str) -> Any:
        val = doc.get(key, defaults[key])
        if key == "selector_options" and isinstance(val, dict):  # how long the search runs, like time_limit
            val = {k: v for k, v in val.items() if k not in RESUMABLE_SELECTOR_OPTIONS}
        return _norm(val)

    diffs = [k for k in request_doc if k not in ("time_limit", "workers", "metrics")
             and value(old, k) != value(request_doc, k)]
    if diffs:
        raise ArtifactError(f"run directory {run} was trained with other options ({', '.join(diffs)} differ); "
                            f"use another --run-dir")


def _select_and_finetune(ctx: TrainContext) -> tuple[QPMModel, Any, dict[str, float]]:
    """Selection (rank 0 solves, the others read the file) and finetuning, ``selector.iterations`` times.

    Iteration i > 0 (Q-SENN) re-poses the problem on the current adapter's pooled features, passes the previous
    selection and finetunes with the selector's ``finetune_schedule(i)`` (epochs, lr_scale). Every finished iteration
    is kept under ``checkpoints/`` so a resumed run continues with the next one.
    """
    import numpy as np

    from qpmcli.model import QPMModel
    from qpmcli.selection import build_problem, load_selection, make_selector, save_selection, select

    req, run, ckpt_dir, dist, device = ctx.req, ctx.run, ctx.ckpt_dir, ctx.dist, ctx.device
    model, mu, sigma, train_data = ctx.dense_model, ctx.mu, ctx.sigma, ctx.train_data
    class_names, resume, progress = ctx.class_names, ctx.resume, ctx.progress
    selector = make_selector(req.selector, req.selector_options)
    iterations = max(1, int(getattr(selector, "iterations", 1)))
    labels = np.asarray(train_data.labels.numpy(), dtype=np.int64)
    timings = {"select": 0.0, "finetune": 0.0}
    sel = None
    feats = ctx.dense_features
    for it in range(iterations):
        last = it == iterations - 1
        phase = "finetune" + ("" if iterations == 1 else f"-{it + 1}")
        sel_name, done_name, weights = artifact.iteration_files(it, iterations)
        done = ckpt_dir / done_name
        sel_path = run / sel_name
        if not last and resume and done.is_file():  # a finished earlier iteration (Q-SENN)
            doc = artifact.read_json(done)
            model = QPMModel.from_config(doc["model"]).to(device)
            from qpmcli.modelfile import confined

            model.load_state_dict(artifact.read_safetensors(confined(ckpt_dir, doc.get("weights"),
                                                                     f"{done} 'weights'"), device=device))
            sel = load_selection(sel_path)
            feats = None
            continue
        if feats is None:  # the problem of iteration > 0 comes from the current adapter
            feats = collect_pooled(model, train_data, 256, req.finetune.bf16)
            mu, sigma = feature_stats(feats)
        t0 = time.perf_counter()
        if dist.is_main and not (resume and sel_path.is_file()):
            problem = build_problem(feats.numpy(), labels, len(class_names), class_names)
            new = select(problem, selector=req.selector, n_features=req.n_selected, per_class=req.per_class,
                         time_limit=req.time_limit, seed=req.seed % 2**31, workers=req.workers, previous=sel,
                         progress=progress, selector_options=req.selector_options)
            save_selection(new, sel_path, class_names=class_names)
        dist.barrier()
        sel = load_selection(sel_path)
        timings["select"] += time.perf_counter() - t0
        model.set_selection(sel.features, sel.weight, mu, sigma, bias=sel.bias, trainable_norm=sel.trainable_norm,
                            dropout=0.1 if sel.trainable_norm else 0.0)  # SLDD/Q-SENN head dropout (§7.1, C7)
        opts = req.finetune
        schedule = dict(selector.finetune_schedule(it) or {}) if iterations > 1 else {}
        if "epochs" in schedule:
            opts = replace(opts, epochs=int(schedule["epochs"]))
        if "lr" in schedule or "lr_scale" in schedule:
            opts = replace(opts, lr=float(schedule.get("lr", opts.lr)) * float(schedule.get("lr_scale", 1.0)))
        ctx.seed_all(1 + it)
        if dist.is_main:
            ctx.run_log.drop_phase(phase, keep_epochs=checkpoint_epoch(ckpt_dir, phase))
        t0 = time.perf_counter()
        train_phase(model, train_data, opts, phase=phase, seed=req.seed, test_data=ctx.test_data,
                    checkpoint_dir=ckpt_dir, on_epoch=ctx.run_log, progress=progress)
        timings["finetune"] += time.perf_counter() - t0
        if dist.is_main:
            if not last:
                artifact.atomic_write_safetensors(ckpt_dir / weights, dict(model.state_dict()))
                artifact.atomic_write_json(done, {"model": model.config, "weights": weights, "iteration": it + 1})
            clear_checkpoint(ckpt_dir, phase)
        dist.barrier()
        feats = None
    if dist.is_main and iterations > 1:
        for p in ckpt_dir.glob("iteration-*"):
            p.unlink()
    assert sel is not None
    return model, sel, timings


def _norm(value: Any) -> Any:
    """JSON round trip, so tuples and lists compare equal."""
    import json

    return json.loads(artifact.to_json(value))

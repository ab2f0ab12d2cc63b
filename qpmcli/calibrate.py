"""``qpm conformal``: calibrate a run's prediction sets on its cached outputs and measure them on its test split.

The method (scores, the exact threshold, sets) is :mod:`qpmcli.conformal`; the document it writes,
``<run>/conformal.json``, belongs to :mod:`qpmcli.modelfile`. The guarantee needs calibration images the model was
not fitted on: the job uses the split ``qpm train --cal-fraction`` held out of training (``config.json``'s
``calibration_split``) and otherwise carves one from the training images and records that the guarantee does not hold
for it. Model outputs come from the run's token caches, opened and checked against the run
(:func:`qpmcli.evaluate.open_run_caches`), through the training loop's eval pass
(:func:`qpmcli.loop.collect_token_outputs`), never from a backbone forward. Torch is imported only by the job.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qpmcli.conformal import (
    SCORES,
    TREE_MAX_FEATURES,
    add_calibration,
    calibrate,
    calibration_split,
    check_alpha,
    class_features,
    evaluate_sets,
    held_out_rows,
)
from qpmcli.errors import ArtifactError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from qpmcli.cache import TokenCache

DEFAULT_ALPHA = 0.1
DEFAULT_CAL_FRACTION = 0.2  # of the training images, when the run holds out no calibration split


@dataclass
class ConformalRequest:
    """Everything ``qpm conformal`` needs. ``score``: one score or several, comma-separated (``"lac,aps,hier"``:
    one pass over the caches, one entry each, calibrated in that order). ``cal_fraction`` ``None``: the run's held-out
    calibration split when it has one, else :data:`DEFAULT_CAL_FRACTION` of the training images (seen in training: no
    guarantee)."""

    run: str = ""
    alpha: float = DEFAULT_ALPHA
    score: str = "lac"
    per_class: bool = False
    cal_fraction: float | None = None
    seed: int = 0
    batch_size: int = 256
    device: str | None = None

    def checked(self, *, run: bool = True) -> ConformalRequest:
        """Every check that needs no data (one line, exit 2 each; ``run=False``: all but the run directory's);
        returns the request."""
        check_alpha(self.alpha)
        bad = [s for s in self.scores if s not in SCORES] or ([] if self.scores else [self.score])
        if bad:
            raise ConfigError(f"--score {bad[0]!r} is not one of {', '.join(SCORES)} (or several, comma-separated)")
        if self.cal_fraction is not None and not (math.isfinite(self.cal_fraction) and 0 < self.cal_fraction < 1):
            raise ConfigError(f"--cal-fraction must be between 0 and 1 (exclusive), not {self.cal_fraction}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be 0 or more, not {self.seed}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, not {self.batch_size}")
        if run and (not self.run or not Path(self.run).is_dir()):
            raise ArtifactError(f"run directory {self.run or '(none)'} does not exist; train one with `qpm train`")
        return self

    @property
    def scores(self) -> list[str]:
        """The scores to calibrate, in order, each once."""
        return list(dict.fromkeys(s.strip() for s in str(self.score).split(",") if s.strip()))

    def with_run(self, run: str, **changes: Any) -> ConformalRequest:
        """The same request for ``run`` (and ``changes``)."""
        return replace(self, run=run, **changes)


def run_conformal(req: ConformalRequest, settings: Any = None, *, progress: bool = True,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``qpm conformal``: calibrate the run's final model, measure the sets on its test split at once, and add the
    entries (one per score) to ``RUN/conformal.json`` (an entry with the same alpha, score and per-class choice is
    replaced; the file is written atomically, with no clock in it, so the same request gives the same bytes) while
    holding the run-folder lock. Returns a summary: ``calibration`` (the last entry), ``results`` (every entry of this
    request), the file."""
    from qpmcli import artifact
    from qpmcli.evaluate import open_run_caches
    from qpmcli.files import clean_stale_temps
    from qpmcli.modelfile import metadata_from_run
    from qpmcli.progress import progress_bar

    t0 = time.perf_counter()
    req.checked()
    say = log or (lambda _m: None)
    run = Path(req.run)
    held = artifact.RunFolder(run).calibration_split()
    if held and req.cal_fraction is not None:
        raise ConfigError(f"{run} holds out a calibration split at training ({held.get('fraction')} of the training "
                          f"images); --cal-fraction applies only to runs without one")
    if settings is None:
        from qpmcli.settings import resolve_settings

        settings, _ = resolve_settings()
    device = req.device or settings.torch_device()
    with artifact.run_lock(run, "qpm conformal"):  # one writer per run folder (not while `qpm train` rewrites it)
        model, info = artifact.load_model(run, "final", device=device)
        train_cache, test_cache = open_run_caches(run, info)
        meta = metadata_from_run(model, info, run_dir=run)  # an existing conformal.json of another model stops here
        sparse = class_features(meta.weight)[0].shape[1] <= TREE_MAX_FEATURES
        if "hier" in req.scores and not sparse:
            raise ConfigError("the hier score ranks each class's few features; this model's head is dense (every "
                              "class uses every feature): use --score lac or aps")
        labels = np.asarray(train_cache.labels, dtype=np.int64)
        if held:
            cal_rows = held_out_rows(held, len(train_cache), str(run / artifact.CONFIG))
            source = {"split": "held-out", "held_out": True, "fraction": held.get("fraction"),
                      "seed": held.get("seed"), "n": int(cal_rows.size)}
        else:
            fraction = DEFAULT_CAL_FRACTION if req.cal_fraction is None else req.cal_fraction
            cal_rows = calibration_split(labels, fraction, req.seed)[1]
            source = {"split": "train", "held_out": False, "fraction": fraction, "seed": req.seed,
                      "n": int(cal_rows.size), "note": "these images were seen in training (the run holds out no "
                      "calibration split), so the coverage guarantee does not hold; the test coverage beside it is "
                      "the honest number. Train with `qpm train --cal-fraction 0.2` for a guarantee."}
        if cal_rows.size == 0:
            raise ArtifactError(f"the calibration split of {run} is empty; use a larger --cal-fraction")
        say(f"calibrating on {cal_rows.size} {'held-out' if held else 'training'} images, testing on "
            f"{len(test_cache)} test images")
        with progress_bar(enabled=progress) as bar:
            task = bar.add_task("model outputs", total=2)
            cal = _outputs(model, train_cache, cal_rows, device, req.batch_size)
            bar.advance(task)
            test = _outputs(model, test_cache, None, device, req.batch_size)
            bar.advance(task)
        weight = meta.weight if sparse else None
        cal_values = meta.standardize(cal["features"], np.float64) if sparse else None
        test_values = meta.standardize(test["features"], np.float64) if sparse else None
        results = []
        for score in req.scores:
            entry = calibrate(score, cal["logits"], cal["labels"], req.alpha, values=cal_values, weight=weight,
                              per_class=req.per_class, seed=req.seed)
            entry["seed"] = req.seed
            entry["source"] = source
            entry["test"] = evaluate_sets(entry, test["logits"], test["labels"], values=test_values, weight=weight)
            meta.conformal = add_calibration(meta, entry)
            results.append(entry)
        clean_stale_temps([run])  # what a killed writer of this run left (qpm's names, dead pids)
        path = run / artifact.CONFORMAL
        artifact.atomic_write_json(path, meta.conformal)
    return {"run": str(run), "file": str(path), "calibration": results[-1], "results": results,
            "class_names": meta.class_names, "calibrations": len(meta.conformal["calibrations"]),
            "seconds": round(time.perf_counter() - t0, 3)}


def _outputs(model: Any, cache: TokenCache, rows: np.ndarray | None, device: str, batch_size: int
             ) -> dict[str, np.ndarray]:
    """Logits, pooled features and labels of (some rows of) a cache, by the training loop's eval pass."""
    from qpmcli.loop import TokenData, collect_token_outputs

    data = TokenData(cache.tokens, cache.labels, device, hold=False, rows=rows)
    out = collect_token_outputs(model, data, batch_size)
    return {k: v.numpy() for k, v in out.items()}


__all__ = ["DEFAULT_ALPHA", "DEFAULT_CAL_FRACTION", "ConformalRequest", "run_conformal"]

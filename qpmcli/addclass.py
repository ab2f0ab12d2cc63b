"""``qpm add-class NAME IMG_DIR [RUN] -o NEW_RUN``: a new class from a few images, without touching the old ones.

The backbone and the adapter stay frozen and so do the old classes' rows of W: the new run's logits of every old class
are bit-identical to the parent's (checked on the test cache, :func:`run_add_class` reports the digests). What is fit:

1. **The new class's k features** (its row of the binary W): the exact best choice, under the distinct-rows rule, of
   k of the model's K selected features for the selection objective's class term (METHOD.md §6.5; the pair penalty
   does not change, because the selected set does not). The class term needs ``A[:, new]``: the Pearson correlation
   of each selected feature (pooled, from the frozen model) with the new-class indicator over the run's training
   images plus the given images (§6.1's formula). :func:`best_row` finds the best k-subset that is not an existing
   class's row by a best-first enumeration of k-subsets in order of decreasing value (exact; at most C + 1 subsets
   are visited: 10-20 ms at K = 50, k = 5, C = 200, where a numpy enumeration of all C(50, 5) = 2.1 M took 7.4 s).
2. **Its bias** (a QPM head has none; old classes get 0, which leaves their logits bit-identical): with
   ``d = best old logit - the new class's unbiased logit`` per image, the new class wins an image iff ``b > d``.
   ``b`` is the threshold between consecutive d values of the given images and the old classes' training images
   with the fewest mistakes on them (each image counts once, so old classes are not traded away for a few given
   images), the widest such gap on ties, ``b`` in its middle: the max-margin threshold when the two separate.
   ``bias=False`` keeps the pure QPM head (no bias).

The images go through :func:`qpmcli.predict.load_classifier` (the backbone and preprocessing of ``qpm predict``).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpmcli import artifact
from qpmcli.childrun import ParentHead, read_head
from qpmcli.errors import ConfigError, ImageError, SelectionError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np


@dataclass
class AddClassRequest:
    """``qpm add-class``: the new class's ``name``, its ``images`` (a folder or files), the parent ``run``, the new
    run's folder ``out``, whether to fit a ``bias``, the new run's ``metrics`` (``none``: none), ``force`` (replace a
    non-run output folder), the ``device`` and the image ``batch_size``."""

    name: str
    images: str
    run: str
    out: str | None = None
    bias: bool = True
    metrics: str = "Accuracy"
    force: bool = False
    device: str = "auto"
    batch_size: int = 16
    head: ParentHead | None = field(default=None, repr=False)  # read by checked()
    paths: list[Path] = field(default_factory=list, repr=False)  # the images found by checked()

    def checked(self) -> AddClassRequest:
        """Every check before any work: the name is new, the images exist, the parent is a QPM run with a free
        feature set for one more class, the output folder, the metrics and the device."""
        from qpmcli.checks import check_positive
        from qpmcli.childrun import check_out
        from qpmcli.device import check_device
        from qpmcli.images import list_images

        name = str(self.name).strip()
        if not name or any(ch in name for ch in "\n\r\t"):
            raise ConfigError(f"NAME {self.name!r}: give the new class a name (one line of text)")
        self.name = name
        self.head = head = read_head(self.run)
        if name.lower() in (c.lower() for c in head.class_names):
            raise ConfigError(f"class {name!r} already exists in {head.run}; choose another name")
        n_rows = math.comb(len(head.features), head.per_class)
        if head.n_classes >= n_rows:
            raise SelectionError(f"{head.run} already uses all C({len(head.features)},{head.per_class}) = {n_rows} "
                                 f"feature sets; a new class needs its own")
        check_out(self.out, head.run, force=self.force)
        folder = Path(self.images).expanduser()
        if not folder.exists():
            raise ImageError(f"IMG_DIR {folder} does not exist; give a folder with the new class's images")
        self.paths = [p for p in list_images([folder]) if p.is_file()]
        if not self.paths:
            raise ImageError(f"IMG_DIR {folder} holds no images (.jpg, .png, ...)")
        check_positive(self.batch_size, "--batch-size")
        self.metric_keys()
        check_device(self.device, torch=True)
        return self

    def metric_keys(self) -> list[str]:
        if str(self.metrics).strip().lower() == "none":
            return []
        from qpmcli.metricnames import checked_metric_names

        return checked_metric_names(self.metrics)


# ------------------------------------------------------------------------------------------------- the new row
def best_row(values: np.ndarray, weight: np.ndarray, k: int) -> tuple[list[int], int]:
    """The k columns with the largest sum of ``values [K]`` whose set is not a row of ``weight [C, K]`` (exact), and
    how many better sets were taken; ties go to the set of better-ranked columns (values descending, then index).

    Best-first search over k-subsets: a subset is a sorted tuple of ranks, its successors move one rank down by one,
    so a successor never has a larger sum and popping the heap yields the subsets in order of decreasing sum."""
    import numpy as np

    order = np.lexsort((np.arange(len(values)), -np.asarray(values, dtype=np.float64)))
    vals = np.asarray(values, dtype=np.float64)[order]
    taken = {frozenset(int(j) for j in np.flatnonzero(r)) for r in weight}
    K = len(vals)
    start = tuple(range(k))
    heap = [(-float(vals[list(start)].sum()), start)]
    seen = {start}
    skipped = 0
    while heap:
        _, ranks = heapq.heappop(heap)
        cols = frozenset(int(order[r]) for r in ranks)
        if cols not in taken:
            return sorted(cols), skipped
        skipped += 1
        for i in range(k):
            nxt = ranks[i] + 1
            if nxt < K and (i == k - 1 or nxt < ranks[i + 1]):
                cand = ranks[:i] + (nxt,) + ranks[i + 1:]
                if cand not in seen:
                    seen.add(cand)
                    heapq.heappush(heap, (-float(vals[list(cand)].sum()), cand))
    raise SelectionError(f"every set of {k} of the {K} features is taken by a class")


def fit_bias(pos: np.ndarray, neg: np.ndarray) -> tuple[float, dict[str, Any]]:
    """The new class's bias from ``d = best old logit - unbiased new logit`` of the given images (``pos``) and of the
    old classes' training images (``neg``): among the thresholds between consecutive d values, the one with the
    fewest mistakes on both (each image counts once), the widest gap on ties, ``b`` in its middle. Returns
    ``(b, facts)``."""
    import numpy as np

    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    pts = np.unique(np.concatenate([pos, neg]))
    cands = np.concatenate([[pts[0] - 1.0], (pts[:-1] + pts[1:]) / 2, [pts[-1] + 1.0]])
    gaps = np.concatenate([[0.0], np.diff(pts), [0.0]])
    won = np.searchsorted(np.sort(pos), cands, side="left")  # given images the new class wins: d < b
    taken = np.searchsorted(np.sort(neg), cands, side="left")  # old training images it takes: d < b
    errors = (len(pos) - won) + taken
    best = int(np.lexsort((-gaps, errors))[0])
    b = float(cands[best])
    return b, {"bias": b, "margin": float(gaps[best]) / 2, "given_recall": float(won[best] / len(pos)),
               "train_images_taken": int(taken[best]), "train_images": int(len(neg))}


def grown_model(model: Any, weight: np.ndarray, bias: np.ndarray | None) -> Any:
    """A copy of the sparse ``model`` with one more class: the same adapter and buffers, W = ``weight [C+1, K]``,
    the head bias ``bias [C+1]`` (or none), the dense head (kept for reference) padded with a zero row."""
    import torch

    from qpmcli.model import QPMModel

    cfg = dict(model.config)
    sel = cfg.pop("selection")
    new = QPMModel.from_config({**cfg, "n_classes": int(weight.shape[0])})
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("sel_")}
    state["linear.weight"] = torch.cat([state["linear.weight"], torch.zeros_like(state["linear.weight"][:1])])
    state["linear.bias"] = torch.cat([state["linear.bias"], torch.zeros_like(state["linear.bias"][:1])])
    new.load_state_dict(state, strict=True)
    new.to(model.sel_index.device)
    new.set_selection(model.sel_index, torch.as_tensor(weight, dtype=torch.float32), model.sel_mu, model.sel_sigma,
                      bias=None if bias is None else torch.as_tensor(bias, dtype=torch.float32),
                      dropout=float(sel.get("dropout", 0.0)))
    return new.eval()


# ------------------------------------------------------------------------------------------------------- the job
def run_add_class(req: AddClassRequest, settings: Any, *, progress: bool = True,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``qpm add-class``: check ``req``, run its images through the frozen model, choose the row and the bias, write
    the new run aside and rename it into place. Returns a JSON-able summary (the ``edit.json`` document plus the run,
    the chosen features, the nearest class, old-class accuracy before/after and the logits digests)."""
    import numpy as np

    from qpmcli.artifact import CONFIG, RunFolder
    from qpmcli.childrun import model_digest
    from qpmcli.conformal import fitting_rows
    from qpmcli.evaluate import collect_outputs, open_run_caches
    from qpmcli.modelfile import SIGMA_MIN
    from qpmcli.predict import load_classifier
    from qpmcli.selection import compute_A

    t0 = time.perf_counter()
    say = log or (lambda _msg: None)
    req.checked()
    head = req.head
    parent_digest = model_digest(head.run)
    clf = load_classifier(head.run, req.device, settings=settings)
    model, device = clf.model, clf.device
    shots = image_outputs(clf, req.paths, req.batch_size)
    say(f"{len(req.paths)} image(s) of {req.name!r} through the frozen backbone and adapter")
    train_cache, test_cache = open_run_caches(head.run)
    train = collect_outputs(model, train_cache, device=device, progress=progress)
    rows = fitting_rows(RunFolder(head.run).calibration_split(), len(train_cache), str(head.run / CONFIG))
    if rows is not None:  # the row and the bias never see the calibration split of `train --cal-fraction`
        train = {k: v[rows] for k, v in train.items()}
    X = np.concatenate([train["features"], shots["features"]]).astype(np.float64)
    y = np.concatenate([np.zeros(len(train["features"]), np.int64), np.ones(len(shots["features"]), np.int64)])
    values = compute_A(X, y, 2)[:, 1]
    cols, skipped = best_row(values, head.weight, head.per_class)
    row = np.zeros(len(head.features), bool)
    row[cols] = True
    mu, sigma = model.sel_mu.cpu().numpy(), model.sel_sigma.cpu().numpy()

    def gap(out: dict[str, np.ndarray]) -> np.ndarray:  # best old logit - the new class's unbiased logit
        z = (out["features"].astype(np.float64) - mu) / np.maximum(sigma, SIGMA_MIN)
        return out["logits"].max(1).astype(np.float64) - z[:, row].sum(1)

    b, bias_facts = fit_bias(gap(shots), gap(train)) if req.bias else (None, None)
    W = np.concatenate([head.weight, row[None]]).astype(np.float32)
    bias = None if b is None else np.concatenate([np.zeros(head.n_classes), [b]]).astype(np.float32)
    child = grown_model(model, W, bias)
    before, after = collect_outputs(model, test_cache, device=device), collect_outputs(child, test_cache, device=device)
    from qpmcli.edit import logits_digest

    old = list(range(head.n_classes))
    y_test = before["labels"]
    keys = req.metric_keys()
    metrics: dict[str, Any] = {}
    if keys:
        from qpmcli.evaluate import evaluate_model

        metrics = evaluate_model(child, train_cache, test_cache, which=keys, seed=int(head.info.get("seed", 0) or 0),
                                 device=device, progress=False)
    shares = (head.weight & row).sum(1)
    nearest = int(np.argmax(shares))
    chosen = [{"feature": int(head.features[j]), "column": int(j), "label": feature_text(clf.metadata, head, j),
               "value": float(values[j])} for j in cols]
    record = {
        "class": {"name": req.name, "index": head.n_classes, "images": [str(p) for p in req.paths]},
        "features": chosen, "sets_skipped": skipped,
        "nearest": {"class": head.class_names[nearest], "shares": int(shares[nearest])},
        "bias": bias_facts, "metrics": metrics,
        "old_classes": {
            "accuracy_before": float((before["logits"].argmax(1) == y_test).mean()),
            "accuracy_after": float((after["logits"].argmax(1) == y_test).mean()),
            "taken_by_new_class": int((after["logits"].argmax(1) == head.n_classes).sum()),
            "logits_parent": logits_digest(before["logits"], old), "logits_child": logits_digest(after["logits"], old)},
    }
    record["old_classes"]["identical"] = record["old_classes"]["logits_parent"] == record["old_classes"]["logits_child"]
    out = _write(req, head, clf.metadata, child, W, record, parent_digest)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def feature_text(meta: Any, head: ParentHead, column: int) -> str:
    from qpmcli.childrun import feature_label

    return feature_label(meta, int(head.features[column]))


def image_outputs(clf: Any, paths: list[Path], batch_size: int) -> dict[str, np.ndarray]:
    """``logits`` and ``features`` of the images (the classifier's own preprocessing); an unreadable image is an
    :class:`ImageError` naming it (the class is defined by these images, so none is skipped)."""
    import numpy as np

    from qpmcli.images import open_image

    logits, feats = [], []
    for s in range(0, len(paths), batch_size):
        out = clf.run([open_image(p) for p in paths[s:s + batch_size]])
        logits.append(out["logits"])
        feats.append(out["features"])
    return {"logits": np.concatenate(logits), "features": np.concatenate(feats)}


def _write(req: AddClassRequest, head: ParentHead, meta: Any, child: Any, W: np.ndarray, record: dict[str, Any],
           parent_digest: dict[str, str]) -> dict[str, Any]:
    from qpmcli.childrun import (
        carry_feature_names,
        carry_parent_files,
        carry_prototypes,
        check_out,
        child_info,
        edit_record,
        staged_run,
        weights_digest,
    )
    from qpmcli.edit import write_selection

    out = check_out(req.out, head.run, force=req.force)
    names = [*head.class_names, req.name]
    with staged_run(out) as stage:
        carried = carry_parent_files(head.run, stage)
        write_selection(stage, head, W.astype(bool), head.features, None, note="qpm add-class", class_names=names)
        artifact.save_model(child, stage, "final", info=child_info(head.info, class_names=names,
                                                                   metrics=record["metrics"]))
        parent_metrics = artifact.read_json(head.run / artifact.METRICS) if (head.run / artifact.METRICS).is_file() \
            else {}
        artifact.atomic_write_json(stage / artifact.METRICS, {"dense": parent_metrics.get("dense"),
                                                              "final": record["metrics"]})
        prototypes = "copied" if carry_prototypes(head.run, stage) else "none"
        notes = [n for n in [carry_feature_names(head.run, stage)] if n]
        doc = edit_record("add-class", head.run, parent_digest, **record, prototypes=prototypes, carried=carried,
                          notes=notes, weights_digest=weights_digest(stage / artifact.MODEL))
        artifact.atomic_write_json(stage / artifact.EDIT, doc)
    return {**doc, "run": str(out)}

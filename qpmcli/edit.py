"""``qpm edit``: change which features a class uses, optionally finetune the adapter again, and show what changed.

Operations, applied in this order to the parent's binary class-feature matrix W:

1. ``--set CLASS=f1,...,fk``: the class's row becomes exactly these k selected features;
2. ``--swap CLASS OLD NEW``: the class uses the selected feature NEW instead of OLD;
3. ``--drop-feature F``: no class uses F any more; each class that did gets the replacement that maximises the
   selection objective (METHOD.md §6.5) restricted to its row, the other rows fixed, under the distinct-rows rule
   and never a feature redundant with F (:func:`refill`), unless ``--no-refill`` (those classes then keep k-1
   features).

Every constraint (k features per class, distinct class rows, ids in range and selected, class names) is checked by
:meth:`EditRequest.checked` before any work. The model keeps its column layout: a dropped feature's column stays,
all zeros, unless a replacement from the unselected dense features takes it over (the adapter computes all n_f
features, so any of them can become a column). Classes whose rows did not change therefore keep bit-identical logits
when there is no ``--refit``. ``--refit EPOCHS`` finetunes the adapter on the cached tokens with W, mu and sigma fixed
(the finetune phase of ``qpm train``, :func:`qpmcli.loop.train_phase`). ``--verify`` compares the parent and the child
on the test cache. The child is a new run (:mod:`qpmcli.childrun`); the parent is never written.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpmcli import artifact
from qpmcli.childrun import ParentHead, duplicate_rows, read_head
from qpmcli.errors import ArtifactError, ConfigError, SelectionError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

REFILL_FROM = ("all", "selected")


# ------------------------------------------------------------------------------------------------------- parsing
def parse_feature(text: Any, what: str) -> int:
    """A feature id as typed: ``17`` or ``f17``."""
    s = str(text).strip()
    m = re.fullmatch(r"[fF]?(\d+)", s)
    if not m:
        raise ConfigError(f"{what}: {s!r} is not a feature id (give a number such as 17 or f17)")
    return int(m.group(1))


def parse_row(text: str) -> tuple[str, list[int]]:
    """``CLASS=f1,f2,...`` -> (class, feature ids)."""
    cls, sep, ids = str(text).rpartition("=")
    if not sep or not cls.strip():
        raise ConfigError(f"--set {text!r}: expected CLASS=f1,f2,... (a class name or index, '=', feature ids)")
    return cls.strip(), [parse_feature(f, f"--set {cls.strip()}") for f in ids.split(",") if f.strip()]


def resolve_class(query: str, names: list[str], flag: str) -> int:
    """A class index from a name or index, as ``qpm explain --class`` resolves it; the flag in the error."""
    from qpmcli.evidence import resolve_class as resolve

    try:
        return resolve(query, names)
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


# ------------------------------------------------------------------------------------------------------ the plan
@dataclass
class EditPlan:
    """W after the explicit operations and the drops (``weight [C, K]`` bool), the column features, the dropped
    features, the classes that lost a dropped feature (to be refilled) and k."""

    weight: np.ndarray
    features: np.ndarray
    dropped: list[int]
    affected: list[int]
    per_class: int


@dataclass
class EditRequest:
    """``qpm edit RUN -o NEW_RUN``: the operations (see the module docstring), ``refill``/``refill_from`` (``all``: a
    replacement may come from the unselected dense features into the freed column; ``selected``: only features the
    model already has), ``allow_redundant`` (a replacement may be redundant with a dropped feature), ``refit``
    epochs, ``verify``, the child's ``metrics`` (names as ``qpm evaluate``; ``none``: none), the ``seed`` of the refit
    (default: the parent's), ``force`` (replace a non-run output folder) and the ``device``."""

    run: str
    out: str | None = None
    sets: tuple[str, ...] = ()
    swaps: tuple[tuple[str, str, str], ...] = ()
    drop: tuple[str, ...] = ()
    refill: bool = True
    refill_from: str = "all"
    allow_redundant: bool = False
    refit: int = 0
    verify: bool = False
    metrics: str = "Accuracy"
    seed: int | None = None
    force: bool = False
    device: str = "auto"
    head: ParentHead | None = field(default=None, repr=False)  # read by checked()

    def checked(self) -> EditRequest:
        """Every check before any work, one line each: the parent is a QPM run, the output folder, the options, and
        the operations against the parent's head (classes, ids in range and selected, k per class, distinct rows)."""
        from qpmcli.checks import check_choice
        from qpmcli.childrun import check_out
        from qpmcli.device import check_device

        self.head = read_head(self.run)
        check_out(self.out, self.head.run, force=self.force)
        check_choice(self.refill_from, REFILL_FROM, "--refill-from")
        if self.refit < 0:
            raise ConfigError(f"--refit must be 0 or a number of epochs, got {self.refit}")
        self.metric_keys()
        check_device(self.device, torch=True)
        if not (self.sets or self.swaps or self.drop or self.refit):
            raise ConfigError("nothing to edit: give --set, --swap, --drop-feature or --refit")
        plan = self.plan()
        if plan.affected and self.refill and not (self.head.run / artifact.DENSE_FEATURES).is_file():
            raise ArtifactError(f"{self.head.run / artifact.DENSE_FEATURES} is missing, so replacements cannot be "
                                f"chosen by the selection objective; pass --no-refill or choose them with --set")
        return self

    def metric_keys(self) -> list[str]:
        if str(self.metrics).strip().lower() == "none":
            return []
        from qpmcli.metricnames import checked_metric_names

        return checked_metric_names(self.metrics)

    def plan(self) -> EditPlan:
        """Apply the explicit operations and the drops to W (checked; the refill comes later, in :func:`run_edit`)."""
        import numpy as np

        head = self.head or read_head(self.run)
        names, feats, k = head.class_names, head.features, head.per_class
        col = {int(f): j for j, f in enumerate(feats)}
        W = head.weight.copy()
        listing = ", ".join(str(int(f)) for f in sorted(feats))

        def selected(fid: int, flag: str) -> int:
            if not 0 <= fid < head.n_dense:
                raise ConfigError(f"{flag}: feature {fid} is out of range 0..{head.n_dense - 1}")
            if fid not in col:
                raise ConfigError(f"{flag}: feature {fid} is not one of the model's {len(feats)} selected features "
                                  f"({listing})")
            return col[fid]

        dropped = [parse_feature(f, "--drop-feature") for f in self.drop]
        if len(set(dropped)) != len(dropped):
            raise ConfigError("--drop-feature: a feature is given twice")
        for text in self.sets:
            cls, ids = parse_row(text)
            c = resolve_class(cls, names, "--set")
            flag = f"--set {names[c]}"
            if len(ids) != k or len(set(ids)) != k:
                raise ConfigError(f"{flag}: give exactly {k} different features (every class uses k = {k}), got "
                                  f"{len(ids)}{'' if len(set(ids)) == len(ids) else ' with repeats'}")
            cols = [selected(f, flag) for f in ids]
            for f in ids:
                if f in dropped:
                    raise ConfigError(f"{flag}: feature {f} is also dropped by --drop-feature")
            W[c] = False
            W[c, cols] = True
        for cls, old_text, new_text in self.swaps:
            c = resolve_class(cls, names, "--swap")
            flag = f"--swap {names[c]}"
            old, new = parse_feature(old_text, flag), parse_feature(new_text, flag)
            j_old, j_new = selected(old, flag), selected(new, flag)
            if not W[c, j_old]:
                raise ConfigError(f"{flag}: class {names[c]!r} does not use feature {old} (it uses "
                                  f"{', '.join(map(str, head.row(c, W)))})")
            if W[c, j_new]:
                raise ConfigError(f"{flag}: class {names[c]!r} already uses feature {new}")
            if new in dropped:
                raise ConfigError(f"{flag}: feature {new} is also dropped by --drop-feature")
            W[c, j_old], W[c, j_new] = False, True
        affected: set[int] = set()
        for fid in dropped:
            j = selected(fid, "--drop-feature")
            users = np.flatnonzero(W[:, j])
            if users.size == 0:
                raise ConfigError(f"--drop-feature: no class uses feature {fid}; nothing to drop")
            affected.update(int(c) for c in users)
            W[:, j] = False
        for c in range(len(names)):
            if not W[c].any():
                raise ConfigError(f"--drop-feature: class {names[c]!r} would be left without features; give it new "
                                  f"ones with --set")
        # With a refill the affected rows are completed later (always distinct); all others must be distinct now.
        check = [c for c in range(len(names)) if not (self.refill and c in affected)]
        pair = duplicate_rows(W[check])
        if pair is not None:
            a, b = check[pair[0]], check[pair[1]]
            raise ConfigError(f"the edit makes classes {names[a]!r} and {names[b]!r} use the same features "
                              f"({', '.join(map(str, head.row(a, W)))}); every class needs its own set")
        return EditPlan(weight=W, features=feats.copy(), dropped=dropped, affected=sorted(affected), per_class=k)


# ------------------------------------------------------------------------------------------------------- refill
@dataclass
class Objective:
    """The selection objective of a run (METHOD.md §6.5): ``coef [n_f, C] = 1000/(kC) A`` and the symmetric pair
    penalty matrix ``P [n_f, n_f]`` (R-tilde on the disallowed pairs of tau, §6.4)."""

    coef: np.ndarray
    P: np.ndarray
    threshold: float
    threshold_rule: str

    def value(self, features: np.ndarray, weight: np.ndarray) -> float:
        """Z of a selection: the class term over W's entries minus the penalty among the features in use."""
        import numpy as np

        used = np.unique(features[weight.any(0)])
        gain = float(sum(self.coef[features[np.flatnonzero(r)], c].sum() for c, r in enumerate(weight)))
        return gain - 0.5 * float(self.P[np.ix_(used, used)].sum())


def run_objective(head: ParentHead) -> Objective:
    """The objective of ``head``'s run: A and R from ``dense_features.npz`` (:func:`qpmcli.selection.problem_from_run`),
    tau from the run's selection (``selection.json`` params) or, when it records none, the redundancy threshold for
    K = the run's column count (:func:`qpmcli.selection.clique_threshold`)."""
    import numpy as np

    from qpmcli.selection import clique_threshold, disallowed_pairs, problem_from_run

    params: dict[str, Any] = {}
    if (head.run / artifact.SELECTION).is_file():
        doc = artifact.read_json(head.run / artifact.SELECTION)
        params = doc.get("params") or {} if isinstance(doc, dict) else {}
    rule = params.get("threshold_rule") if params.get("threshold_rule") in ("reference", "greedy-bisect") else \
        "reference"
    problem = problem_from_run(head.run, threshold_rule=rule)
    if problem.n_classes != head.n_classes or problem.n_features_total != head.n_dense:
        raise SelectionError(f"{head.run / artifact.DENSE_FEATURES} has {problem.n_features_total} features and "
                             f"{problem.n_classes} classes; the model has {head.n_dense} and {head.n_classes}")
    tau = params.get("threshold")
    if not isinstance(tau, int | float) or not math.isfinite(tau):
        tau = clique_threshold(problem.R, len(head.features), rule=rule).threshold
    pairs, w = disallowed_pairs(problem.R, float(tau))
    P = np.zeros((head.n_dense, head.n_dense))
    if len(pairs):
        P[pairs[:, 0], pairs[:, 1]] = w
        P[pairs[:, 1], pairs[:, 0]] = w
    coef = np.asarray(problem.A, dtype=np.float64) * (1000.0 / (head.per_class * head.n_classes))
    return Objective(coef=coef, P=P, threshold=float(tau), threshold_rule=rule)


REFILL_NODES = 200_000  # search budget of refill(); far above what conflicts between replacements need


def refill(plan: EditPlan, objective: Objective, *, allow_unselected: bool = True, allow_redundant: bool = False,
           ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]], bool]:
    """Complete the rows of ``plan.affected`` with one replacement each so that the objective is maximal, every
    other row fixed, under the distinct-rows rule; returns ``(weight, features, choices, exact)``.

    Candidates for a class: the features in use by some class (gain ``coef[g, c]``); a feature whose column no class
    uses any more, other than a dropped one (gain minus its penalty with the features in use); and, with
    ``allow_unselected``, every unselected dense feature (the same gain), which then takes over the lowest free
    column (a dropped feature's column first; classes may share it), so the model never uses more than K features.
    Dropped features never come back, and unless ``allow_redundant`` neither does a feature redundant with one
    (a disallowed pair of the selection, R >= tau: the same class information under another id).

    The joint choice is exact: a depth-first branch and bound over the affected classes (in class order, candidates
    by decreasing gain, ties to a feature already in use, then the lowest id); a branch is cut when its gain plus
    each remaining class's largest coefficient cannot beat the best complete choice. ``exact`` is false only if
    :data:`REFILL_NODES` nodes did not finish the search (the best choice found is used).
    """
    import numpy as np

    dropped = set(plan.dropped)
    n_f = objective.coef.shape[0]
    affected = list(plan.affected)
    banned = set(dropped)
    if not allow_redundant and dropped:
        banned |= {int(g) for g in np.flatnonzero((objective.P[:, sorted(dropped)] > 0).any(1))}
    banned_ids = np.asarray(sorted(banned), np.int64)

    def candidates(W: np.ndarray, feats: np.ndarray, c: int) -> list[tuple[float, int, int, int]]:
        used = W.any(0)
        in_use = feats[used]
        others = {bytes(r) for i, r in enumerate(W) if i != c}
        free = sorted(np.flatnonzero(~used).tolist(), key=lambda j: (int(feats[j]) not in dropped, j))
        cands = [(float(objective.coef[feats[j], c]), 0, int(feats[j]), int(j)) for j in np.flatnonzero(used & ~W[c])
                 if int(feats[j]) not in banned]
        for j in free:
            g = int(feats[j])
            if g not in banned:
                cands.append((float(objective.coef[g, c] - objective.P[g, in_use].sum()), 1, g, int(j)))
        if allow_unselected and free:
            outside = np.setdiff1d(np.arange(n_f), np.concatenate([feats, banned_ids]))
            vals = objective.coef[outside, c] - objective.P[np.ix_(outside, in_use)].sum(1)
            cands += [(float(v), 2, int(g), int(free[0])) for v, g in zip(vals, outside, strict=True)]
        valid = []
        for cand in cands:
            row = W[c].copy()
            row[cand[3]] = True
            if bytes(row) not in others:
                valid.append(cand)
        return sorted(valid, key=lambda t: (-t[0], t[1] > 0, t[2]))

    # A bound on what each class can still gain: its best coefficient over the features it may get (penalties >= 0).
    pool = np.setdiff1d(np.arange(n_f) if allow_unselected else plan.features, banned_ids)
    gain_bound = [float(objective.coef[pool, c].max()) for c in affected]
    rest = [sum(gain_bound[i + 1:]) for i in range(len(affected))]
    best: dict[str, Any] = {"value": -math.inf, "state": None}
    nodes = 0

    def search(i: int, W: np.ndarray, feats: np.ndarray, total: float, chosen: list) -> None:
        nonlocal nodes
        nodes += 1
        if i == len(affected):
            if total > best["value"] + 1e-9:
                best.update(value=total, state=(W, feats, chosen))
            return
        c = affected[i]
        for value, kind, g, j in candidates(W, feats, c):
            if total + value + rest[i] <= best["value"] + 1e-9 or nodes > REFILL_NODES:
                break  # candidates come by decreasing gain: no later one can do better
            W2, f2 = W.copy(), feats.copy()
            W2[c, j] = True
            f2[j] = g
            choice = {"class": c, "feature": g, "column": j, "value": value,
                      "source": ("selected", "unused column", "unselected")[kind],
                      **({"replaces_column_of": int(feats[j])} if int(feats[j]) != g else {})}
            search(i + 1, W2, f2, total + value, [*chosen, choice])

    search(0, plan.weight.copy(), plan.features.copy(), 0.0, [])
    if best["state"] is None:
        raise SelectionError("no choice of replacements keeps every class's feature set distinct (features "
                             "redundant with a dropped one excluded); choose them with --set or pass --allow-redundant")
    W, feats, chosen = best["state"]
    return W, feats, chosen, nodes <= REFILL_NODES


# ------------------------------------------------------------------------------------------------------- the job
def run_edit(req: EditRequest, settings: Any, *, progress: bool = True,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``qpm edit``: check ``req``, build the child model (refill, new columns' mu/sigma, refit), evaluate it, write
    the child run aside and rename it into place. Returns a JSON-able summary: the ``edit.json`` document plus the
    run, the metrics, the verify report (``verify``) and the seconds taken."""
    import copy

    import numpy as np

    from qpmcli.childrun import model_digest
    from qpmcli.device import torch_device

    t0 = time.perf_counter()
    say = log or (lambda _msg: None)
    req.checked()
    head = req.head
    plan = req.plan()
    parent_digest = model_digest(head.run)
    weight, features, choices, objective = plan.weight, plan.features, [], None
    if plan.affected and req.refill:
        objective = run_objective(head)
        weight, features, choices, exact = refill(plan, objective, allow_unselected=req.refill_from == "all",
                                                  allow_redundant=req.allow_redundant)
        if not exact:
            say("note: the refill search hit its node budget; the best replacements found are used")
    device = torch_device(req.device)
    model, info = artifact.load_model(head.run, device=device)
    new_columns = [int(j) for j in np.flatnonzero(features != head.features)]
    keys = req.metric_keys()
    caches = rows = None
    if new_columns or req.refit or req.verify or keys:
        from qpmcli.conformal import fitting_rows
        from qpmcli.evaluate import open_run_caches

        caches = open_run_caches(head.run)
        # the refit and new features' statistics never see the calibration split of `qpm train --cal-fraction`
        rows = fitting_rows(artifact.RunFolder(head.run).calibration_split(), len(caches[0]),
                            str(head.run / artifact.CONFIG))
    mu, sigma = model.sel_mu.detach().clone(), model.sel_sigma.detach().clone()
    if new_columns:  # a feature new to the model is standardised with its statistics under the current adapter
        from qpmcli.loop import TokenData, collect_pooled, feature_stats

        say(f"statistics of the new feature(s) {', '.join(str(int(features[j])) for j in new_columns)}")
        m, s = feature_stats(collect_pooled(model, TokenData(caches[0].tokens, caches[0].labels, device, rows=rows)))
        for j in new_columns:
            mu[j], sigma[j] = m[int(features[j])], s[int(features[j])]
    child = copy.deepcopy(model)
    child.set_selection(features, weight.astype(np.float32), mu, sigma, bias=getattr(model, "sel_bias", None),
                        dropout=float(model.selection_info.get("dropout", 0.0)))
    seed = int(req.seed if req.seed is not None else info.get("seed", 0) or 0)
    refit = _refit(child, caches, rows, head, req.refit, seed, progress, say) if req.refit else None
    metrics: dict[str, Any] = {}
    if keys:
        from qpmcli.evaluate import evaluate_model

        metrics = evaluate_model(child, caches[0], caches[1], which=keys, seed=seed, device=device, progress=False)
    diff = row_diff(head, head.weight, head.features, weight, features)
    verify = verify_report(model, child, caches[1], head, diff, refit is not None, device) if req.verify else None
    summary = _write_child(req, head, info, child, model, weight, features, caches, {
        "operations": {"set": list(req.sets), "swap": [list(s) for s in req.swaps],
                       "drop_feature": plan.dropped, "refill": req.refill, "refill_from": req.refill_from,
                       "allow_redundant": req.allow_redundant},
        "diff": diff, "refill": choices,
        "columns": [{"column": j, "before": int(head.features[j]), "after": int(features[j])} for j in new_columns],
        "unused_features": [int(f) for f in features[~weight.any(0)]],
        "objective": None if objective is None else {
            "before": objective.value(head.features, head.weight), "after": objective.value(features, weight),
            "threshold": objective.threshold, "threshold_rule": objective.threshold_rule},
        "seed": seed, "refit": refit, "metrics": metrics}, parent_digest, say, progress)
    summary.update(verify=verify, seconds=round(time.perf_counter() - t0, 3))
    return summary


def _refit(child: Any, caches: Any, rows: Any, head: ParentHead, epochs: int, seed: int, progress: bool,
           say: Callable[[str], None]) -> dict[str, Any]:
    """Finetune ``child``'s adapter for ``epochs`` on the cached train tokens (``rows``: the fitting rows, ``None`` =
    all) with W, mu and sigma fixed: the run's finetune options (``config.json``; the paper's otherwise), the phase
    ``edit-refit`` seeded by ``seed``."""
    from dataclasses import replace

    from qpmcli.loop import FINETUNE_PHASE, PhaseOptions, TokenData, train_phase

    config = artifact.read_json(head.run / artifact.CONFIG)
    ft = (config.get("request") or {}).get("finetune")
    try:
        opts = PhaseOptions.from_dict(ft) if isinstance(ft, dict) else FINETUNE_PHASE
    except (TypeError, KeyError) as exc:
        raise ArtifactError(f"{head.run / artifact.CONFIG}: unreadable finetune options ({exc})") from exc
    opts = replace(opts, epochs=int(epochs), eval_every=0)
    device = str(next(child.parameters()).device)
    say(f"refitting the adapter for {epochs} epoch(s) with the class-feature matrix fixed")
    history: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    train_phase(child, TokenData(caches[0].tokens, caches[0].labels, device, rows=rows), opts, phase="edit-refit",
                seed=seed, test_data=TokenData(caches[1].tokens, caches[1].labels, device),
                on_epoch=history.append, progress=progress)
    return {"epochs": int(epochs), "seed": seed, "options": opts.to_dict(), "history": history,
            "seconds": round(time.perf_counter() - t0, 3)}


def row_diff(head: ParentHead, W0: np.ndarray, f0: np.ndarray, W1: np.ndarray, f1: np.ndarray,
             ) -> list[dict[str, Any]]:
    """Per changed class: its index, name, the features it lost and the ones it gained (dense ids)."""
    out = []
    for c, name in enumerate(head.class_names):
        before = {int(f0[j]) for j in range(len(f0)) if W0[c, j]}
        after = {int(f1[j]) for j in range(len(f1)) if W1[c, j]}
        if before != after:
            out.append({"index": c, "class": name, "removed": sorted(before - after), "added": sorted(after - before)})
    return out


def unchanged_classes(diff: list[dict[str, Any]], n_classes: int) -> list[int]:
    edited = {d["index"] for d in diff}
    return [c for c in range(n_classes) if c not in edited]


def logits_digest(logits: np.ndarray, classes: list[int]) -> str:
    """SHA-256 of the float32 logits of ``classes`` (columns), row-major: equal digests = bit-identical logits."""
    import hashlib

    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(logits[:, classes], dtype=np.float32).tobytes()).hexdigest()


def _reliance(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray, row: np.ndarray, column: int | None,
              rows: np.ndarray) -> float | None:
    """Mean share of feature ``column`` in the class's evidence: ``|z_f| / sum_{j in row} |z_j|`` over ``rows``."""
    import numpy as np

    from qpmcli.modelfile import SIGMA_MIN

    if rows.size == 0:
        return None
    if column is None or not row[column]:
        return 0.0
    z = np.abs((features[rows] - mu) / np.maximum(sigma, SIGMA_MIN))[:, row.astype(bool)]
    share = np.abs((features[rows, column] - mu[column]) / max(float(sigma[column]), SIGMA_MIN))
    return float(np.mean(share / np.maximum(z.sum(1), 1e-12)))


def verify_report(parent: Any, child: Any, test_cache: Any, head: ParentHead, diff: list[dict[str, Any]],
                  refit: bool, device: str) -> dict[str, Any]:
    """Parent vs child on the test cache: overall and per-class accuracy, the predictions that changed, each edited
    class's reliance on the features it lost (their share of its evidence on its own test images), and, without a
    refit, whether the classes that were not edited kept bit-identical logits (digests)."""
    import numpy as np

    from qpmcli.evaluate import collect_outputs

    a = collect_outputs(parent, test_cache, device=device)
    b = collect_outputs(child, test_cache, device=device)
    y = a["labels"]
    pa, pb = a["logits"].argmax(1), b["logits"].argmax(1)
    names = head.class_names
    per_class = [{"index": c, "class": names[c], "n": int((y == c).sum()),
                  "before": float((pa[y == c] == c).mean()) if (y == c).any() else None,
                  "after": float((pb[y == c] == c).mean()) if (y == c).any() else None} for c in range(len(names))]
    changed = np.flatnonzero(pa != pb)
    pf = {int(f): j for j, f in enumerate(head.features)}
    cf = {int(f): j for j, f in enumerate(child.sel_index.tolist())}
    pw, cw = head.weight, child.sel_weight.cpu().numpy() != 0
    pmu, psig = parent.sel_mu.cpu().numpy(), parent.sel_sigma.cpu().numpy()
    cmu, csig = child.sel_mu.cpu().numpy(), child.sel_sigma.cpu().numpy()
    reliance = []
    for d in diff:
        c, rows = d["index"], np.flatnonzero(y == d["index"])
        for f in d["removed"]:
            reliance.append({"class": d["class"], "feature": f,
                             "before": _reliance(a["features"], pmu, psig, pw[c], pf.get(f), rows),
                             "after": _reliance(b["features"], cmu, csig, cw[c], cf.get(f), rows)})
    keep = unchanged_classes(diff, len(names))
    identical = None
    if not refit and keep:
        identical = {"classes": len(keep), "parent": logits_digest(a["logits"], keep),
                     "child": logits_digest(b["logits"], keep)}
        identical["identical"] = identical["parent"] == identical["child"]
    return {"n": int(len(y)), "accuracy": {"before": float((pa == y).mean()), "after": float((pb == y).mean())},
            "per_class": per_class, "n_changed": int(changed.size),
            "changed": [{"index": int(i), "label": names[int(y[i])], "before": names[int(pa[i])],
                         "after": names[int(pb[i])]} for i in changed],
            "reliance": reliance, "unedited_logits": identical}


def _write_child(req: EditRequest, head: ParentHead, info: dict[str, Any], child: Any, parent_model: Any,
                 weight: np.ndarray, features: np.ndarray, caches: Any, record: dict[str, Any],
                 parent_digest: dict[str, str], say: Callable[[str], None], progress: bool) -> dict[str, Any]:
    """Write the child run aside (parent files, selection, model, metrics, prototypes, names, ``edit.json``) and
    rename it into place."""
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

    out = check_out(req.out, head.run, force=req.force)
    adapter_same = record["refit"] is None
    features_same = bool((features == head.features).all())
    with staged_run(out) as stage:
        carried = carry_parent_files(head.run, stage)
        write_selection(stage, head, weight, features, record.get("objective"), note="qpm edit")
        artifact.save_model(child, stage, "final", info=child_info(info, metrics=record["metrics"]))
        parent_metrics = artifact.read_json(head.run / artifact.METRICS) if (head.run / artifact.METRICS).is_file() \
            else {}
        artifact.atomic_write_json(stage / artifact.METRICS, {"dense": parent_metrics.get("dense"),
                                                              "final": record["metrics"]})
        notes: list[str] = []
        prototypes = "none"
        if adapter_same and features_same:
            prototypes = "copied" if carry_prototypes(head.run, stage) else "none"
        elif (head.run / artifact.PROTOTYPES).is_dir():
            prototypes = build_child_prototypes(child, caches, head.run, stage, notes, say, progress)
        if adapter_same and features_same:
            note = carry_feature_names(head.run, stage)
            if note:
                notes.append(note)
        doc = edit_record("edit", head.run, parent_digest, **record, prototypes=prototypes, carried=carried,
                          notes=notes, weights_digest=weights_digest(stage / artifact.MODEL))
        artifact.atomic_write_json(stage / artifact.EDIT, doc)
    return {**doc, "run": str(out)}


def write_selection(stage: Path, head: ParentHead, weight: np.ndarray, features: np.ndarray,
                    objective: dict[str, Any] | None, note: str, class_names: list[str] | None = None) -> None:
    """The child's ``selection.json`` (the selection format: features sorted, W's columns in that order)."""
    import numpy as np

    from qpmcli.contracts import Selection
    from qpmcli.selection import save_selection

    order = np.argsort(features, kind="stable")
    sel = Selection(features=features[order], weight=weight[:, order].astype(np.float64), status="EDITED",
                    objective=None if objective is None else objective.get("after"), solver=note,
                    params={"edited_from": str(head.run.resolve()), "per_class": head.per_class,
                            **({} if objective is None else {"threshold": objective.get("threshold"),
                                                            "threshold_rule": objective.get("threshold_rule")})})
    save_selection(sel, stage / artifact.SELECTION, class_names=class_names or head.class_names)


def build_child_prototypes(model: Any, caches: Any, parent: Path, stage: Path, notes: list[str],
                           say: Callable[[str], None], progress: bool) -> str:
    """Rebuild prototypes for a child whose adapter or features changed (the parent's describe another model), from
    the run's training images; unreadable images leave the child without prototypes and a note."""
    from qpmcli.data import load_dataset
    from qpmcli.errors import QpmError
    from qpmcli.prototypes import build_prototypes

    request = (artifact.read_json(parent / artifact.CONFIG).get("request") or {})
    say("rebuilding prototypes (the adapter or the selected features changed)")
    try:
        dataset = load_dataset(request["dataset"], root=request.get("data_root"), split="train",
                               **(request.get("dataset_options") or {}))
        build_prototypes(model, caches[0], dataset, stage, progress=progress)
    except (QpmError, KeyError) as exc:
        notes.append(f"prototypes not rebuilt (train images not readable: {exc}); the child has none")
        return "none"
    return "rebuilt"

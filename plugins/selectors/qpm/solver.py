"""``solve``: the one deterministic search of the ``qpm`` selector (starts, then cycles of local-search rounds, a
step of every bound source and a CP-SAT chunk), anytime, with the smallest certified bound."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from qpm_plugins.selectors.qpm.cpsat import CpsatModel, exact_model_fits
from qpm_plugins.selectors.qpm.instance import OPT_TOL, QpmInstance, assign, default_candidates, gap_of
from qpm_plugins.selectors.qpm.lp import LpBound
from qpm_plugins.selectors.qpm.search import IlsState, greedy, iterated_local_search, local_search


@dataclass
class SolveResult:
    S: np.ndarray
    W: np.ndarray
    objective: float
    bound: float
    gap: float
    status: str
    stats: dict[str, Any]


ILS_GROWTH_CAP = 6  # at most ils_rounds * 2**6 local-search rounds per cycle
# Local-search rounds of the first cycle. At CUB size (512 x 200) a round takes about 0.1 s and a CP-SAT chunk on the
# top-M restriction 10-20 s (improving nothing in every CUB run measured); 64 rounds gave the best 60 s results there
# (benchmarks/results/selection.md).
ILS_ROUNDS_EXACT = 8
ILS_ROUNDS_LARGE = 64
START_ROUNDS_LARGE = 16  # large problems: iterated-search rounds from each start before the best one goes on
# The size (features x classes) the large-problem schedule was tuned on (CUB: 512 x 200). Beyond it a round costs
# more (about 1.7 s at 512 x 1000 against 0.12 s), so the rounds per start and per cycle shrink by REF_ENTRIES / (n C)
# (:func:`size_scale`): a cycle and the starts then cost about as much time as at CUB size, at every size.
REF_ENTRIES = 512 * 200
# CP-SAT's top-M restriction (large problems) up to this many (feature, class) entries. Beyond it a chunk costs 1.6-2.6
# GB and 18-55 s at 512 x 1000 and returned the hint unchanged in every chunk measured (0.5-4 deterministic seconds,
# 2 and 8 workers; benchmarks/results/selection.md), as it improved nothing at CUB size.
CPSAT_RESTRICT_MAX_ENTRIES = 2 ** 17


def size_scale(inst: QpmInstance) -> float:
    """min(1, REF_ENTRIES / (n C)): 1 up to CUB size, where the schedule is the one tuned there."""
    return min(1.0, REF_ENTRIES / (inst.n * inst.C))


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far (MiB), where the platform reports it.

    Linux: VmHWM of /proc/self/status, the high-water mark of this program's own memory (``getrusage``'s ru_maxrss
    also counts what the parent process held when it started this one)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return None
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def solve(inst: QpmInstance, *, time_limit: float = 60.0, seed: int = 0, workers: int = 8,
          previous: np.ndarray | None = None, M: int | None = None, deterministic: bool = True,
          progress: bool = True, use_cpsat: bool | None = None, cut_rounds: int = 50, work_limit: int | None = None,
          bound_sources: list | None = None, ils_rounds: int | None = None, random_starts: int = 2,
          exact_model: bool | None = None, ils_growth: bool = True, start_rounds: int | None = None) -> SolveResult:
    """One deterministic search that runs until the optimum is proven, the time limit or ``work_limit`` cycles.

    1. Starts (greedy, the clique, ``previous``, ``random_starts`` seeded random sets), each improved by
       :func:`local_search` and, on problems larger than the exact model, ``start_rounds`` (default
       :data:`START_ROUNDS_LARGE` times :func:`size_scale`, at least 1) iterated-search rounds of its own; the best
       one seeds the iterated local search (:class:`IlsState`) that continues. Scores are the true
       objective of a feature set (its optimal distinct-sets assignment).
    2. Then cycles, each in a fixed order (bound, CP-SAT, search on problems that get the exact model; search,
       bound, CP-SAT on larger ones): ``ils_rounds`` perturbation rounds (default :data:`ILS_ROUNDS_EXACT` on the
       exact model, :data:`ILS_ROUNDS_LARGE` times :func:`size_scale` (at least 4) on larger problems; with
       ``ils_growth``, the default, times ``2**cycle``, at most 2**:data:`ILS_GROWTH_CAP`, as CP-SAT's chunks double
       too); one step
       of every bound source (default: :class:`LpBound`, the cut LP; any object with ``name``, ``bound``, ``done`` and
       ``step(deadline) -> certified upper bound`` can be passed in ``bound_sources``; one with ``finish()`` works
       in its own thread, is only read at each cycle and is finished before the result); one CP-SAT chunk
       (:class:`CpsatModel`: the exact model on small problems, where a chunk that ends OPTIMAL proves the optimum;
       else the top-M restriction, only up to :data:`CPSAT_RESTRICT_MAX_ENTRIES`; ``use_cpsat`` overrides), hinted
       with the incumbent, of 0.5, 1, 2, ... deterministic seconds (doubling, up to 32 on the exact model, 8 on the
       restriction). CP-SAT's solutions join the local search's incumbent.
    Nothing in this schedule depends on the time limit: a limit only stops the search (the move, round or chunk in
    flight keeps what it found so far; every step checks the one deadline), so for the same seed a longer limit
    continues the same search and never returns a worse selection (deterministic CP-SAT; exactly so with
    ``work_limit`` instead of a clock). A source in its own thread is waited for at most until the deadline plus
    ``finish``'s grace.
    3. The result is the incumbent's feature set with its exact optimal assignment (:func:`exact_assignment`), the
    smallest certified bound, and status OPTIMAL iff the relative gap is at most :data:`OPT_TOL`.
    """
    import scipy.optimize  # noqa: F401  (loaded before the clock starts: the exact assignment uses it)

    start = time.perf_counter()
    deadline = start + time_limit
    rng = np.random.default_rng(seed)
    stats: dict[str, Any] = {**inst.threshold_info, "threshold": inst.threshold,
                             "penalised_pairs": int(len(inst.pairs))}
    if M is None:
        M = default_candidates(inst)
    full = exact_model_fits(inst) if exact_model is None else bool(exact_model)
    scale = size_scale(inst)
    if ils_rounds is None:  # large problems: CP-SAT's restricted chunks are slow and rarely help; search more
        ils_rounds = ILS_ROUNDS_EXACT if full else max(4, round(ILS_ROUNDS_LARGE * scale))
    if use_cpsat is None:
        use_cpsat = full or inst.n * inst.C <= CPSAT_RESTRICT_MAX_ENTRIES
    rss: dict[str, float] = {}  # growth of the process's peak resident memory during each step (MiB)
    rss_last = peak_rss_mib()

    def rss_step(name: str) -> None:
        nonlocal rss_last
        peak = peak_rss_mib()
        if peak is not None and rss_last is not None:
            rss[name] = rss.get(name, 0.0) + peak - rss_last
            rss_last = peak
    bar = _Bar(progress, time_limit)

    def now() -> float:
        return time.perf_counter()

    sources = [LpBound(inst, M, cut_rounds=cut_rounds)] if bound_sources is None else list(bound_sources)
    for src in sources:  # background sources start now: they use the core that the starts leave idle
        if hasattr(src, "finish"):
            src.step(deadline)

    # 1. starts
    starts = {"greedy": greedy(inst)}
    if len(inst.clique) >= inst.K:
        starts["clique"] = np.sort(np.asarray(inst.clique[: inst.K]))
    if previous is not None and len(previous) == inst.K:
        starts["previous"] = np.sort(np.asarray(previous))
    alive = np.flatnonzero(np.abs(inst.coef).sum(1) > 0)
    if len(alive) < inst.K:
        alive = np.arange(inst.n)
    for i in range(random_starts if inst.n > inst.K else 0):  # seeded random starts leave the greedy basin
        starts[f"random{i}"] = np.sort(rng.choice(alive, size=inst.K, replace=False))
    stats["greedy_objective"] = inst.selection_value(starts["greedy"])
    best_S, best_v = starts["greedy"], stats["greedy_objective"]
    if start_rounds is None:
        start_rounds = 0 if full else max(1, round(START_ROUNDS_LARGE * scale))
    for name, S0 in starts.items():  # a truncated local search still improves on its start (best moves first)
        S1 = local_search(inst, S0, deadline=deadline)
        if start_rounds and now() < deadline:  # every start gets its own iterated search: diversity
            S1, _ = iterated_local_search(inst, S1, rng, rounds=start_rounds, deadline=deadline)
        v1 = inst.selection_value(S1)
        stats[f"{name}_local_search_objective"] = v1
        if v1 > best_v + 1e-9:
            best_S, best_v = S1, v1
    ils = IlsState(inst, best_S, rng, deadline=deadline)
    stats["local_search_objective"] = ils.best_v
    trajectory: list[list[float]] = [[round(now() - start, 3), ils.best_v, math.inf]]  # (seconds, objective, bound)

    def record(b: float) -> None:
        if ils.best_v > trajectory[-1][1] + 1e-12 or b < trajectory[-1][2] - 1e-12:
            trajectory.append([round(now() - start, 3), ils.best_v, b])
    bar.update(now() - start, ils.best_v, math.inf)
    rss_step("starts")

    # 2. cycles
    bound = math.inf
    cp: CpsatModel | None = None
    cp_cuts: dict[int, int] = {}
    time_to_best = now() - start
    cycle = 0

    def proven() -> bool:
        return gap_of(ils.best_v, max(bound, ils.best_v)) <= OPT_TOL or (cp is not None and cp.proven)

    def ils_rounds_step() -> None:
        nonlocal time_to_best
        # CP-SAT's chunks double; the search's rounds double with them (capped), so it keeps its share of a long run
        for _ in range(ils_rounds * 2 ** min(cycle, ILS_GROWTH_CAP) if ils_growth else ils_rounds):
            if now() >= deadline:
                break
            if ils.round(deadline):
                time_to_best = now() - start
                record(bound)

    def bound_step() -> None:
        nonlocal bound
        for src in sources:  # a source that runs in its own thread (bounds.ConcurrentSource) is only read here
            if not src.done and now() < deadline:
                src.step(deadline)
            if src.bound < bound:
                bound = src.bound
                stats[f"{src.name}_bound"] = src.bound
            record(bound)
        bar.update(now() - start, ils.best_v, bound)

    def cpsat_step() -> None:
        nonlocal cp, bound, time_to_best
        if not use_cpsat or now() >= deadline or proven():
            return
        if cp is None:
            cp = CpsatModel(inst, M, "full" if full else "restrict", ils.best)
        dtime = min(0.5 * 2 ** cycle, 32.0 if full else 8.0)

        def report(obj: float, bnd: float) -> None:
            bar.update(now() - start, max(ils.best_v, obj), bound)

        for src in sources:  # distinct-set cuts found by the LP strengthen CP-SAT's own LP
            for cut in getattr(src, "packing", [])[cp_cuts.get(id(src), 0):]:
                cp.add_packing(*cut)
            cp_cuts[id(src)] = len(getattr(src, "packing", []))
        S2, _ = cp.chunk(ils.best, dtime=dtime, deadline=deadline, workers=workers, seed=seed,
                         deterministic=deterministic, report=report if progress else None)
        if S2 is not None and len(S2) == inst.K and ils.offer(S2, inst.selection_value(S2)):
            time_to_best = now() - start
            stats["cpsat_improved"] = stats.get("cpsat_improved", 0) + 1
        if cp.bound_valid:
            bound = min(bound, cp.bound)
            stats["cpsat_bound"] = cp.bound
        record(bound)

    # small problems: proof work first (the exact model proves them); large ones: the search first
    steps = (bound_step, cpsat_step, ils_rounds_step) if full else (ils_rounds_step, bound_step, cpsat_step)
    names = {ils_rounds_step: "search", bound_step: "bound", cpsat_step: "cpsat"}
    spent = {"starts": round(now() - start, 3), "search": 0.0, "bound": 0.0, "cpsat": 0.0}  # wall seconds by step
    while not proven() and now() < deadline and (work_limit is None or cycle < work_limit):
        for step in steps:
            if proven() or now() >= deadline:
                break
            t_step = now()
            step()
            spent[names[step]] += now() - t_step
            rss_step(names[step])
        cycle += 1
        bar.update(now() - start, ils.best_v, bound)

    t_finish = now()
    for src in sources:  # background bound work: the chunk in flight, until the deadline and a grace at most
        if hasattr(src, "finish"):
            bound = min(bound, src.finish(deadline))
            stats[f"{src.name}_bound"] = src.bound
    spent["finish"] = now() - t_finish
    rss_step("finish")

    # 3. the incumbent with its exact assignment
    best_S = np.sort(ils.best)
    best_W = assign(inst, best_S)
    best_v = inst.value(best_S, best_W)
    bound = max(bound, best_v)  # the bound can never be below a feasible value
    gap = gap_of(best_v, bound)
    status = "OPTIMAL" if gap <= OPT_TOL else "FEASIBLE"
    record(bound)
    stats["trajectory"] = [[t, v, b if math.isfinite(b) else None] for t, v, b in trajectory]
    stats["step_seconds"] = {key: round(val, 3) for key, val in spent.items()}
    stats["peak_rss_growth_mib"] = {key: round(val, 1) for key, val in rss.items()}
    stats["peak_rss_mib"] = None if rss_last is None else round(rss_last, 1)
    stats["schedule"] = {"size_scale": round(scale, 4), "start_rounds": start_rounds, "ils_rounds": ils_rounds,
                         "cpsat": bool(use_cpsat), "exact_model": bool(full)}
    stats.update(cycles=cycle, ils_rounds=ils.rounds, seconds=round(now() - start, 3),
                 time_to_best=round(time_to_best, 3), cpsat_model=None if cp is None else cp.mode,
                 cpsat_chunks=0 if cp is None else cp.chunks, cpsat_status=None if cp is None else cp.status,
                 proven_by=("cpsat" if cp is not None and cp.proven else "bound") if status == "OPTIMAL" else None)
    bar.update(now() - start, best_v, bound)
    bar.close()
    return SolveResult(S=best_S, W=best_W, objective=best_v, bound=bound, gap=gap, status=status, stats=stats)


class _Bar:
    """A rich progress bar over the time limit showing objective, bound and gap (silent when disabled)."""

    def __init__(self, enabled: bool, total: float) -> None:
        self.progress = None
        if not enabled:
            return
        from qpmcli.progress import progress_bar

        self.progress = progress_bar(elapsed=True)
        self.task = self.progress.add_task("qpm select: starting", total=total)
        self.progress.start()

    def update(self, elapsed: float, obj: float, bound: float) -> None:
        if self.progress is None:
            return
        gap = gap_of(obj, bound)
        text = f"obj {obj:.3f}  bound {bound:.3f}  gap {100 * gap:.2f}%" if math.isfinite(gap) else f"obj {obj:.3f}"
        self.progress.update(self.task, completed=min(elapsed, self.progress.tasks[0].total or elapsed),
                             description=f"qpm select: {text}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()

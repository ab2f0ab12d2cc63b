"""A certified semidefinite (Shor-type) upper bound for the QPM selection problem, solved with SCS.

The selection problem (:class:`~qpm_plugins.selectors.qpm.instance.QpmInstance`): choose K of n features (s binary,
sum s = K) and for every class c k of them, maximising the scaled class values minus the pair penalties
sum_{penalised f<g} w_fg s_f s_g (plus an optional linear bonus). Distinct class sets are dropped here, which only
raises the optimum.

Relaxation (the "lean" form). Variables s in [0,1]^n and a symmetric X standing for s s^T:

    [[1, s^T], [s, X]] PSD,   diag X = s,   sum_j X_ij = K s_i,   sum s = K,   X >= 0,
    X_fg >= s_f + s_g - 1 on the penalised pairs,

and the gain part of the LP bound (:class:`~qpm_plugins.selectors.qpm.lp.LpBound`): class c keeps its top-M
candidates (x_fc <= s_f) plus a fallback slot z_c worth the (M+1)-th best value (no s needed),
sum_f x_fc + z_c = k. Objective

    max  sum_{f,c} coef_fc x_fc + sum_c v_c z_c + bonus^T s - sum_{penalised} w_fg X_fg.

Every selection S with its top-k assignment maps into it: s = 1_S, X = s s^T, x = top-k indicators (z counts those
outside the top-M), and the objective is at least the selection's value. So the relaxation's optimum is an upper
bound on the best selection.

Certification: SCS solves  min c^T v  s.t.  A v + slack = b,  slack in K  (c = minus our objective), a first-order
method whose iterate is never exactly optimal. For any dual y in the dual cone K* and any v in the boxes l <= v <= u
that every integer solution satisfies (s, X, x in [0,1], z in [0,k]):

    c^T v = (c + A^T y)^T v - y^T (A v) = r^T v - b^T y + y^T slack >= sum_i min(r_i l_i, r_i u_i) - b^T y,

so our maximum is at most  b^T y - sum_i min(r_i l_i, r_i u_i)  with r = c + A^T y, whether SCS converged or not.
We project SCS's y onto K* (nonnegative part clipped at 0, the PSD block's negative eigenvalues removed) and
report that number, never SCS's own objective. Rounding in the projection is covered by adding the leftover
negative eigenvalue times an upper bound on the trace of the PSD slack (1 + K), plus a relative pad.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from qpm_plugins.selectors.qpm.instance import candidates, default_candidates

SQRT2 = math.sqrt(2.0)

@dataclass
class ConicModel:
    """SCS data ``min c^T v, A v + slack = b, slack in cone`` plus the boxes every integer solution satisfies."""

    A: Any  # scipy.sparse.csc_matrix [rows, vars]
    b: np.ndarray
    c: np.ndarray
    cone: dict[str, Any]  # {"z": zero rows, "l": nonnegative rows, "s": [n + 1]}
    lower: np.ndarray
    upper: np.ndarray
    n: int
    K: int

    @property
    def psd_offset(self) -> int:
        return int(self.cone["z"] + self.cone["l"])


def _pair_index(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Position of the pair (i, j), i < j, in ``np.triu_indices(n, 1)`` order."""
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    return i * n - i * (i + 1) // 2 + (j - i - 1)


def _svec_index(m: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """SCS's position of entry (i, j), i >= j, of an m x m matrix (lower triangle, column by column)."""
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    return j * m - j * (j - 1) // 2 + (i - j)


def build_model(inst, M: int | None = None) -> ConicModel:
    """The lean Shor relaxation of ``inst`` as SCS conic data (see the module docstring)."""
    import scipy.sparse as sp

    n, C, k, K = inst.n, inst.C, inst.k, inst.K
    M = min(default_candidates(inst) if M is None else int(M), n)
    cand = candidates(inst, M)  # [C, M], as in lp_bound
    fallback = M < n
    n_pair = n * (n - 1) // 2
    # variable layout: s [n] | X_ij, i<j [n_pair] | x_fc [C*M] | z_c [C if fallback]
    o_s, o_X, o_x = 0, n, n + n_pair
    o_z = o_x + C * M
    n_var = o_z + (C if fallback else 0)
    iu, ju = np.triu_indices(n, 1)

    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    b_parts: list[np.ndarray] = []
    r = 0

    def add(rr: np.ndarray, cc: np.ndarray, vv: np.ndarray | float) -> None:
        rr = np.asarray(rr, dtype=np.int64)
        rows.append(rr)
        cols.append(np.asarray(cc, dtype=np.int64))
        vals.append(np.broadcast_to(np.asarray(vv, dtype=np.float64), rr.shape).copy())

    # ---- zero cone: equalities A v = b
    add(np.full(n, r), o_s + np.arange(n), 1.0)  # sum s = K
    b_parts.append(np.array([float(K)]))
    r += 1
    # sum_j X_ij = K s_i, with X_ii = s_i:  (1 - K) s_i + sum_{j != i} X_ij = 0
    add(r + np.arange(n), o_s + np.arange(n), 1.0 - K)
    pidx = o_X + np.arange(n_pair)
    add(r + iu, pidx, 1.0)
    add(r + ju, pidx, 1.0)
    b_parts.append(np.zeros(n))
    r += n
    # class c: sum_f x_fc + z_c = k
    xc_rows = np.repeat(np.arange(C), M)
    add(r + xc_rows, o_x + np.arange(C * M), 1.0)
    if fallback:
        add(r + np.arange(C), o_z + np.arange(C), 1.0)
    b_parts.append(np.full(C, float(k)))
    r += C
    n_zero = r

    # ---- nonnegative cone: b - A v >= 0
    # x_fc <= s_f
    xf = cand.reshape(-1)
    add(r + np.arange(C * M), o_x + np.arange(C * M), 1.0)
    add(r + np.arange(C * M), o_s + xf, -1.0)
    b_parts.append(np.zeros(C * M))
    r += C * M
    # x_fc >= 0, z_c >= 0
    add(r + np.arange(C * M), o_x + np.arange(C * M), -1.0)
    r += C * M
    if fallback:
        add(r + np.arange(C), o_z + np.arange(C), -1.0)
        r += C
    b_parts.append(np.zeros(C * M + (C if fallback else 0)))
    # X_ij >= 0
    add(r + np.arange(n_pair), pidx, -1.0)
    b_parts.append(np.zeros(n_pair))
    r += n_pair
    # X_fg >= s_f + s_g - 1 on the penalised pairs: slack = b - A v = 1 + X_fg - s_f - s_g
    pf, pg = inst.pairs[:, 0].astype(np.int64), inst.pairs[:, 1].astype(np.int64)
    n_pen = len(pf)
    if n_pen:
        pr = r + np.arange(n_pen)
        add(pr, o_X + _pair_index(n, pf, pg), -1.0)
        add(pr, o_s + pf, 1.0)
        add(pr, o_s + pg, 1.0)
    b_parts.append(np.ones(n_pen))
    r += n_pen
    n_lin = r - n_zero

    # ---- PSD cone of size n + 1: slack = svec([[1, s^T], [s, X]])
    m = n + 1
    b_psd = np.zeros(m * (m + 1) // 2)
    b_psd[0] = 1.0  # entry (0, 0)
    feat = np.arange(n)
    add(r + _svec_index(m, feat + 1, np.zeros(n, np.int64)), o_s + feat, -SQRT2)  # (i, 0) = s_i
    add(r + _svec_index(m, feat + 1, feat + 1), o_s + feat, -1.0)  # (i, i) = X_ii = s_i
    add(r + _svec_index(m, ju + 1, iu + 1), pidx, -SQRT2)  # (j, i), j > i: X_ij
    b_parts.append(b_psd)
    r += len(b_psd)

    A = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r, n_var))
    b = np.concatenate(b_parts)

    # ---- objective (min form: minus our maximisation objective)
    c = np.zeros(n_var)
    c[o_s:o_s + n] = -np.asarray(inst.bonus, dtype=np.float64)
    if n_pen:
        np.add.at(c, o_X + _pair_index(n, pf, pg), np.asarray(inst.pair_w, dtype=np.float64))
    c[o_x:o_x + C * M] = -inst.coef[cand, np.arange(C)[:, None]].reshape(-1)
    if fallback:
        order_vals = -np.sort(-inst.coef, axis=0)
        c[o_z:o_z + C] = -order_vals[M]
    lower = np.zeros(n_var)
    upper = np.ones(n_var)
    if fallback:
        upper[o_z:] = float(k)
    return ConicModel(A=A, b=b, c=c, cone={"z": int(n_zero), "l": int(n_lin), "s": [m]}, lower=lower, upper=upper,
                      n=n, K=K)


# ------------------------------------------------------------------------------------------------ certification
def _unvec(v: np.ndarray, m: int) -> np.ndarray:
    il, jl = np.tril_indices(m)
    order = np.lexsort((il, jl))  # column-major lower triangle
    ii, jj = il[order], jl[order]
    Y = np.zeros((m, m))
    scale = np.where(ii == jj, 1.0, 1.0 / SQRT2)
    Y[ii, jj] = v * scale
    Y[jj, ii] = v * scale
    return Y


def _vec(Y: np.ndarray) -> np.ndarray:
    m = Y.shape[0]
    il, jl = np.tril_indices(m)
    order = np.lexsort((il, jl))
    ii, jj = il[order], jl[order]
    return Y[ii, jj] * np.where(ii == jj, 1.0, SQRT2)


def _project(model: ConicModel, y: np.ndarray) -> np.ndarray:
    """y moved into the dual cone: nonnegative part clipped at 0, the PSD block's negative eigenvalues removed."""
    y = np.array(y, dtype=np.float64, copy=True)
    z, lin = model.cone["z"], model.cone["l"]
    y[z:z + lin] = np.maximum(y[z:z + lin], 0.0)
    m = model.cone["s"][0]
    o = model.psd_offset
    with _one_blas_thread():
        w, V = np.linalg.eigh(_unvec(y[o:], m))
    Yp = (V * np.maximum(w, 0.0)) @ V.T
    y[o:] = _vec(0.5 * (Yp + Yp.T))
    return y


def certify(model: ConicModel, y: np.ndarray) -> float:
    """A valid upper bound on the relaxation's (and so the selection problem's) maximum from any dual vector y."""
    y = np.asarray(y, dtype=np.float64)
    if y.shape != model.b.shape or not np.all(np.isfinite(y)):
        return math.inf
    y = _project(model, y)
    # what rounding left negative: y^T slack >= lam_min * trace(slack) >= -leak * (1 + K)
    with _one_blas_thread():
        leak = max(0.0, -float(np.linalg.eigvalsh(_unvec(y[model.psd_offset:], model.cone["s"][0]))[0]))
    r = model.c + model.A.T @ y
    box = np.minimum(r * model.lower, r * model.upper).sum()
    bound = float(model.b @ y) - float(box) + leak * (1.0 + model.K)
    return bound + 1e-9 * max(1.0, abs(bound))


def tighten_dual(model: ConicModel, y: np.ndarray, sweeps: int = 2) -> np.ndarray:
    """A dual vector with a smaller certificate: y projected, then its linear multipliers re-optimised for the
    fixed PSD block.

    The certificate b^T y - sum_i min(r_i l_i, r_i u_i) is convex and piecewise linear in each multiplier of a
    linear row, so each one can be set to its exact minimiser given the others (a weighted median of the breakpoints
    of the variables the row touches): ``sweeps`` rounds over the equality rows (free multipliers), and in closed
    form for the one-variable rows v >= 0 (multipliers kept >= 0). A first-order solver's dual is nearly optimal in
    its PSD block but leaves residuals in the linear part that the boxes charge for; on the CUB-size instance this
    lowers the certificate by about 0.9 (of about 343) at the same SCS iterate. Any result is then certified as
    usual, so this step can only lower the reported bound, never make it invalid.
    """
    y = _project(model, y)
    A = model.A.tocsr()
    lo, up, b = model.lower, model.upper, model.b
    r = model.c + model.A.T @ y
    z, lin = model.cone["z"], model.cone["l"]
    rows = np.arange(z, z + lin)
    single = rows[(np.diff(A.indptr[z:z + lin + 1]) == 1) & (b[z:z + lin] == 0)]
    at = A.indptr[single]
    var, coef = A.indices[at], A.data[at]
    for _ in range(sweeps):
        for i in range(z):
            idx = A.indices[A.indptr[i]:A.indptr[i + 1]]
            a = A.data[A.indptr[i]:A.indptr[i + 1]]
            t = _line_min(a, r[idx], lo[idx], up[idx], float(b[i]))
            if t != 0.0:
                y[i] += t
                r[idx] += a * t
        # a row  0 - coef v >= 0  with coef < 0 (v >= 0): a change t of its multiplier adds coef t to r_v. With
        # l_v = 0 the box charges u_v max(0, -r_v), so the best t brings a negative r_v up to 0, keeping y >= 0.
        fix = (coef < 0) & (lo[var] == 0) & (r[var] < 0)
        t = np.where(fix, np.maximum(-r[var] / np.where(fix, coef, -1.0), -y[single]), 0.0)
        y[single] += t
        np.add.at(r, var, coef * t)
    return y


def _line_min(a: np.ndarray, rr: np.ndarray, lo: np.ndarray, up: np.ndarray, beta: float) -> float:
    """argmin over t of  beta t - sum_i min((rr_i + a_i t) lo_i, (rr_i + a_i t) up_i)  (0 if it is unbounded)."""
    nz = a != 0
    a, rr, lo, up = a[nz], rr[nz], lo[nz], up[nz]
    slope = beta - float((a[a > 0] * up[a > 0]).sum()) - float((a[a < 0] * lo[a < 0]).sum())  # as t -> -inf
    if slope >= 0 or not len(a):
        return 0.0
    bp = -rr / a
    order = np.argsort(bp)
    cum = slope + np.cumsum((np.abs(a) * (up - lo))[order])
    k = int(np.searchsorted(cum, 0.0, side="left"))
    return 0.0 if k >= len(cum) else float(bp[order[k]])


class _one_blas_thread:
    """Dense LAPACK calls in one thread: on a loaded machine OpenBLAS threads spin and an eigendecomposition of
    order 500 takes seconds instead of 0.2 s."""

    def __enter__(self) -> None:
        try:
            from threadpoolctl import threadpool_limits

            self._limit = threadpool_limits(1, user_api="blas")
        except ImportError:  # threadpoolctl comes with scikit-learn; without it we just run as configured
            self._limit = None

    def __exit__(self, *exc) -> None:
        if self._limit is not None:
            self._limit.restore_original_limits()


# ------------------------------------------------------------------------------------------------------ solve
class _PeakRss:
    """Samples this process's resident memory in a thread; ``peak - start`` is what the solve added (bytes)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss())

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class SdpBound:
    """The SDP bound as a resumable bound source: ``step(deadline)`` runs one warm-started SCS chunk and returns the
    smallest certified bound so far (``name``, ``bound``, ``done``, ``step`` as the ``qpm`` solver's bound sources).

    The first step builds the model and runs SCS's setup (its sparse factorisation: the expensive part at n = 512),
    then a chunk. A chunk lasts about ``chunk_seconds`` (default: ``chunk_share`` of the time left at the first
    step; SCS checks its clock every 25 iterations); it is not started when 1.25 times the longest chunk so far (1.5
    times the setup, before the first chunk) no longer fits before the deadline. Each chunk's dual is tightened
    (``tighten`` sweeps of :func:`tighten_dual`) and certified. ``done`` once SCS converges to ``eps``, fails, or
    ``max_iters`` is used up; the solver's memory is then released (``close`` releases it early).
    """

    name = "sdp"

    def __init__(self, inst, M: int | None = None, *, eps: float = 1e-4, chunk_share: float = 0.08,
                 chunk_seconds: float | None = None, tighten: int = 1, max_iters: int = 100_000,
                 report=None, verbose: bool = False, **scs_settings: Any) -> None:
        self.inst, self.M = inst, M
        self.settings = {"eps_abs": eps, "eps_rel": eps, "verbose": bool(verbose), **scs_settings}
        self.chunk_share, self.chunk_seconds, self.tighten = chunk_share, chunk_seconds, int(tighten)
        self.max_iters, self.report = int(max_iters), report
        self.bound = math.inf
        self.done = False
        self.model: ConicModel | None = None
        self._solver = None
        self._last = 0.0  # duration of the longest chunk so far, with its certificate
        self.info: dict[str, Any] = {"time": 0.0, "build_seconds": 0.0, "setup_seconds": 0.0, "iterations": 0,
                                     "chunks": 0, "status": "not started", "memory": 0, "scs_objective": math.nan,
                                     "untightened_bound": math.inf}

    @property
    def seconds(self) -> float:
        return float(self.info["time"])

    @property
    def steps(self) -> int:
        """SCS chunks run so far (a step that runs none did no work)."""
        return int(self.info["chunks"])

    def step(self, deadline: float) -> float:
        if self.done:
            return self.bound
        t0 = time.perf_counter()
        if self._rss0 is None:
            self._rss0 = _rss()
        with _PeakRss() as mem:
            self._step(deadline)
        # resident growth since the first step, sampled while stepping (between steps the process may do other work)
        self.info["memory"] = max(self.info["memory"], int(mem.peak - self._rss0))
        self.info["time"] = round(self.info["time"] + time.perf_counter() - t0, 3)
        return self.bound

    _rss0: int | None = None

    def _step(self, deadline: float) -> None:
        import scs

        info = self.info
        if self._solver is None:
            t0 = time.perf_counter()
            self.model = build_model(self.inst, self.M)
            info["build_seconds"] = round(time.perf_counter() - t0, 3)
            secs = self.chunk_seconds or float(self.chunk_share) * (deadline - time.perf_counter())
            m = self.model
            self._solver = scs.SCS({"A": m.A, "b": m.b, "c": m.c}, m.cone, max_iters=self.max_iters,
                                   time_limit_secs=max(float(secs), 0.5), **self.settings)
            info.update(setup_seconds=round(time.perf_counter() - t0 - info["build_seconds"], 3),
                        variables=int(m.A.shape[1]), rows=int(m.A.shape[0]), nonzeros=int(m.A.nnz))
        left = deadline - time.perf_counter()
        # the next chunk must fit: as long as the longest so far with a margin for the load; before the first one,
        # SCS's setup time stands in for it (a 25-iteration chunk took 1.3-2.3x the setup on the shared machine)
        expected = 1.25 * self._last if info["chunks"] else 1.5 * info["setup_seconds"]
        if left <= 0 or expected > left:
            return
        t1 = time.perf_counter()
        sol = self._solver.solve(warm_start=info["chunks"] > 0)
        res = sol["info"]
        info["chunks"] += 1
        info["iterations"] += int(res["iter"])
        info["status"] = str(res["status"])
        info["scs_objective"] = -float(res["pobj"])
        y = sol["y"]
        value = certify(self.model, y)
        info["untightened_bound"] = min(info["untightened_bound"], value)
        if self.tighten:
            value = min(value, certify(self.model, tighten_dual(self.model, y, sweeps=self.tighten)))
        self._last = max(self._last, time.perf_counter() - t1)
        if value < self.bound:
            self.bound = value
            if self.report is not None:
                self.report(value)
        if int(res["status_val"]) != 2 or info["iterations"] >= self.max_iters:
            self.done = True  # converged to eps (1), failed, or out of iterations (2 is "stopped at a limit")
            self.close()

    def close(self) -> None:
        """Release SCS's workspace and the model (the bound stays)."""
        self._solver = None
        self.model = None


def sdp_bound(inst, *, time_limit: float = 60.0, max_iters: int = 100_000, M: int | None = None,
              eps: float = 1e-4, chunk_share: float = 0.08, tighten: int = 2, report=None, verbose: bool = False,
              **scs_settings: Any) -> tuple[float, dict[str, Any]]:
    """Certified upper bound on ``inst``'s optimum from the lean Shor relaxation, SCS within a time/iteration budget.

    ``time_limit`` counts everything (model build, SCS setup and factorisation, iterations, certification): the
    steps of :class:`SdpBound` (chunks of about ``chunk_share`` of the budget, each tightened by ``tighten`` sweeps
    and certified) until it is done or the next chunk would not fit. A stop at any point still returns a valid bound.

    Returns ``(bound, info)``: info has time (s), iterations, status (SCS's last status), memory (bytes the solve
    added to the process's resident set, sampled), SCS's own (uncertified) objective, the best certificate without
    tightening, and the model size. The bound is ``inf`` only if no chunk ran (a time limit shorter than the setup).
    """
    t0 = time.perf_counter()
    deadline = t0 + float(time_limit)
    src = SdpBound(inst, M, eps=eps, chunk_share=chunk_share, tighten=tighten, max_iters=max_iters, report=report,
                   verbose=verbose, **scs_settings)
    with _PeakRss() as mem:
        while not src.done and time.perf_counter() < deadline:
            before = src.info["chunks"]
            src.step(deadline)
            if src.info["chunks"] == before:
                src.info["status"] += "; stopped at the time limit"
                break
        src.close()
    info = dict(src.info)
    if info["chunks"] == 0:
        info["status"] = "time limit before the first iteration"
    info["memory"] = int(mem.peak - mem.start)
    info["time"] = round(time.perf_counter() - t0, 3)
    return src.bound, info

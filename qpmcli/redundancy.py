"""The reference redundancy threshold (METHOD.md §6.4 with the §13 C16 details), step for step, and fast.

The reference (DINO-QPM's ``find_minimum_viable_threshold``) sweeps 100 thresholds over the sorted similarity values,
estimates the clique size of every compatibility graph with the Pattabiraman et al. greedy heuristic (networkx's
``large_clique_size``, stopped early at the target), stops at the first graph that falls short, then walks back
toward denser graphs until networkx's Ramsey-removal approximate maximum clique (``max_clique``, stopped early) finds
a clique of the target size. That clique and its threshold are the result.

Both heuristics depend on the iteration order of Python sets and of networkx's graph dictionaries (ties in the
greedy go to the first maximum in set order; ``ramsey_R2`` always expands the first node of a subgraph whose node
order comes from such sets). This module therefore has two interchangeable backends:

* ``"networkx"``: builds networkx graphs and calls networkx (``from_numpy_array``, ``complement``,
  ``approximation.ramsey_R2``); the greedy is the code of networkx's ``large_clique_size`` with the reference's two
  early-stop changes (networkx's function has no such option). Slow (minutes for 512 features on 2 cores); kept as
  the oracle for the tests and as the benchmark baseline.
* ``"fast"`` (default): the same two algorithms on numpy adjacency matrices. It performs the very same sequence of
  Python set and dict operations that decide the orders (set construction from the same element sequences, set
  intersection, dict-key differences), so ties resolve identically, but it never builds a networkx graph: the node
  order of every subgraph is carried as a list and the adjacency order networkx would have is recomputed only for
  the node being expanded. ``tests/test_threshold.py`` checks that both backends return the same sizes, the same
  cliques in the same set order and the same thresholds.

Deliberate difference from the reference (docs/method-notes.md): the sweep runs on our one-scale R (negatives clipped
at 0, diagonal zeroed) instead of ``R + R^T`` of the signed R; the graphs of a sweep on ``R`` and on ``2R`` are the
same, only the threshold value is halved, and the disallowed-pair test then uses the same R. Where the reference
crashes (no graph reaches the target, or the walk leaves the sorted array) we stop and fall back to the threshold
above every value (no pair penalised; the start clique is all features in index order), reported as ``fallback``.

numpy is imported at module level: only the selection code imports this module; networkx is imported lazily.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BACKENDS = ("fast", "networkx")


# ------------------------------------------------------------------------------------------------- the sweep
@dataclass
class SweepPlan:
    """The reference's threshold arithmetic on ``C`` (R with its diagonal zeroed).

    ``values`` are all ``n^2`` entries of C sorted ascending, ``start = floor(E*)`` with the Turan edge target
    ``E* = n^2 (t-2)/(t-1)``, ``step = (E* - #zeros(C)) / steps``; the threshold of sweep index ``i`` is
    ``values[start - int(i * step)]`` (Python ``int`` truncates toward zero; the confirmation walk uses negative
    ``i`` for thresholds above the start).
    """

    C: np.ndarray
    values: np.ndarray
    target: int
    steps: int
    e_star: float
    start: int
    step: float

    def index(self, i: int) -> int:
        return self.start - int(i * self.step)

    def threshold(self, i: int) -> float | None:
        """Threshold of sweep index ``i``, or None where the index leaves the sorted array (the reference would
        raise IndexError above the array and silently wrap below 0)."""
        idx = self.index(i)
        if idx < 0 or idx >= self.values.size:
            return None
        return float(self.values[idx])

    def graph(self, tau: float) -> np.ndarray:
        """Compatibility graph: edge ``(f, g)`` iff ``C[f, g] < tau`` and ``f != g`` (bool adjacency matrix)."""
        adj = self.C < tau
        np.fill_diagonal(adj, False)
        return adj


def sweep_plan(R: np.ndarray, target: int, steps: int = 100) -> SweepPlan:
    """The sweep of METHOD §6.4 step 1-3 / C16 for target clique size ``target`` (>= 2) on R."""
    C = np.array(R, dtype=np.float64, copy=True)
    np.fill_diagonal(C, 0.0)
    n = C.shape[0]
    t = int(target)
    e_star = n ** 2 * (t - 2) / (t - 1)  # Python float, exactly as the reference computes it
    values = np.sort(C, axis=None)
    n_zero = values.size - int(np.count_nonzero(C))
    return SweepPlan(C=C, values=values, target=t, steps=int(steps), e_star=e_star,
                     start=int(math.floor(e_star)), step=(e_star - n_zero) / steps)


# --------------------------------------------------------------------------------- greedy clique size (fast)
def large_clique_size_es(adj: np.ndarray, target: int | None) -> int:
    """networkx's ``large_clique_size`` (Pattabiraman et al.) with the reference's early stop, on a bool matrix.

    Start nodes in index order with degree >= ``target``; the candidates are their neighbours of degree >= target;
    repeatedly take the candidate of largest degree (first maximum in Python set order), count it and intersect
    the candidates with its neighbours of degree >= the best size so far; return as soon as the best size reaches
    ``target``. ``target=None`` is networkx's function itself (both filters use the best size so far, no early
    stop). The candidate sets are real Python sets built from the same element sequences as networkx builds them,
    so ties resolve exactly as in networkx; neighbour sets are cached while the best size keeps the same filter.
    """
    adj = np.asarray(adj, dtype=bool)
    n = adj.shape[0]
    deg_arr = adj.sum(1)
    deg = deg_arr.tolist()
    key = deg.__getitem__
    sorted_deg = np.sort(deg_arr)
    nbrs: list[np.ndarray | None] = [None] * n
    cache: dict[int, set] = {}
    cache_level = -1  # number of nodes with degree < best, i.e. which filter the cached sets were built with
    best = 0
    for u in range(n):
        first = best if target is None else target
        if deg[u] < first:
            continue
        nu = nbrs[u]
        if nu is None:
            nu = nbrs[u] = np.flatnonzero(adj[u])
        U = set(nu[deg_arr[nu] >= first].tolist())
        size = 1
        level = int(np.searchsorted(sorted_deg, best, side="left"))
        if level != cache_level:
            cache.clear()
            cache_level = level
        while U:
            w = max(U, key=key)
            U.remove(w)
            Np = cache.get(w)
            if Np is None:
                nw = nbrs[w]
                if nw is None:
                    nw = nbrs[w] = np.flatnonzero(adj[w])
                Np = cache[w] = set(nw[deg_arr[nw] >= best].tolist())
            U = U & Np
            size += 1
        best = max(best, size)
        if target is not None and best >= target:
            return best
    return best


# ------------------------------------------------------------------------ Ramsey-removal max clique (fast)
class _Ramsey:
    """networkx's ``ramsey_R2`` on the complement graph (neighbour lists ``nbrs``), emulating networkx's orders.

    A graph of the recursion is its node list ``L`` (networkx's node order) and its node set ``V``. Its adjacency
    order (what ``G.neighbors`` yields) follows networkx's ``Graph.copy`` of a subgraph view: a node's neighbours that
    come earlier in ``L`` first, in ``L`` order, then the later ones in the parent graph's order. A child whose node
    order is the parent's (the subgraph view iterates the parent when the kept set is at least half of it) inherits
    the parent's neighbour order; a child ordered by a Python set (the kept set is smaller than half) re-sorts the
    earlier neighbours. ``chain`` holds the positions (dicts) of those set-ordered ancestors, from the root down; the
    root (``complement(G).copy()`` minus removed nodes) has ascending neighbour lists. These are networkx 3.x's rules
    (``FilterAtlas.__iter__``, ``Graph.copy``, ``non_neighbors`` as a dict-key difference); the tests compare with the
    installed networkx.
    """

    def __init__(self, nbrs: list[list[int]]):
        self.nbrs = nbrs

    def run(self, L: list[int], V: set | dict, chain: list[dict]) -> tuple[set, set]:
        node = L[0]
        nb = [v for v in self.nbrs[node] if v in V]
        for pos in chain:
            if len(nb) < 2:
                break
            pn = pos[node]
            early = [v for v in nb if pos[v] < pn]
            if early:
                early.sort(key=pos.__getitem__)
                nb = early + [v for v in nb if pos[v] > pn]
        S1 = set(nb)  # show_nodes(nbunch_iter(generator over G.neighbors(node))): sequential inserts
        S2 = set(iter(dict.fromkeys(L).keys() - dict.fromkeys(nb).keys() - {node}))  # nx.non_neighbors, then the same
        n_L = len(L)
        if not S1:
            c_1, i_1 = set(), set()
        else:
            if 2 * len(S1) < n_L:  # the subgraph view iterates the filter's set
                L1 = list(S1)
                ch1 = chain + [{v: i for i, v in enumerate(L1)}]
            else:
                L1 = [v for v in L if v in S1]
                ch1 = chain
            c_1, i_1 = self.run(L1, S1, ch1) if len(L1) > 1 else ({L1[0]}, {L1[0]})
        if not S2:
            c_2, i_2 = set(), set()
        else:
            if 2 * len(S2) < n_L:
                L2 = list(S2)
                ch2 = chain + [{v: i for i, v in enumerate(L2)}]
            else:
                L2 = [v for v in L if v in S2]
                ch2 = chain
            c_2, i_2 = self.run(L2, S2, ch2) if len(L2) > 1 else ({L2[0]}, {L2[0]})
        c_1.add(node)
        i_2.add(node)
        return max(c_1, c_2, key=len), max(i_1, i_2, key=len)


def approx_max_clique_es(adj: np.ndarray, target: int | None) -> set:
    """networkx's ``max_clique`` with the reference's early stop, on a bool matrix: a clique of the graph.

    ``max_clique`` = ``clique_removal`` on the complement: apply ``ramsey_R2``, remove the clique it found, repeat,
    and keep the largest independent set (first of equal size); the reference stops the removal loop once that set
    has ``target`` nodes (checked from the second round on; ``target=None``: no early stop, networkx's function
    itself). Returns the set itself (its Python iteration order is the one the reference seeds the solver with).
    """
    adj = np.asarray(adj, dtype=bool)
    n = adj.shape[0]
    if n == 0:
        return set()
    H = ~adj
    np.fill_diagonal(H, False)
    rams = _Ramsey([np.flatnonzero(row).tolist() for row in H])
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 2 * n + 200))
    try:
        L = list(range(n))
        c_i, i_i = rams.run(L, set(L), [])
        isets = [i_i]
        while L:
            L = [v for v in L if v not in c_i]  # graph.remove_nodes_from(c_i)
            c_i, i_i = rams.run(L, set(L), []) if L else (set(), set())
            if i_i:
                isets.append(i_i)
            if target is not None and len(max(isets, key=len)) >= target:
                break
    finally:
        sys.setrecursionlimit(old)
    return max(isets, key=len)


# ------------------------------------------------------------------------------ the same on networkx (oracle)
def nx_graph(adj: np.ndarray):
    """``networkx.from_numpy_array`` of a bool adjacency matrix (node order 0..n-1, neighbours ascending)."""
    import networkx as nx

    return nx.from_numpy_array(np.asarray(adj, dtype=bool))


def nx_large_clique_size_es(G, target: int) -> int:
    """networkx's ``large_clique_size`` (networkx 3.x source) with the reference's early stop at ``target``.

    networkx's function has no early stop, so this is its code with the reference's two changes: start nodes and
    first candidates need degree >= target, and it returns once the best size reaches target.
    """
    degrees = G.degree

    def _clique_heuristic(U, size, best_size):
        if not U:
            return max(best_size, size)
        u = max(U, key=degrees)
        U.remove(u)
        N_prime = {v for v in G[u] if degrees[v] >= best_size}
        return _clique_heuristic(U & N_prime, size + 1, best_size)

    best_size = 0
    for u in (u for u in G if degrees[u] >= target):
        neighbors = {v for v in G[u] if degrees[v] >= target}
        best_size = _clique_heuristic(neighbors, 1, best_size)
        if best_size >= target:
            return best_size
    return best_size


def nx_approx_max_clique_es(G, target: int) -> set:
    """networkx's ``max_clique`` (complement + ``clique_removal`` with ``approximation.ramsey_R2``), early-stopped."""
    import networkx as nx
    from networkx.algorithms.approximation import ramsey

    graph = nx.complement(G).copy()
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 8 * len(graph) + 200))
    try:
        c_i, i_i = ramsey.ramsey_R2(graph)
        isets = [i_i]
        while graph:
            graph.remove_nodes_from(c_i)
            c_i, i_i = ramsey.ramsey_R2(graph)
            if i_i:
                isets.append(i_i)
            if len(max(isets, key=len)) >= target:
                break
    finally:
        sys.setrecursionlimit(old)
    return max(isets, key=len)


# ---------------------------------------------------------------------------------------- the procedure
@dataclass
class ReferenceThreshold:
    """Outcome of the reference procedure. ``threshold`` is tau on R (pairs with ``R >= tau`` are penalised);
    ``clique`` is the start clique in the reference's set order (``clique[:target]`` seeds the solver);
    ``chosen`` the sweep index the walk starts from, ``step`` the sweep index whose graph gave the clique
    (``chosen - walk``; -1 with ``fallback``), ``sizes`` the greedy estimate of every evaluated sweep step.
    ``fallback``: no walked graph reached the target (the reference crashes there); tau is then just above the
    largest value of R, nothing is penalised and the clique is all features in index order."""

    threshold: float
    clique: list[int]
    target: int
    chosen: int
    step: int
    walk: int
    sizes: dict[int, int] = field(default_factory=dict)
    fallback: bool = False
    backend: str = "fast"


def reference_threshold(R: np.ndarray, target: int, steps: int = 100, backend: str = "fast",
                        log: Callable[[str], Any] | None = None) -> ReferenceThreshold:
    """The reference threshold procedure (METHOD §6.4 / C16) on R, with the ``fast`` or ``networkx`` backend.

    1. Sweep ``i = 0..steps-1``: threshold ``tau_i`` (:class:`SweepPlan`), graph ``C < tau_i``. A step whose edge
       count equals that of the last evaluated graph is skipped (the count starts at 0, so an empty first graph is
       skipped too). Otherwise the greedy estimates the clique size: below target -> chosen = i - 1 (chosen = 0 if
       i == 0) and stop; equal to target -> chosen = i and stop; above -> go on. No stop -> chosen = steps - 1.
    2. Walk ``j = 0, 1, ...`` over sweep index ``chosen - j`` (toward denser graphs, starting at ``chosen``): the
       first graph whose early-stopped Ramsey-removal clique has ``>= target`` nodes fixes tau and the clique.
    Where the reference would crash (walk exhausted, index outside the sorted values) the result is the fallback
    threshold above every value of R.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    t = int(target)
    if t < 2:
        raise ValueError(f"the clique target must be at least 2, got {t}")
    plan = sweep_plan(R, t, steps)
    n = plan.C.shape[0]
    say = log or (lambda _msg: None)
    if backend == "networkx":
        def size_of(adj):
            return nx_large_clique_size_es(nx_graph(adj), t)

        def clique_of(adj):
            return nx_approx_max_clique_es(nx_graph(adj), t)
    else:
        def size_of(adj):
            return large_clique_size_es(adj, t)

        def clique_of(adj):
            return approx_max_clique_es(adj, t)

    sizes: dict[int, int] = {}
    chosen = steps - 1
    last_sum = 0
    for i in range(steps):
        tau = plan.threshold(i)
        if tau is None:  # the reference raises IndexError here (only for degenerate inputs)
            chosen = i - 1
            break
        adj = plan.graph(tau)
        this_sum = int(adj.sum())
        if this_sum == last_sum:
            continue
        last_sum = this_sum
        size = size_of(adj)
        sizes[i] = size
        say(f"sweep step {i}: tau {tau:.6g}, {this_sum // 2} edges, greedy clique size {size}")
        if size < t:
            chosen = 0 if i == 0 else i - 1
            break
        if size == t:
            chosen = i
            break
    for j in range(steps):
        tau = plan.threshold(chosen - j)
        if tau is None:
            break
        clique = clique_of(plan.graph(tau))
        say(f"walk {j} (sweep index {chosen - j}): tau {tau:.6g}, clique of {len(clique)}")
        if len(clique) >= t:
            return ReferenceThreshold(threshold=tau, clique=[int(v) for v in clique], target=t, chosen=chosen,
                                      step=chosen - j, walk=j, sizes=sizes, backend=backend)
    tau_all = float(np.nextafter(plan.C.max(), np.inf)) if n else math.inf
    return ReferenceThreshold(threshold=tau_all, clique=list(range(n)), target=t, chosen=chosen, step=-1, walk=-1,
                              sizes=sizes, fallback=True, backend=backend)

"""The optimal class-feature assignment for a fixed feature set: exactly k per class, distinct class sets
(:func:`exact_assignment`, exact and polynomial)."""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np


def exact_assignment(sub: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Optimal distinct-sets assignment ``(W [C, K], value)`` for class values ``sub`` [C, K] (exact, polynomial).

    Every class takes its top-k set unless two classes' top sets coincide. The colliding classes form groups (one per
    shared top set), and each class of a group lists its best k-subsets (:func:`_top_subsets`, best first): one
    more than its group has classes to begin with, two for a class that joins later. Groups whose lists share a
    subset merge, and a class outside every group whose top set is in a group's list joins that group, until nothing
    changes; then each group's classes are assigned to the union of their lists (a linear assignment, scipy).

    That restricted assignment is optimal for the group's classes over all k-subsets once every class's last listed
    subset is left free: a better assignment would move some class to an unlisted subset, no better for it than its
    last listed one, which is free, so an exchange within the lists would do as well, and the restricted optimum
    already beats those. A class whose last listed subset is taken lists twice as many, and the closure and the
    assignment run again. Dropping the distinctness between groups gives an upper bound, the sum of the groups' own
    optima and the other classes' top values; the groups' lists are disjoint and contain no other class's top set,
    so these assignments together are feasible: they reach the bound and are optimal.

    Lists grow only where a class's last listed subset is taken: listing every group class's top-|group| subsets at
    once (as before issue 31) let one evaluation at 512 x 1,000 cascade into a group of hundreds of classes, 119 s
    and 5.7 GB.
    """
    from scipy.cluster.hierarchy import DisjointSet
    from scipy.optimize import linear_sum_assignment

    C, K = sub.shape
    order = np.argsort(-sub, axis=1, kind="stable")
    W = np.zeros((C, K), dtype=bool)
    W[np.arange(C)[:, None], order[:, :k]] = True
    topk = np.sort(order[:, :k], axis=1)
    if K ** k < 2 ** 62:  # each top set as one integer (base K): a 1-D unique is much faster than a row unique
        _, inv, counts = np.unique(topk @ (K ** np.arange(k, dtype=np.int64)), return_inverse=True,
                                   return_counts=True)
    else:
        _, inv, counts = np.unique(topk, axis=0, return_inverse=True, return_counts=True)
    if counts.max(initial=1) <= 1:
        return W, float((sub * W).sum())
    n_sets = math.comb(K, k)
    if n_sets <= _ALL_SUBSETS:  # few k-subsets: one linear assignment over all of them (same optimum, faster)
        subsets = _subsets(K, k)
        rows, chosen = linear_sum_assignment(-sub[:, subsets].sum(2))
        W[:] = False
        for c, j in zip(rows, chosen, strict=True):
            W[c, subsets[j]] = True
        return W, float((sub * W).sum())
    inv = inv.ravel()
    top = [tuple(r) for r in topk.tolist()]
    owner = {top[c]: c for c in range(C) if counts[inv[c]] == 1}  # unique top sets -> their class
    groups: dict[int, list[int]] = {}  # group id -> classes
    for c in np.flatnonzero(counts[inv] > 1).tolist():
        groups.setdefault(int(inv[c]), []).append(c)
    # list length per class: one more than its group's size, so that a group alone is usually exact at once
    want: dict[int, int] = {c: min(len(Y) + 1, n_sets) for Y in groups.values() for c in Y}
    lists: dict[int, list[tuple[int, ...]]] = {}
    sums: dict[int, np.ndarray] = {}  # the value of each listed subset
    while True:
        while True:  # closure: merge groups that list a common subset, take in classes whose top set is listed
            holder: dict[tuple[int, ...], int] = {}  # listed subset -> the group listing it
            merge: list[tuple[int, int]] = []
            joins: dict[int, int] = {}
            for g, Y in groups.items():
                for c in Y:
                    if len(lists.get(c, ())) < want[c]:
                        lists[c] = _top_subsets(sub[c], order[c], k, want[c])
                    for t in lists[c]:
                        h = holder.setdefault(t, g)
                        if h != g:
                            merge.append((h, g))
                        o = owner.get(t)
                        if o is not None:
                            joins[o] = g
            if not merge and not joins:
                break
            for o, g in joins.items():
                del owner[top[o]]
                groups[g].append(o)
                want[o] = min(2, n_sets)
            union = DisjointSet(groups)
            for a, b in merge:
                union.merge(a, b)
            merged: dict[int, list[int]] = {}
            for g, Y in groups.items():
                merged.setdefault(union[g], []).extend(Y)
            groups = merged
        grow = False
        for Y in groups.values():
            cols = sorted({t for c in Y for t in lists[c]})
            col_of = {t: j for j, t in enumerate(cols)}
            value = np.full((len(Y), len(cols)), -1e18)
            for i, c in enumerate(Y):
                if len(sums.get(c, ())) != len(lists[c]):
                    sums[c] = sub[c][np.array(lists[c])].sum(1)
                value[i, [col_of[t] for t in lists[c]]] = sums[c]
            rows, chosen = linear_sum_assignment(-value)
            taken = {cols[j] for j in chosen}
            for i, j in zip(rows, chosen, strict=True):
                c = Y[i]
                W[c] = False
                W[c, list(cols[j])] = True
            for c in Y:  # the restricted optimum is exact once every incomplete list ends in a free subset
                if len(lists[c]) < n_sets and lists[c][-1] in taken:
                    want[c] = min(2 * len(lists[c]), n_sets)
                    grow = True
        if not grow:
            break
    return W, float((sub * W).sum())


_ALL_SUBSETS = 2000


@functools.lru_cache(maxsize=32)
def _subsets(K: int, k: int) -> np.ndarray:
    return np.array(list(itertools.combinations(range(K), k)), dtype=np.int64).reshape(-1, k)


def _top_subsets(vals: np.ndarray, order: np.ndarray, k: int, m: int) -> list[tuple[int, ...]]:
    """The m best k-subsets (as sorted index tuples) of ``vals`` by sum, best first (best-first enumeration over
    positions in the descending ``order``; ties in the order of that enumeration)."""
    import heapq

    K = len(vals)
    sv = vals[order]
    first = tuple(range(k))
    heap = [(-float(sv[list(first)].sum()), first)]
    seen = {first}
    out: list[tuple[int, ...]] = []
    while heap and len(out) < m:
        neg, pos = heapq.heappop(heap)
        out.append(tuple(sorted(int(order[p]) for p in pos)))
        for i in range(k):  # move position i one step down if that slot is free
            nxt = pos[i] + 1
            if nxt >= K or (i + 1 < k and pos[i + 1] == nxt):
                continue
            cand = pos[:i] + (nxt,) + pos[i + 1:]
            if cand not in seen:
                seen.add(cand)
                heapq.heappush(heap, (neg + float(sv[pos[i]] - sv[nxt]), cand))
    return out

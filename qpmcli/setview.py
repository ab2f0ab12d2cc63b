"""One image's prediction set drawn as a small tree (``qpm explain --coverage``).

Each member's features are ranked by their contribution on the image (:func:`qpmcli.conformal.prediction_set`). The
tree is the prefix tree of those rankings: the trunk is the ranked features every member shares (for ``hier`` at
least the first L), each fork is a feature where the members part, and a class ends at the feature that is its own
alone, followed by its name, probability and the rest of its ranking. Members keep their best-first order within
every fork. Colours follow the one rule of every figure (:func:`qpmcli.evidence.set_colours`: the PALETTE in the
order the tree draws the features); features are printed by their labels (:func:`qpmcli.conformal.set_feature_label`:
``f12``, with its name once ``qpm name-features`` has named it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_BRANCHES = 12  # members drawn; more are summarised in one line
DPI = 100
STEP = 1.3  # horizontal distance between tree levels (inches)


@dataclass
class _Node:
    feature: int | None  # None: the root
    depth: int  # position of ``feature`` in the rankings
    members: list[int]  # indices into the members list, best first
    children: list[_Node] = field(default_factory=list)
    y: float = 0.0


def _tree(rankings: list[list[int]], members: list[int], depth: int, feature: int | None) -> _Node:
    """The prefix tree of ``rankings`` restricted to ``members``, which share the first ``depth`` features."""
    node = _Node(feature, depth - 1, members)
    if len(members) == 1:
        return node
    groups: dict[int | None, list[int]] = {}
    for m in members:
        groups.setdefault(rankings[m][depth] if depth < len(rankings[m]) else None, []).append(m)
    for key, group in groups.items():
        node.children.append(_Node(None, depth, group) if key is None else _tree(rankings, group, depth + 1, key))
    return node


def _place(node: _Node, rows: list[int], order: list[int]) -> None:
    """Give leaves consecutive rows (top first) and inner nodes the mean row of their leaves."""
    if not node.children:
        node.y = float(len(order))
        order.extend(node.members)
        return
    for child in node.children:
        _place(child, rows, order)
    node.y = sum(c.y for c in node.children) / len(node.children)


def _deepest(node: _Node) -> int:
    """The deepest level at which the tree draws a feature."""
    own = node.depth if node.feature is not None else -1
    return max([own] + [_deepest(c) for c in node.children])


def _short(text: str, width: int) -> str:
    text = str(text)
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def render_set_tree(detail: Mapping[str, Any], path: str | os.PathLike[str], *,
                    colours: Mapping[int, str] | None = None, title: str = "") -> Path:
    """Draw ``detail`` (:func:`qpmcli.conformal.prediction_set`) into a PNG at ``path`` (written atomically), the
    features in ``colours`` (``{feature id: "#rrggbb"}``; default :func:`qpmcli.evidence.set_colours`)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from qpmcli.artifact import atomic_path
    from qpmcli.conformal import set_feature_label
    from qpmcli.evidence import PALETTE, colour_rgb, set_colours

    colours = set_colours(detail) if colours is None else colours

    members = list(detail["members"])
    shown = members[:MAX_BRANCHES]
    rankings = [list(m.get("ranking") or []) for m in shown]
    shared = list(detail.get("shared_features") or [])  # one member: its whole ranking, as the trunk
    root = _tree(rankings, list(range(len(shown))), len(shared), None) if shown else _Node(None, -1, [])
    order: list[int] = []
    _place(root, [], order)
    rows = max(1, len(order) + (len(members) > len(shown)))
    names_x = 0.75 + STEP * max(_deepest(root), len(shared) - 1, 0) + 0.75
    width = max(names_x + 5.2, 8.0)
    height = 1.45 + 0.62 * rows
    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        fig = plt.figure(figsize=(width, height), dpi=DPI)
        ax = fig.add_axes((0.0, 0.02, 1.0, 1 - 1.1 / height))
        ax.axis("off")
        ax.set_xlim(0, width)
        ax.set_ylim(rows - 0.45, -0.55)  # row 0 on top
        level = f", level {detail['level']}" if detail.get("level") is not None else ""
        guarantee = "" if detail.get("guarantee") else "  [calibrated on training images: no guarantee]"
        fig.suptitle(f"{_short(title, 70)}\n{100 * detail['coverage']:g}% prediction set ({detail['score']}{level}): "
                     f"{len(members)} class{'es' if len(members) != 1 else ''}{guarantee}", fontsize=12,
                     fontweight="bold")

        def x_of(d: int) -> float:
            return 0.75 + STEP * d

        def chip(d: int, y: float, fid: int) -> None:
            r, g, b = colour_rgb(colours.get(int(fid), PALETTE[-1]))
            ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"
            fid_, _, name = set_feature_label(detail, fid).partition(" ")  # the name (if any) under the id
            ax.text(x_of(d), y, fid_ + (f"\n{_short(name, 14)}" if name else ""), ha="center", va="center",
                    fontsize=9 if not name else 8, color=ink, linespacing=1.0,
                    fontweight="bold", bbox={"boxstyle": "round,pad=0.35", "fc": (r, g, b), "ec": "none"}, zorder=3)

        def edge(d0: float, y0: float, d1: float, y1: float) -> None:
            xa, xb = x_of(d0) + 0.5, x_of(d1) - 0.5
            xm = (xa + xb) / 2
            ax.plot([xa, xm, xm, xb], [y0, y0, y1, y1], color="0.5", lw=1.2, zorder=1)

        if not members:
            ax.text(0.3, 0, "empty set: even the top class is less sure than the calibrated level allows",
                    va="center", fontsize=11)
        else:
            for i, fid in enumerate(shared):
                chip(i, root.y, fid)
                if i:
                    edge(i - 1, root.y, i, root.y)
            if shared:
                ax.text(x_of(0) - 0.5, root.y - 0.42, "shared by every member, in this order" if len(shown) > 1
                        else "its features, ranked by their contribution on this image", fontsize=8.5, color="0.3",
                        va="bottom")
            elif len(shown) > 1:
                ax.text(x_of(0) - 0.5, -0.45, "no feature leads for every member: the tree forks at once",
                        fontsize=8.5, color="0.3", va="bottom")

            def draw(node: _Node, parent: tuple[float, float] | None) -> None:
                here = parent
                if node.feature is not None:
                    chip(node.depth, node.y, node.feature)
                    if parent is not None:
                        edge(parent[0], parent[1], node.depth, node.y)
                    here = (node.depth, node.y)
                if node.children:
                    for child in node.children:
                        draw(child, here)
                    return
                for k, m in enumerate(node.members):  # a leaf: one class (or several whose rankings end here)
                    y = node.y + k
                    if here is not None:
                        ax.plot([x_of(here[0]) + 0.5, names_x - 0.1], [y, y], color="0.75", lw=0.9, ls=":",
                                zorder=0)
                    member = shown[m]
                    ax.text(names_x, y - 0.1, f"{_short(member['class'], 56)}   p = {member['probability']:.3f}",
                            va="center", fontsize=10.5, fontweight="bold" if m == 0 else "normal")
                    rest = rankings[m][(here[0] + 1) if here is not None else 0:]
                    if rest:
                        then = ", ".join(_short(set_feature_label(detail, f), 22) for f in rest)
                        ax.text(names_x, y + 0.24, "then " + then,
                                va="center", fontsize=8, color="0.45")

            last = len(shared) - 1
            draw(root, (last, root.y) if shared else None)
            if len(members) > len(shown):
                ax.text(names_x, rows - 1, f"\u2026 and {len(members) - len(shown)} more classes", va="center",
                        fontsize=10, color="0.3")
        target = Path(path)
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
        plt.close(fig)
    return target


__all__ = ["MAX_BRANCHES", "render_set_tree"]

"""What an explanation says, without drawing it (numpy only: no torch, no matplotlib; ``qpm serve`` uses it too).

A QPM model decides with a handful of features per class: ``logit_c = sum_k W[c, k] * (f_k - mu_k) / sigma_k`` where
``f_k`` is the spatial mean of feature map ``F_k``. :func:`explain_output` reads that sum back out of one forward
pass (:class:`LocalExplanation`: each feature's activation, z-score, contribution and peak), :func:`compare_classes`
splits two classes' features into shared and own ones, :func:`evidence_map` is the per-patch split of a logit.

Words (one meaning each, on every surface): a feature's **activation** is its map's *spatial mean* over the image's
patches (what the head multiplies by W, after standardising); its **peak** is the map's *largest value* at one patch
(what ranks the training prototypes, and the patch their box marks).

Colours follow one rule (:func:`class_colours`, used by the CLI figures and by ``qpm serve``): the features of the
class in view take the colour-blind-safe :data:`PALETTE` in order, so one class's features never share a colour;
heatmaps use the perceptual :data:`HEAT_CMAP` with a colour bar. The drawing is :mod:`qpmcli.explain`'s.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from qpmcli.errors import ConfigError
from qpmcli.modelfile import ClassifierMetadata, softmax

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

HEAT_CMAP = "viridis"  # perceptually uniform, readable in grey and under colour-vision deficiencies
EVIDENCE_CMAP = "RdBu_r"  # diverging (ColorBrewer, colour-blind safe): for maps with both signs
# Paul Tol's "muted" qualitative palette (designed for colour-blind readers), ordered so that every prefix is as far
# apart as possible under protan/deutan/tritan simulation (the first 5, one QPM class, stay >= 27 CIELAB units
# apart), then black: ten colours for the explained class's features and the compared class's own ones.
PALETTE = ("#332288", "#DDCC77", "#88CCEE", "#882255", "#117733", "#999933", "#CC6677", "#AA4499", "#44AA99",
           "#000000")


# -------------------------------------------------------------------------------------------------- colours
def feature_colours(feature_ids: list[int]) -> dict[int, str]:
    """Colours of the features shown together in one view: the i-th distinct id takes ``PALETTE[i]`` (cycling only
    beyond ten)."""
    out: dict[int, str] = {}
    for fid in feature_ids:
        out.setdefault(int(fid), PALETTE[len(out) % len(PALETTE)])
    return out


def class_colours(metadata: ClassifierMetadata | dict[str, Any], class_index: int, other: int | None = None, *,
                  columns: list[int] | None = None, other_columns: list[int] | None = None) -> dict[int, str]:
    """The one colour rule of every figure and page: ``{feature id: "#rrggbb"}`` for a class's features in the
    order of W's columns (a dense head: ``columns``, the ones shown, in their order; default its 10 largest |W|),
    then the features of class ``other`` that the class does not use. So a class's features are always distinct,
    and a feature has the same colour in the CLI figure and on the web page of the same view."""
    import numpy as np

    meta = ClassifierMetadata.coerce(metadata)
    w, ids = meta.weight, meta.features

    def cols(c: int, given: list[int] | None) -> list[int]:
        if given is not None:
            return [int(k) for k in given]
        nz = np.flatnonzero(w[c] != 0)
        return [int(k) for k in nz] if len(nz) <= 10 else class_columns(w, c, 10)

    order = cols(class_index, columns) + ([] if other is None else cols(other, other_columns))
    return feature_colours([ids[k] for k in order])


def compare_colours(expl_a: LocalExplanation, expl_b: LocalExplanation) -> dict[int, str]:
    """The colours of a comparison: class A's features as in A's own view, then B's other features in B's view
    order (so A's colours do not change when a compared class is chosen)."""
    colours = {e.feature: e.colour for e in expl_a.features}
    rank = {c: i for i, c in enumerate(PALETTE)}
    for e in sorted(expl_b.features, key=lambda e: rank.get(e.colour, len(PALETTE))):
        colours.setdefault(e.feature, PALETTE[len(colours) % len(PALETTE)])
    return colours


def colour_rgb(colour: str) -> tuple[float, float, float]:
    """``"#rrggbb"`` as RGB floats in [0, 1] (what matplotlib and numpy blending take)."""
    h = colour.lstrip("#")
    return tuple(int(h[i:i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[return-value]

def set_colours(detail: Mapping[str, Any]) -> dict[int, str]:
    """The colours of a prediction set's tree (:func:`qpmcli.setview.render_set_tree`): its features in the order
    the tree draws them (the members' shared features, then each member's ranking), by :func:`feature_colours`."""
    ids: list[int] = [int(f) for f in detail.get("shared_features") or []]
    for member in detail.get("members") or []:
        ids += [int(f) for f in member.get("ranking") or []]
    return feature_colours(ids)


# ------------------------------------------------------------------------------------------- the arithmetic
def upsample(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a ``[h, w]`` map to ``size = (H, W)`` (PIL float image; the grid covers the image)."""
    import numpy as np
    from PIL import Image

    arr = np.ascontiguousarray(grid_map, dtype=np.float32)
    out = Image.fromarray(arr, mode="F").resize((int(size[1]), int(size[0])), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float32)


def mask_fraction(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Share of a non-negative saliency map's mass that lies inside ``mask`` (same shape); NaN for an empty map."""
    import numpy as np

    s = np.clip(np.asarray(saliency, dtype=np.float64), 0.0, None)
    total = float(s.sum())
    if total <= 0.0:
        return float("nan")
    return float(s[np.asarray(mask, dtype=bool)].sum() / total)


def resolve_class(query: str | int, class_names: list[str]) -> int:
    """Class index from a name (exact, then case-insensitive, then a unique substring) or an integer index."""
    q = str(query).strip()
    if q in class_names:
        return class_names.index(q)
    lower = [c.lower() for c in class_names]
    if q.lower() in lower:
        return lower.index(q.lower())
    if re.fullmatch(r"-?\d+", q):
        i = int(q) if len(q) <= 18 else None  # thousands of digits: out of range (and beyond int()'s own limit)
        if i is not None and 0 <= i < len(class_names):
            return i
        shown = q if len(q) <= 24 else f"{q[:12]}...({len(q)} digits)"
        raise ConfigError(f"class index {shown} is out of range 0..{len(class_names) - 1}")
    hits = [i for i, c in enumerate(lower) if q.lower() in c]
    if len(hits) == 1:
        return hits[0]
    examples = ", ".join(repr(c) for c in (class_names[i] for i in hits[:4]) if c) if hits else \
        ", ".join(repr(c) for c in class_names[:4])
    what = f"{len(hits)} classes match" if hits else "no class matches"
    raise ConfigError(f"{what} {q!r} (e.g. {examples}); give an exact class name or a class index")


# ------------------------------------------------------------------------------------------- the explanation
@dataclass
class FeatureEvidence:
    """One feature's part in one class's logit for one image."""

    feature: int  # dense feature index: the stable id shown in every figure
    column: int  # column of W / channel of the model's maps
    weight: float  # W[c, k]
    activation: float  # pooled (spatial mean) feature value f_k
    zscore: float | None  # (f_k - mu_k) / sigma_k, what the head multiplies by W
    contribution: float  # W[c, k] * zscore (or W * f_k without standardisation)
    peak: float  # the map's maximum
    peak_at: list[int]  # [row, col] of the maximum on the token grid
    name: str | None = None  # its best name (`qpm name-features`), None without one
    label: str = ""  # how every surface prints it: "f12 red circle" or "f12" (ClassifierMetadata.feature_label)
    colour: str = ""  # "#rrggbb" in this view (class_colours)


@dataclass
class LocalExplanation:
    """Why one image got (or would get) one class: the class's features with activation and contribution."""

    image: str
    class_index: int
    class_name: str
    probability: float
    logit: float
    bias: float
    predicted_index: int
    predicted_name: str
    top: list[dict[str, Any]]
    features: list[FeatureEvidence]
    figure: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def metadata_dict(meta: Any) -> dict[str, Any]:
    """A plain dict view of a classifier's metadata (a :class:`qpmcli.modelfile.ClassifierMetadata` or a dict).

    Every function here also takes the :class:`~qpmcli.modelfile.ClassifierMetadata` itself; this view is for
    callers that want to add or override entries."""
    if isinstance(meta, dict):
        return dict(meta)
    keys = ("class_names", "features", "weight", "mu", "sigma", "bias", "backbone", "weights_digest", "grid",
            "image_size", "preprocess", "prototypes", "feature_names")
    return {k: getattr(meta, k) for k in keys if hasattr(meta, k)}


def class_columns(weight: np.ndarray, class_index: int, max_features: int = 5,
                  contributions: np.ndarray | None = None) -> list[int]:
    """The columns a class uses: nonzero weights (all 5 of a QPM class); beyond ``max_features`` the largest |W|,
    or the largest |contribution| when given (a dense head uses every feature)."""
    import numpy as np

    row = np.asarray(weight[class_index], dtype=np.float64)
    cols = np.flatnonzero(row != 0)
    if len(cols) > max_features:
        key = np.abs(contributions[cols]) if contributions is not None else np.abs(row[cols])
        cols = cols[np.argsort(-key, kind="stable")[:max_features]]
    return [int(c) for c in cols]


def explain_output(logits: np.ndarray, maps: np.ndarray, features: np.ndarray,
                   metadata: ClassifierMetadata | dict[str, Any], *, image: str = "", class_index: int | None = None,
                   max_features: int = 5, top_k: int = 5, colours: dict[int, str] | None = None) -> LocalExplanation:
    """Turn one image's model output (``logits [C]``, ``maps [K, h, w]``, ``features [K]``) into the evidence of
    ``class_index`` (default: the predicted class), features ordered by contribution (largest first). ``colours``:
    the view's feature colours (default :func:`class_colours` of the class; a comparison passes the pair's)."""
    import numpy as np

    meta = ClassifierMetadata.coerce(metadata)
    w, ids, bias, names = meta.weight, meta.features, meta.bias, meta.class_names
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    f = np.asarray(features, dtype=np.float64).reshape(-1)
    maps = np.asarray(maps, dtype=np.float32)
    probs = softmax(logits)
    pred = int(np.argmax(logits))
    c = pred if class_index is None else int(class_index)
    z = meta.standardize(f, np.float64) if meta.standardized else None
    contrib_all = meta.contributions(f, c, np.float64)[0]
    cols = class_columns(w, c, max_features, contrib_all)
    if colours is None:
        dense = int((w[c] != 0).sum()) > max_features
        colours = class_colours(meta, c, columns=cols if dense else None)
    evidence = []
    for k in cols:
        m = maps[k]
        r, q = np.unravel_index(int(np.argmax(m)), m.shape)
        evidence.append(FeatureEvidence(feature=ids[k], column=k, weight=float(w[c, k]), activation=float(f[k]),
                                        zscore=None if z is None else float(z[k]),
                                        contribution=float(contrib_all[k]), peak=float(m.max()),
                                        peak_at=[int(r), int(q)], name=meta.feature_name(ids[k]),
                                        label=meta.feature_label(ids[k]),
                                        colour=colours.get(int(ids[k]), PALETTE[-1])))
    evidence.sort(key=lambda e: -e.contribution)
    order = list(np.argsort(-logits, kind="stable")[:top_k])
    if c not in order:  # an explained class outside the top-k still gets its bar
        order.append(c)
    top = [{"index": int(i), "class": names[i], "probability": float(probs[i]), "logit": float(logits[i])}
           for i in order]
    return LocalExplanation(image=image, class_index=c, class_name=names[c], probability=float(probs[c]),
                            logit=float(logits[c]), bias=float(bias[c]) if bias is not None else 0.0,
                            predicted_index=pred, predicted_name=names[pred], top=top, features=evidence)


def evidence_map(maps: np.ndarray, metadata: ClassifierMetadata | dict[str, Any], class_index: int) -> np.ndarray:
    """Per-patch evidence for a class, ``sum_k W[c, k] * F_k / sigma_k`` ``[h, w]``: its spatial mean minus the
    constant ``sum_k W[c, k] * mu_k / sigma_k`` (plus bias) is the logit, so it shows where the logit comes from."""
    import numpy as np

    row = ClassifierMetadata.coerce(metadata).evidence_weights(class_index)
    return np.tensordot(row, np.asarray(maps, dtype=np.float64), axes=(0, 0))


def compare_classes(metadata: ClassifierMetadata | dict[str, Any], class_a: int, class_b: int,
                    columns_a: list[int] | None = None, columns_b: list[int] | None = None) -> dict[str, list[int]]:
    """Columns of W used by both classes (``shared``) and by only one (``only_a``, ``only_b``), plus dense ids.

    ``columns_a``/``columns_b`` restrict the comparison to the columns shown for each class (a dense head, where
    every class uses every feature, is compared on the features that matter most for this image)."""
    import numpy as np

    meta = ClassifierMetadata.coerce(metadata)
    w, ids = meta.weight, meta.features
    a = set(columns_a) if columns_a is not None else set(np.flatnonzero(w[class_a] != 0).tolist())
    b = set(columns_b) if columns_b is not None else set(np.flatnonzero(w[class_b] != 0).tolist())
    out = {"shared": sorted(a & b), "only_a": sorted(a - b), "only_b": sorted(b - a)}
    for key in list(out):
        out[f"{key}_features"] = [ids[k] for k in out[key]]
    return out


__all__ = ["EVIDENCE_CMAP", "FeatureEvidence", "HEAT_CMAP", "LocalExplanation", "PALETTE", "class_colours",
           "class_columns", "colour_rgb", "compare_classes", "compare_colours", "evidence_map", "explain_output",
           "feature_colours", "mask_fraction", "metadata_dict", "resolve_class", "set_colours", "upsample"]

"""Explanations people can look at: the figures of ``qpm explain`` (matplotlib, Agg backend, fixed pixel sizes).

What an explanation *says* (activations, contributions, the comparison of two classes, the one colour rule) is
:mod:`qpmcli.evidence`'s, without drawing; this module draws it:

- **local** (:func:`render_local`): the input, the prediction with runner-ups, each of the class's features drawn
  where it fires (its map upsampled onto the image, :data:`~qpmcli.evidence.HEAT_CMAP` with a colour bar) with its
  activation (spatial mean) and its contribution to the logit, and the combined evidence map;
- **contrastive** (:func:`render_compare`): two classes side by side: the features they share (which cancel in the
  logit difference only where both weigh them the same, as a binary W does) and the ones that tell them apart;
- **global** (:func:`render_global`): a class's features, each shown by the training patches where its map peaks
  highest (boxed). Those prototypes are computed once after training (:func:`qpmcli.prototypes.build_prototypes`)
  and read from a run directory or from an exported ONNX file's ``qpm_prototypes`` metadata;
- the HTML report is :mod:`qpmcli.explainhtml`'s, the prediction-set tree :mod:`qpmcli.setview`'s.

:func:`explain` is the library call behind the CLI; it uses :func:`qpmcli.predict.load_classifier`, so it works the
same from a run directory (PyTorch) and from an ``.onnx`` file (ONNX Runtime).
"""

from __future__ import annotations

import base64
import functools
import io
import os
import re
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpmcli.errors import ArtifactError, ConfigError, ImageError
from qpmcli.evidence import (
    EVIDENCE_CMAP,
    HEAT_CMAP,
    PALETTE,
    LocalExplanation,
    class_colours,
    class_columns,
    colour_rgb,
    compare_classes,
    compare_colours,
    evidence_map,
    explain_output,
    resolve_class,
    upsample,
)
from qpmcli.modelfile import ClassifierMetadata, parse_prototypes

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

DPI = 100
LOCAL_FIGSIZE = (16.0, 7.2)  # -> 1600 x 720 px
MAX_DISPLAY = 320  # longest side of the input as drawn in figures (px)



# ---------------------------------------------------------------------------------------------- small helpers
def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe version of a class name."""
    s = re.sub(r"[^A-Za-z0-9_]+", "-", str(text)).strip("-_").lower()
    return (s[:limit].rstrip("-") or "class")


def _short(text: str, width: int = 30) -> str:
    text = str(text)
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def _wrap(text: str, width: int = 34, lines: int = 2) -> str:
    return "\n".join(textwrap.wrap(str(text), width=width, max_lines=lines, placeholder="\u2026")) or str(text)


# ------------------------------------------------------------------------------------------------- drawing
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _literal_text(render):
    """Draw every string as given: no mathtext (a file or class named ``$\\foo$`` is text, not a formula that
    fails to parse and aborts the figure) and no TeX, for every text the wrapped renderer creates and saves."""

    @functools.wraps(render)
    def literal(*args: Any, **kwargs: Any) -> Any:
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
            return render(*args, **kwargs)

    return literal


def _display_image(image: Any) -> np.ndarray:
    """The input as an RGB uint8 array, longest side at most :data:`MAX_DISPLAY` (aspect kept)."""
    import numpy as np
    from PIL import Image

    from qpmcli.images import to_rgb

    img = to_rgb(image)
    scale = MAX_DISPLAY / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BILINEAR)
    return np.asarray(img)


def _overlay(ax: Any, rgb: np.ndarray, heat: np.ndarray, norm: Any, cmap: str = HEAT_CMAP,
             alpha_max: float = 0.75) -> None:
    """The image in grey-ish tones with the heat map on top; opacity grows with the value so cold areas stay visible."""
    import numpy as np

    plt = _pyplot()
    grey = rgb.astype(np.float32).mean(axis=2, keepdims=True)
    base = (0.55 * rgb + 0.45 * grey).astype(np.uint8)
    ax.imshow(base)
    v = np.clip(norm(heat), 0.0, 1.0)
    rgba = plt.get_cmap(cmap)(v)
    rgba[..., 3] = 0.15 + (alpha_max - 0.15) * v
    ax.imshow(rgba)
    ax.set_xticks([])
    ax.set_yticks([])


def _colour_title(ax: Any, text: str, colour: str, fontsize: float = 11) -> None:
    """A panel title on a chip of the feature's colour (dark or light text by the chip's luminance), readable for
    every palette colour, where coloured text on white is not (sand, sky)."""
    r, g, b = colour_rgb(colour)
    ink = "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"
    ax.set_title(text, fontsize=fontsize, fontweight="bold", color=ink,
                 bbox={"facecolor": colour, "edgecolor": "none", "boxstyle": "round,pad=0.25"})


def _fit_title(fig: Any, text: str, fontsize: float) -> str:
    """``text`` wrapped to the figure's width (each line at most as wide as the figure at ``fontsize``)."""
    chars = max(20, int(fig.get_size_inches()[0] * DPI / (fontsize * 0.68)))
    return "\n".join(textwrap.fill(line, chars, max_lines=3, placeholder="\u2026") for line in text.split("\n"))


def _frame(ax: Any, colour: Any, width: float = 4.0) -> None:
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)
        spine.set_visible(True)


def _save(fig: Any, path: str | os.PathLike[str], panels: dict[str, Any] | None = None,
          boxes: dict[str, list[int]] | None = None) -> Path:
    """Write the figure (atomically); with ``panels``, fill ``boxes`` with each named axis' drawn pixel box
    ``[x0, y0, x1, y1]`` (origin top-left), so callers and tests can find the panels in the PNG."""
    from qpmcli.artifact import atomic_path

    plt = _pyplot()
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, pil_kwargs={"compress_level": 3})  # zlib 6-9 costs ~2x time
    if panels and boxes is not None:
        width, height = fig.get_size_inches() * DPI
        for name, ax in panels.items():
            b = ax.get_position()  # after drawing: the box as drawn (aspect applied)
            boxes[name] = [round(b.x0 * width), round((1 - b.y1) * height), round(b.x1 * width),
                           round((1 - b.y0) * height)]
    plt.close(fig)
    return target


def _composite(rgb: np.ndarray, ups: list[np.ndarray], colours: list[Any], vmax: float) -> np.ndarray:
    """Every pixel takes the colour of the class feature that fires most there, its opacity the strength."""
    import numpy as np

    stack = np.stack(ups)  # [n, H, W]
    strength = np.clip(stack.max(0) / max(vmax, 1e-12), 0.0, 1.0)
    winner = stack.argmax(0)
    pal = np.asarray(colours, dtype=np.float32) * 255.0
    colour = pal[winner]
    grey = rgb.astype(np.float32).mean(axis=2, keepdims=True).repeat(3, axis=2) * 0.6 + 60
    a = (0.85 * strength)[..., None]
    return np.clip(grey * (1 - a) + colour * a, 0, 255).astype(np.uint8)


@_literal_text
def render_local(image: Any, expl: LocalExplanation, maps: np.ndarray, metadata: ClassifierMetadata | dict[str, Any],
                 path: str | os.PathLike[str]) -> Path:
    """The local explanation figure (1600 x 720 px): input, prediction, contributions, combined evidence, the
    feature composite, and one saliency panel per feature of ``expl.class_index``, with the feature's training
    prototypes under it when the model holds them (:data:`PROTOTYPES_BESIDE`)."""
    import numpy as np
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize, TwoSlopeNorm

    plt = _pyplot()
    rgb = _display_image(image)
    size = rgb.shape[:2]
    feats = expl.features
    n = max(len(feats), 1)
    ncols = max(5, n)
    fig = plt.figure(figsize=LOCAL_FIGSIZE, dpi=DPI)
    gs = fig.add_gridspec(2, ncols + 1, width_ratios=[1] * ncols + [0.06], height_ratios=[1, 1.08],
                          left=0.03, right=0.95, top=0.86, bottom=0.04, wspace=0.42, hspace=0.42)
    verdict = "predicted" if expl.class_index == expl.predicted_index else \
        f"explained class (predicted: {_short(expl.predicted_name, 40)})"
    fig.suptitle(f"{_short(Path(expl.image).name or 'image', 50)}  \u2192  {_short(expl.class_name, 70)}  "
                 f"(p = {expl.probability:.3f}, logit {expl.logit:+.2f}; {verdict})", fontsize=13,
                 fontweight="bold")

    panels: dict[str, Any] = {}
    ax = panels["input"] = fig.add_subplot(gs[0, 0])
    ax.imshow(rgb)
    ax.set_title("input", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])

    ax = panels["prediction"] = fig.add_subplot(gs[0, 1])
    top = expl.top
    ys = np.arange(len(top))[::-1].astype(float)
    ax.barh(ys, [t["probability"] for t in top], height=0.42,
            color=["#d62728" if t["index"] == expl.class_index else "#9aa5b1" for t in top])
    for y, t in zip(ys, top, strict=True):  # class names above their bars: long names need the full width
        ax.text(0.0, y + 0.24, f"{_short(t['class'], 36)}  {t['probability']:.3f}", va="bottom", fontsize=7.5,
                fontweight="bold" if t["index"] == expl.class_index else "normal")
    ax.set_yticks([])
    ax.set_ylim(-0.5, len(top) - 0.1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability", fontsize=8)
    ax.set_title("prediction and runner-ups", fontsize=10)
    ax.tick_params(axis="x", labelsize=7)

    ax = panels["contributions"] = fig.add_subplot(gs[0, 2])
    if feats:
        ys = np.arange(len(feats))[::-1].astype(float)
        vals = [e.contribution for e in feats]
        lim = max(1e-6, max(abs(v) for v in vals)) * 1.25
        ax.barh(ys, vals, height=0.42, color=[e.colour for e in feats])
        for y, e in zip(ys, feats, strict=True):  # labels above their bars: names need the panel's width
            ax.text(-lim, y + 0.24, _short(e.label or f"f{e.feature}", 44), va="bottom", fontsize=7)
        ax.set_yticks([])
        ax.set_ylim(-0.5, len(feats) - 0.1)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlim(-lim, lim)
        rest = expl.logit - sum(vals)
        ax.set_xlabel(f"contribution to logit (others + bias {round(rest, 2) + 0.0:+.2f})", fontsize=7)
    else:
        ax.text(0.5, 0.5, "this class uses\nno features", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("feature contributions", fontsize=10)
    ax.tick_params(axis="x", labelsize=7)

    ev = upsample(evidence_map(maps, metadata, expl.class_index), size)
    lim = float(np.abs(ev).max()) or 1.0
    enorm = TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim) if ev.min() < 0 else Normalize(0.0, lim)
    ax = panels["evidence"] = fig.add_subplot(gs[0, 3])
    _overlay(ax, rgb, ev, enorm, cmap=EVIDENCE_CMAP if ev.min() < 0 else HEAT_CMAP)
    ax.set_title("combined evidence\n\u03a3 W\u00b7F/\u03c3 per location", fontsize=10)
    cax = ax.inset_axes([0.0, -0.09, 1.0, 0.05])
    cb = fig.colorbar(ScalarMappable(enorm, EVIDENCE_CMAP if ev.min() < 0 else HEAT_CMAP), cax=cax,
                      orientation="horizontal")
    cb.ax.tick_params(labelsize=6)
    offset = expl.logit - float(evidence_map(maps, metadata, expl.class_index).mean())
    cb.set_label(f"logit = mean of this map {offset:+.2f}", fontsize=7)

    ups = [upsample(maps[e.column], size) for e in feats]
    vmax = max([float(u.max()) for u in ups] + [1e-6])
    vmin = min([float(u.min()) for u in ups] + [0.0])
    ax = panels["composite"] = fig.add_subplot(gs[0, 4])
    if ups:
        ax.imshow(_composite(rgb, ups, [colour_rgb(e.colour) for e in feats], vmax))
        handles = [plt.Line2D([], [], marker="s", ls="", color=e.colour,
                              label=_short(e.label or f"f{e.feature}", 24)) for e in feats]
        ax.legend(handles=handles, fontsize=6, loc="upper right", framealpha=0.7, handlelength=1, borderpad=0.3)
    else:
        ax.imshow(rgb)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("where each feature fires\n(strongest feature per pixel)", fontsize=10)

    norm = Normalize(vmin=vmin, vmax=vmax)
    protos = _prototypes_of(metadata)
    for i, (e, u) in enumerate(zip(feats, ups, strict=True)):
        strip = protos.get(e.feature, [])[:PROTOTYPES_BESIDE]
        if strip:  # the feature's training prototypes under its heatmap: what "feature 67" responds to
            sub = gs[1, i].subgridspec(2, PROTOTYPES_BESIDE, height_ratios=[3.2, 1], hspace=0.62, wspace=0.06)
            ax = panels[f"feature {e.feature}"] = fig.add_subplot(sub[0, :])
            for j, proto in enumerate(strip):
                pax = fig.add_subplot(sub[1, j])
                try:
                    pax.imshow(_png_image(proto["png_b64"]))
                except (ArtifactError, ImageError, KeyError, ValueError):
                    pass  # a damaged prototype leaves its slot empty
                pax.set_xticks([])
                pax.set_yticks([])
                _frame(pax, e.colour, 1.2)
                if j == 0:
                    pax.set_title("its training prototypes", fontsize=7, loc="left")
        else:
            ax = panels[f"feature {e.feature}"] = fig.add_subplot(gs[1, i])
        _overlay(ax, rgb, u, norm)
        _frame(ax, e.colour)
        z = "" if e.zscore is None else f" (z {e.zscore:+.2f})"
        _colour_title(ax, _short(e.label or f"f{e.feature}", 32), e.colour)
        ax.set_xlabel(f"activation {e.activation:.3f}{z}\ncontribution {e.contribution:+.2f}", fontsize=9)
    if feats:
        cax = fig.add_subplot(gs[1, ncols])
        cb = fig.colorbar(ScalarMappable(norm, HEAT_CMAP), cax=cax)
        cb.set_label("feature map value", fontsize=8)
        cb.ax.tick_params(labelsize=7)
    boxes: dict[str, list[int]] = {}
    out = _save(fig, path, panels, boxes)
    expl.extra["panels"] = boxes
    return out


@_literal_text
def render_compare(image: Any, expl_a: LocalExplanation, expl_b: LocalExplanation, maps: np.ndarray,
                   features: np.ndarray, metadata: ClassifierMetadata | dict[str, Any], groups: dict[str, list[int]],
                   path: str | os.PathLike[str]) -> Path:
    """The contrastive figure: a header (input, logit difference split by feature) and one row per group of
    features (shared, only class A, only class B), each feature drawn where it fires on this image."""
    import numpy as np
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    plt = _pyplot()
    meta = ClassifierMetadata.coerce(metadata)
    w, ids = meta.weight, meta.features
    rgb = _display_image(image)
    size = rgb.shape[:2]
    rows = [("shared", f"shared by both classes ({len(groups['shared'])})"),
            ("only_a", f"only {_short(expl_a.class_name, 44)}"),
            ("only_b", f"only {_short(expl_b.class_name, 44)}")]
    ncols = max(4, *(len(groups[k]) for k, _ in rows))
    fig = plt.figure(figsize=(2.6 * ncols + 1.0, 11.0), dpi=DPI)
    gs = fig.add_gridspec(4, ncols + 1, width_ratios=[1] * ncols + [0.06], left=0.04, right=0.93, top=0.9,
                          bottom=0.03, wspace=0.3, hspace=0.5)
    diff = expl_a.logit - expl_b.logit
    colours = {e.feature: e.colour for e in expl_b.features} | {e.feature: e.colour for e in expl_a.features}
    a, b = expl_a.class_index, expl_b.class_index
    cancel = all(w[a, k] == w[b, k] for k in groups["shared"])
    fig.suptitle(_fit_title(fig, f"{_short(expl_a.class_name, 60)} (p = {expl_a.probability:.3f})  vs  "
                                 f"{_short(expl_b.class_name, 60)} (p = {expl_b.probability:.3f})\n"
                                 f"logit difference {diff:+.2f}; " +
                            ("shared features add the same to both classes, the others decide" if cancel else
                             "each feature moves it by (W_a \u2212 W_b) \u00b7 z (real-valued weights: shared "
                             "features count too)"), 13), fontsize=13, fontweight="bold")
    head = gs[0, :ncols].subgridspec(1, 2, width_ratios=[1, ncols - 1.6], wspace=0.55)
    ax = fig.add_subplot(head[0, 0])
    ax.imshow(rgb)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(_short(Path(expl_a.image).name or "input", 30), fontsize=10)

    f_all = np.asarray(features, dtype=np.float64).reshape(-1)
    x = meta.standardize(f_all, np.float64)
    cols = groups["shared"] + groups["only_a"] + groups["only_b"]
    delta = [(w[expl_a.class_index, k] - w[expl_b.class_index, k]) * x[k] for k in cols]
    ax = fig.add_subplot(head[0, 1])
    ys = np.arange(len(cols))[::-1]
    ax.barh(ys, delta, color=[colours.get(ids[k], PALETTE[-1]) for k in cols])
    labels = []
    for k in cols:
        tag = "shared" if k in groups["shared"] else ("A" if k in groups["only_a"] else "B")
        labels.append(f"{_short(meta.feature_label(ids[k]), 26)} ({tag})")
    ax.set_yticks(ys, labels, fontsize=8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel(f"> 0 favours {_short(expl_a.class_name, 30)},  < 0 favours {_short(expl_b.class_name, 30)}\n"
                  f"(a class's feature that fires below its training mean counts against that class)", fontsize=8)
    ax.set_title(f"contribution to logit({_short(expl_a.class_name, 24)}) \u2212 "
                 f"logit({_short(expl_b.class_name, 24)})", fontsize=10)
    ax.tick_params(axis="x", labelsize=8)

    ups = {k: upsample(maps[k], size) for k in cols}
    vmax = max([float(u.max()) for u in ups.values()] + [1e-6])
    vmin = min([float(u.min()) for u in ups.values()] + [0.0])
    norm = Normalize(vmin=vmin, vmax=vmax)
    for r, (key, label) in enumerate(rows, start=1):
        members = groups[key]
        if not members:
            ax = fig.add_subplot(gs[r, 0])
            ax.axis("off")
            ax.text(0.0, 0.5, f"{label}:\nnone", fontsize=11, va="center")
            continue
        for i, k in enumerate(members):
            ax = fig.add_subplot(gs[r, i])
            _overlay(ax, rgb, ups[k], norm)
            _frame(ax, colours.get(ids[k], PALETTE[-1]))
            _colour_title(ax, _short(meta.feature_label(ids[k]), 32), colours.get(ids[k], PALETTE[-1]))
            ax.set_xlabel(f"activation {f_all[k]:.3f}", fontsize=9)
            if i == 0:
                ax.set_ylabel(_wrap(label, 22, 3), fontsize=10, fontweight="bold")
    cax = fig.add_subplot(gs[1:, ncols])
    cb = fig.colorbar(ScalarMappable(norm, HEAT_CMAP), cax=cax)
    cb.set_label("feature map value", fontsize=9)
    return _save(fig, path)


PROTOTYPES_BESIDE = 4  # training prototypes drawn under each feature's heatmap in the local figure


def _prototypes_of(metadata: ClassifierMetadata | dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """The model's embedded prototypes by feature id (``{}`` when it holds none or they are unreadable)."""
    raw = metadata.get("prototypes") if isinstance(metadata, dict) else getattr(metadata, "prototypes", None)
    if not raw:
        return {}
    try:
        return parse_prototypes(raw)
    except ArtifactError:
        return {}


def _png_image(b64: str) -> Any:
    from PIL import Image

    from qpmcli.images import bomb_message, pixel_limit

    try:
        with pixel_limit():
            return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ArtifactError(bomb_message("a prototype image of the model", exc)) from exc
    except (OSError, ValueError, SyntaxError) as exc:  # binascii.Error is a ValueError
        raise ArtifactError(f"a prototype image of the model is not a readable PNG: {exc}") from exc


@_literal_text
def render_global(class_index: int, metadata: ClassifierMetadata | dict[str, Any],
                  prototypes: dict[int, list[dict[str, Any]]],
                  path: str | os.PathLike[str], per_feature: int | None = None) -> Path:
    """The global explanation of a class: one row per feature, its most activating training patches."""
    import matplotlib.patches as mpatches

    plt = _pyplot()
    meta = ClassifierMetadata.coerce(metadata)
    w, ids, names = meta.weight, meta.features, meta.class_names
    cols = class_columns(w, class_index, max_features=10)
    feats = [ids[k] for k in cols]
    colours = class_colours(meta, class_index, columns=cols)
    missing = [f for f in feats if f not in prototypes]
    if missing:
        raise ArtifactError(f"the model's prototypes lack feature(s) {missing}; rebuild them with "
                            f"qpmcli.prototypes.build_prototypes(...) after training")
    n = per_feature or max(len(prototypes[f]) for f in feats)
    fig = plt.figure(figsize=(1.9 + 1.7 * n, 0.9 + 1.95 * len(feats)), dpi=DPI)
    gs = fig.add_gridspec(len(feats), n + 1, width_ratios=[1.1] + [1] * n, left=0.01, right=0.99,
                          top=1 - 0.95 / (0.9 + 1.95 * len(feats)), bottom=0.02, wspace=0.08, hspace=0.5)
    chars = int(fig.get_size_inches()[0] * 8)
    fig.suptitle(f"{_short(names[class_index], chars)}\nits {len(feats)} features, each shown by the training "
                 f"patches that activate it most (box: the patch; peak: the map's value there)", fontsize=11,
                 fontweight="bold")
    for r, (k, fid) in enumerate(zip(cols, feats, strict=True)):
        colour = colours[fid]
        ax = fig.add_subplot(gs[r, 0])
        ax.axis("off")
        r_, g_, b_ = colour_rgb(colour)
        ax.text(0.05, 0.62, _wrap(meta.feature_label(fid), 18, 2), fontsize=12, fontweight="bold", va="center",
                color="black" if 0.2126 * r_ + 0.7152 * g_ + 0.0722 * b_ > 0.45 else "white",
                bbox={"facecolor": colour, "edgecolor": "none", "boxstyle": "round,pad=0.25"})
        shared = [names[c] for c in range(w.shape[0]) if c != class_index and w[c, k] != 0]
        ax.text(0.05, 0.22, f"weight {w[class_index, k]:+g}\nalso used by {len(shared)}\nother class(es)", fontsize=8,
                va="center")
        for i, proto in enumerate(prototypes[fid][:n]):
            ax = fig.add_subplot(gs[r, i + 1])
            img = _png_image(proto["png_b64"])
            ax.imshow(img)
            box = proto.get("patch_box")
            if box:  # the patch where the map peaks: a dark outline under the feature's colour (visible on any image)
                for edge, lw in (("black", 3.2), (colour, 1.8)):
                    ax.add_patch(mpatches.Rectangle((box[0] - 0.5, box[1] - 0.5), box[2] - box[0], box[3] - box[1],
                                                    fill=False, edgecolor=edge, lw=lw))
            ax.set_xticks([])
            ax.set_yticks([])
            _frame(ax, colour, 2.5)
            ax.set_title(f"{_short(proto.get('class', ''), 22)}\npeak {float(proto.get('activation', 0)):.2f}",
                         fontsize=7)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------- HTML
# ------------------------------------------------------------------------------------------------ the command
def _unique_stem(path: Path, used: set[str]) -> str:
    stem = slug(path.stem, 60) or "image"
    cand, i = stem, 1
    while cand in used:
        i += 1
        cand = f"{stem}-{i}"
    used.add(cand)
    return cand


def explain(images: list[str | os.PathLike[str]], model: str | os.PathLike[str], *,
            out_dir: str | os.PathLike[str] = "explanations", compare: str | None = None,
            class_name: str | None = None, html_report: bool = False, device: str = "auto", top_k: int = 5,
            batch_size: int = 8, progress: bool = False, weights: str | None = None,
            settings: Any = None, coverage: float | None = None, set_score: str | None = None) -> dict[str, Any]:
    """``qpm explain``: figures for ``images`` (files or folders) with the model at ``model`` (run dir or .onnx).

    - each image: ``<out>/<stem>_explain.png`` for the predicted class, or for ``class_name`` when given;
    - ``compare``: also ``<out>/<stem>_vs_<class>.png``, the explained class against ``compare``;
    - ``class_name``: also ``<out>/class_<class>_prototypes.png`` (global explanation; needs stored prototypes);
      ``images`` may then be empty;
    - ``html_report``: ``<out>/report.html`` with everything embedded;
    - ``coverage`` (e.g. 0.9): each image's prediction set (:func:`qpmcli.conformal.prediction_set`, calibrated by
      ``qpm conformal``) as ``set`` in its entry and ``<out>/<stem>_set.png``, a small tree of the features the
      members share and where each diverges (:func:`qpmcli.setview.render_set_tree`).
    Writes ``<out>/explanations.json`` and returns the same summary.
    """
    from qpmcli.artifact import atomic_write_json
    from qpmcli.conformal import check_coverage, prediction_set, select_calibration
    from qpmcli.files import clean_stale_temps
    from qpmcli.images import list_images, open_image
    from qpmcli.predict import load_classifier
    from qpmcli.prototypes import load_prototypes

    if coverage is not None:
        check_coverage(coverage)
    paths = list_images(images)  # a missing or unreadable image is reported per image
    if not paths and not class_name:
        raise ConfigError("give at least one image (or --class NAME for a global explanation)")
    out = Path(out_dir).expanduser().resolve()  # explanations.json lists absolute paths: valid from anywhere
    owned = _owned(out)
    if owned is None:
        raise ConfigError(f"--out {out} holds an {EXPLANATIONS_JSON} that qpm did not write; choose another --out")
    skipped: list[dict[str, str]] = []
    paths = _not_our_figures(paths, skipped)
    if not paths and not class_name:
        raise ConfigError(f"nothing to explain: {len(skipped)} image(s) given are figures that qpm explain wrote")
    clf = load_classifier(model, device=device, weights=weights, settings=settings)
    md = clf.metadata
    calibration = None if coverage is None else select_calibration(md, coverage, set_score, model=str(model),
                                                                     onnx=clf.kind == "onnx")
    w, ids, names = md.weight, md.features, md.class_names
    cls_idx = resolve_class(class_name, names) if class_name else None
    cmp_idx = resolve_class(compare, names) if compare else None
    if cmp_idx is not None and cmp_idx == cls_idx:
        raise ConfigError(f"--compare {names[cmp_idx]!r} is the explained class itself; compare with another class")
    # what will be written, checked before anything is: never over a file of the user's (one qpm did not write)
    theirs = lambda name: (out / name).exists() and name not in owned  # noqa: E731
    global_name = f"class_{slug(names[cls_idx])}_prototypes.png" if cls_idx is not None else None
    for name in [n for n in (global_name, "report.html" if html_report else None) if n]:
        if theirs(name):
            raise ConfigError(f"--out {out}: {name} exists and qpm did not write it; choose another --out")
    stems: dict[Path, str] = {}
    used: set[str] = set()
    for p in paths:
        stem = _unique_stem(p, used)
        planned = [f"{stem}_explain.png"] + ([f"{stem}_vs_{slug(names[cmp_idx], 32)}.png"] if cmp_idx is not None
                                              else []) + ([f"{stem}_set.png"] if calibration is not None else [])
        clash = next((n for n in planned if theirs(n)), None)
        if clash:
            skipped.append({"image": str(p), "reason": f"its figure would replace {out / clash}, which qpm did not "
                                                       f"write (choose another --out)"})
        else:
            stems[p] = stem
    paths = [p for p in paths if p in stems]
    if not paths and not class_name:
        raise ConfigError(f"nothing to explain: {skipped[0]['image']} was skipped: {skipped[0]['reason']}"
                          + (f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""))
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps([out])
    summary: dict[str, Any] = {"format": EXPLANATIONS_FORMAT, "model": str(model), "backbone": md.backbone,
                               "out_dir": str(out), "class_names": len(names), "images": [], "skipped": skipped,
                               "global": None, "kind": clf.kind, "provider": clf.provider, "precision": clf.precision,
                               "feature_labels": {str(f): md.feature_label(f) for f in ids}}
    if cls_idx is not None:
        if int((w[cls_idx] != 0).sum()) > 10:
            raise ConfigError("--class (global explanation) needs a QPM model with a feature selection; this model's "
                              "head is dense (every class uses every feature)")
        if md.prototypes:  # embedded in an ONNX file (or read from the run by qpmcli.predict)
            protos = parse_prototypes(md.prototypes)
        else:
            protos = load_prototypes(model)
        fig = render_global(cls_idx, md, protos, out / global_name)
        summary["global"] = {"class": names[cls_idx], "class_index": cls_idx, "figure": str(fig),
                             "features": [ids[k] for k in class_columns(w, cls_idx, 10)]}
    from qpmcli.progress import progress_bar

    with progress_bar(enabled=progress and bool(paths)) as bar:
        task = bar.add_task("explaining", total=len(paths))
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            good, pil = [], []
            for p in chunk:  # an unreadable file in a folder is reported, not fatal
                try:
                    pil.append(open_image(p))
                    good.append(p)
                except ImageError as exc:
                    summary["images"].append({"image": str(p), "error": str(exc)})
                    bar.advance(task)
            if not good:
                continue
            res = clf.run(pil)
            for j, (p, img) in enumerate(zip(good, pil, strict=True)):
                logits, maps, feats = res["logits"][j], res["maps"][j], res["features"][j]
                expl = explain_output(logits, maps, feats, md, image=str(p), class_index=cls_idx, top_k=top_k)
                stem = stems[p]
                expl.figure = str(render_local(img, expl, maps, md, out / f"{stem}_explain.png"))
                item = expl.to_dict()
                if calibration is not None:
                    from qpmcli.setview import render_set_tree

                    item["set"] = prediction_set(calibration, md, logits, feats)
                    item["set"]["figure"] = str(render_set_tree(item["set"], out / f"{stem}_set.png",
                                                                title=p.name))
                if cmp_idx is not None and cmp_idx == expl.class_index:  # predicted class == --compare
                    item["compare"] = {"skipped": f"the image is explained as {names[cmp_idx]} itself"}
                elif cmp_idx is not None:
                    other = explain_output(logits, maps, feats, md, image=str(p), class_index=cmp_idx, top_k=top_k)
                    other = explain_output(logits, maps, feats, md, image=str(p), class_index=cmp_idx, top_k=top_k,
                                           colours=compare_colours(expl, other))
                    sparse = max(int((w[expl.class_index] != 0).sum()), int((w[cmp_idx] != 0).sum())) <= 10
                    groups = compare_classes(md, expl.class_index, cmp_idx) if sparse else compare_classes(
                        md, expl.class_index, cmp_idx, [e.column for e in expl.features],
                        [e.column for e in other.features])
                    fig = render_compare(img, expl, other, maps, feats, md, groups,
                                         out / f"{stem}_vs_{slug(names[cmp_idx], 32)}.png")
                    item["compare"] = {"class_a": expl.class_name, "class_b": other.class_name,
                                       "logit_a": expl.logit, "logit_b": other.logit,
                                       "probability_b": other.probability,
                                       "shared": groups["shared_features"], "only_a": groups["only_a_features"],
                                       "only_b": groups["only_b_features"], "figure": str(fig)}
                summary["images"].append(item)
                bar.advance(task)
    summary["num_failed"] = sum(1 for i in summary["images"] if "error" in i)
    if paths and summary["num_failed"] == len(paths):
        raise ImageError(f"none of the {len(paths)} image(s) could be read; first error: "
                         f"{summary['images'][0]['error']}")
    if html_report:
        from qpmcli.explainhtml import render_html

        summary["html"] = str(render_html(summary, out / "report.html",
                                          title=f"qpm explain \u2014 {Path(str(model)).name}"))
    written = {Path(f).name for f in _figures(summary)}
    summary["files"] = sorted(n for n in owned | written if n != EXPLANATIONS_JSON and (out / n).is_file())
    atomic_write_json(out / EXPLANATIONS_JSON, summary)
    return summary


EXPLANATIONS_JSON = "explanations.json"  # the summary of qpm explain, which also lists every file it wrote there
EXPLANATIONS_FORMAT = "qpm-explanations"


def _owned(folder: Path) -> set[str] | None:
    from qpmcli.artifact import owned_names

    return owned_names(folder, EXPLANATIONS_JSON, EXPLANATIONS_FORMAT)


def _not_our_figures(paths: list[Path], skipped: list[dict[str, str]]) -> list[Path]:
    """``paths`` without the files that qpm explain wrote (listed in their folder's explanations.json): a figure of
    qpm's is never explained again, e.g. by ``qpm explain imgs -o imgs`` run twice."""
    owned: dict[Path, set[str]] = {}
    keep = []
    for p in paths:
        folder = p.parent.resolve()
        if folder not in owned:
            owned[folder] = _owned(folder) or set()
        if p.name in owned[folder]:
            skipped.append({"image": str(p), "reason": "a figure that qpm explain wrote"})
        else:
            keep.append(p)
    return keep


def _figures(summary: dict[str, Any]) -> list[str]:
    """Every file an explain summary names (figures, contrastive and set figures, the global figure, the report)."""
    out = [i["figure"] for i in summary["images"] if i.get("figure")]
    out += [i[k]["figure"] for i in summary["images"] for k in ("compare", "set") if (i.get(k) or {}).get("figure")]
    out += [f for f in ((summary.get("global") or {}).get("figure"), summary.get("html")) if f]
    return out


__all__ = ["explain", "render_compare", "render_global", "render_local", "slug"]

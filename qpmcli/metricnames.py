"""The metrics' names: the reference's registry ids, the JSON keys each one produces, presets and aliases, and
the one check of a ``--metrics`` value every job makes before any work (no numpy, no torch: options and the CLI read
it)."""

from __future__ import annotations

# ====================================================================================================================
# Names, groups and presets
# ====================================================================================================================

SEG_VARIANTS = ("gradcam", "gradcam_dilated", "gradcam_max", "gradcam_max_dilated", "max", "max_dilated")
"""Segmentation-overlap variants (METHOD.md §8); ``gradcam_dilated`` is the paper's Plausibility."""

METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "accuracy": ("Accuracy",),
    "sid": ("SID@5",),
    "class_independence": ("Class-Independence",),
    "contrastiveness": ("Contrastiveness",),
    "correlation": ("Correlation",),
    "structural_grounding": ("Structural-Grounding",),
    "alignment": ("Alignment",),
    "segmentation_overlap": ("Plausibility",) + tuple(f"SegOverlap-{v}" for v in SEG_VARIANTS),
    "pooling_baseline": ("Pooling-Avg-Accuracy", "Pooling-Max-Accuracy", "Pooling-Ratio"),
    "sparsity": ("NFeatures", "PerClass"),
}
"""Metric ids (the reference's registry ids, lower case) and the JSON keys each one produces."""

ALL_KEYS: tuple[str, ...] = tuple(k for keys in METRIC_GROUPS.values() for k in keys)

SET_METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "coverage": ("Coverage",),
    "set_size": ("Set-Size",),
    "set_coherence": ("Set-Coherence",),
}
"""Prediction-set metrics of a calibrated run (``qpm conformal``; not METHOD.md §8): computed by
:func:`qpmcli.evaluate.evaluate_model` from a calibration, ``None`` here. ``qpm evaluate`` adds them to ``all`` when
the run has a calibration."""
SET_KEYS: tuple[str, ...] = tuple(k for keys in SET_METRIC_GROUPS.values() for k in keys)

PRESETS: dict[str, tuple[str, ...]] = {
    "all": tuple(METRIC_GROUPS),
    # the reference's "fast": everything but the expensive SID, Contrastiveness and segmentation overlap
    "fast": ("accuracy", "class_independence", "correlation", "structural_grounding", "alignment",
             "pooling_baseline", "sparsity"),
    "essential": ("accuracy", "correlation", "class_independence", "sparsity"),
}

_ALIASES = {"diversity": "sid", "sid@5": "sid", "cub_alignment": "alignment",
            "cub_segmentation_overlap": "segmentation_overlap", "segoverlap": "segmentation_overlap",
            "classindependence": "class_independence", "structuralgrounding": "structural_grounding"}


def resolve_metric_names(which: str | list[str] | tuple[str, ...] = "all") -> list[str]:
    """JSON keys for ``which``: a preset (all, fast, essential), metric ids or JSON keys, as a list or comma list.

    Raises ``ValueError`` naming the valid choices for an unknown name.
    """
    items = [w.strip() for w in which.split(",")] if isinstance(which, str) else [str(w).strip() for w in which]
    by_lower = {k.lower(): k for k in (*ALL_KEYS, *SET_KEYS)}
    groups = {**METRIC_GROUPS, **SET_METRIC_GROUPS}
    keys: list[str] = []
    for item in (i for i in items if i):
        low = item.lower()
        low = _ALIASES.get(low, _ALIASES.get(low.replace("-", "").replace("_", ""), low))
        if low in PRESETS:
            new = [k for g in PRESETS[low] for k in METRIC_GROUPS[g]]
        elif low.replace("-", "_") in groups:
            new = list(groups[low.replace("-", "_")])
        elif low in by_lower:
            new = [by_lower[low]]
        else:
            raise ValueError(f"unknown metric {item!r}; use all, fast, essential, one of "
                             f"{', '.join(groups)} or a key such as {', '.join(ALL_KEYS[:3])}")
        keys += [k for k in new if k not in keys]
    if not keys:
        raise ValueError("no metric requested; use all, fast, essential or metric names")
    return [k for k in (*ALL_KEYS, *SET_KEYS) if k in keys]


# ====================================================================================================================
# Helpers
# ====================================================================================================================

def checked_metric_names(which: str | list[str] | tuple[str, ...], flag: str = "--metrics") -> list[str]:
    """:func:`resolve_metric_names`, with an unknown name as a one-line ``ConfigError`` listing the valid ones (the
    check every job makes before any work)."""
    from qpmcli.errors import ConfigError

    try:
        return resolve_metric_names(which)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None

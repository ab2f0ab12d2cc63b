"""Opening datasets by name: ``load_dataset`` (the one entry point for every stage) and ``check_dataset`` (``qpm data
check``). The datasets themselves are plugins (``qpm_datasets`` hook); this module only resolves names, roots and
options, so that every command treats every dataset alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qpmcli.contracts import Dataset
from qpmcli.errors import DatasetError, ImageError

SPLITS = ("train", "test")


def load_dataset(name: str, root: str | Path | None = None, split: str = "train", settings: Any = None,
                 **options: Any) -> Dataset:
    """Open split ``split`` of dataset ``name``; ``root=None`` falls back to ``settings.data_root`` (QPM_DATA_ROOT).

    ``options`` are dataset-specific (e.g. ``crop="bbox"`` for cub200, ``n_classes=20`` for shapes); an unknown option,
    a missing root or a malformed layout is a :class:`DatasetError`, an unknown name a :class:`PluginError`.
    """
    from qpmcli.registry import get_registry

    spec = get_registry().get("dataset", name)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} for dataset {name!r}; use one of: {', '.join(SPLITS)}")
    if root is None and spec.needs_root:
        if settings is None:
            from qpmcli.settings import resolve_settings

            settings, _ = resolve_settings()
        root = settings.data_root
        if root is None:
            where = f" (obtain it from {spec.source})" if spec.source else ""
            raise DatasetError(f"dataset {name!r} needs a root folder: pass --data-root PATH or set QPM_DATA_ROOT"
                               f"{where}")
    if root is not None:
        root = Path(root).expanduser()
        if spec.needs_root and not root.exists():
            where = f"; obtain it from {spec.source}" if spec.source else ""
            raise DatasetError(f"dataset root {root} does not exist (dataset {name!r}{where})")
    try:
        dataset = spec.factory(root, split, **options)
    except TypeError as exc:
        if "keyword argument" in str(exc):
            raise DatasetError(f"dataset {name!r} does not accept these options {sorted(options)}: {exc}") from exc
        raise
    if not isinstance(dataset, Dataset):
        raise DatasetError(f"the {name!r} dataset plugin returned a {type(dataset).__name__}, not a qpmcli Dataset")
    return dataset


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["n_classes=20", "crop=bbox"]`` -> ``{"n_classes": 20, "crop": "bbox"}`` (ints, floats, true/false/none)."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise DatasetError(f"dataset option {pair!r} is not KEY=VALUE (e.g. --option n_classes=20)")
        options[key] = _coerce(raw.strip())
    return options


def _coerce(raw: str) -> Any:
    lowered = raw.lower()
    if lowered in ("true", "yes"):
        return True
    if lowered in ("false", "no"):
        return False
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def check_dataset(name: str, root: str | Path | None = None, settings: Any = None, decode: int = 1,
                  **options: Any) -> dict[str, Any]:
    """Open both splits and verify them: every listed file exists, labels are in range, the first ``decode`` images
    (and masks) of each split decode. Returns counts per split, classes, and whether masks and attributes are present.
    A problem is a :class:`DatasetError` naming the first bad path and how many more there are.
    """
    splits: dict[str, Any] = {}
    report: dict[str, Any] = {"dataset": name}
    for split in SPLITS:
        ds = load_dataset(name, root=root, split=split, settings=settings, **options)
        labels = ds.labels()
        n_classes = ds.num_classes
        bad = [(i, y) for i, y in enumerate(labels) if not 0 <= int(y) < n_classes]
        if bad:
            raise DatasetError(f"{name} {split}: {len(bad)} label(s) out of range 0..{n_classes - 1}, first: item "
                               f"{bad[0][0]} has label {bad[0][1]}")
        counts = [0] * n_classes
        for y in labels:
            counts[int(y)] += 1
        missing = [p for p in (getattr(ds, "paths", None) or []) if not Path(p).is_file()]
        if missing:
            raise DatasetError(f"{name} {split}: {len(missing)} listed image file(s) are missing, first: {missing[0]}")
        missing_masks = [p for p in (getattr(ds, "mask_paths", None) or []) if not Path(p).is_file()]
        if ds.has_masks and missing_masks:
            raise DatasetError(f"{name} {split}: {len(missing_masks)} mask file(s) are missing, first: "
                               f"{missing_masks[0]}")
        sizes = []
        for i in range(min(decode, len(ds))):
            sample = ds[i]
            try:
                width, height = sample.image.size
            except AttributeError as exc:
                raise ImageError(f"{name} {split} item {i}: not a PIL image ({type(sample.image).__name__})") from exc
            if sample.mask is not None and tuple(sample.mask.shape) != (height, width):
                raise DatasetError(f"{name} {split} item {i} ({sample.path}): mask shape {tuple(sample.mask.shape)} "
                                   f"does not match the image ({height}, {width})")
            sizes.append([width, height])
        splits[split] = {"count": len(ds), "per_class_min": min(counts) if counts else 0,
                         "per_class_max": max(counts) if counts else 0,
                         "empty_classes": sum(1 for c in counts if c == 0), "decoded_sizes": sizes,
                         "fingerprint": ds.fingerprint()}
        if split == "train":
            attrs = ds.class_attributes()
            report.update({
                "root": str(getattr(ds, "root", None) or root or "") or None,
                "classes": n_classes,
                "class_names": list(ds.classes),
                "masks": bool(ds.has_masks),
                "class_attributes": None if attrs is None else list(attrs.shape),
                "image_attributes": bool(getattr(ds, "has_image_attributes", False)),
            })
    report["splits"] = splits
    return report

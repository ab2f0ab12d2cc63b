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


def check_image(path: str | Path, full: bool = False) -> str | None:
    """``None`` when the image file is readable, else the reason (one line).

    The default is a header check: PIL identifies the format and size (within our pixel limit) and runs its
    ``verify()`` (for PNG: every chunk and its CRC, so a truncated or bit-flipped file is found without decoding;
    for JPEG little more than the header). ``full`` decodes the whole image like training does.
    """
    from PIL import Image, UnidentifiedImageError

    from qpmcli.images import bomb_message, open_image, pixel_limit, too_large, too_small

    if full:
        try:
            im = open_image(path)
        except ImageError as exc:
            return str(exc).replace("\n", " ")
        err = too_small(path, *im.size)
        return None if err is None else str(err)
    try:
        with pixel_limit(), Image.open(path) as im:
            err = too_large(path, im.width, im.height) or too_small(path, im.width, im.height)
            if err is not None:
                return str(err)
            im.verify()
    except Image.DecompressionBombError as exc:
        return bomb_message(path, exc)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        return f"cannot read image {path}: {exc}".replace("\n", " ")
    return None


def _unreadable(name: str, split: str, bad: list[tuple[str, str]], n: int) -> DatasetError:
    """One line: how many images are unreadable, the first with its reason, a few more by name."""
    more = ", ".join(p for p, _ in bad[1:4]) + (", ..." if len(bad) > 4 else "")
    return DatasetError(f"{name} {split}: {len(bad)} of {n} image(s) are unreadable, first: {bad[0][1]}"
                        + (f"; also {more}" if more else "") + " (qpm extract --skip-bad leaves them out)")


def check_dataset(name: str, root: str | Path | None = None, settings: Any = None, decode: int = 1,
                  full: bool = False, **options: Any) -> dict[str, Any]:
    """Open both splits and verify them: every listed file exists, labels are in range, every image file passes a
    header check (:func:`check_image`; with ``full`` a complete decode), the first ``decode`` samples (and masks) of
    each split load. Datasets without files (synthetic ones) have their samples loaded instead: the first
    ``decode``, or all with ``full``. Returns counts per split, classes, and whether masks and attributes are present.
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
        paths = getattr(ds, "paths", None)
        if paths:
            bad = [(str(p), err) for p in paths if (err := check_image(p, full)) is not None]
        else:  # no files: the samples themselves are the images
            bad = []
            for i in range(len(ds) if full else min(decode, len(ds))):
                try:
                    ds[i]
                except (ImageError, OSError, ValueError) as exc:
                    bad.append((f"item {i}", str(exc).replace("\n", " ")))
        if bad:
            raise _unreadable(name, split, bad, len(ds))
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
                         "images_checked": len(paths) if paths else (len(ds) if full else min(decode, len(ds))),
                         "check": "full decode" if full else "header",
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

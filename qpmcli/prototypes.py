"""Prototypes: the training patches that activate each selected feature most (``qpm explain --class``).

:func:`build_prototypes` finds them after training (one pass over the cached train tokens) and
:func:`save_prototypes` stores them as ``<run>/prototypes/`` (PNG crops + ``prototypes.json``, the document of
:mod:`qpmcli.modelfile`); :func:`load_prototypes` reads them back from a run directory, an exported ``.onnx`` file
or a metadata mapping, so explaining never needs the training data; :func:`embedded_prototypes` is the form
``qpm export`` writes into ONNX metadata.

Importing this module imports neither torch nor matplotlib (``build_prototypes`` imports torch when called), so
``qpm train`` uses it without the plotting code and ``qpm predict`` without torch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qpmcli.artifact import PROTOTYPES, PROTOTYPES_PARTIAL, atomic_write_json, read_json
from qpmcli.errors import ArtifactError, ConfigError, QpmError
from qpmcli.modelfile import (
    MAX_PROTOTYPE_BYTES,
    PROTOTYPES_FORMAT,
    PROTOTYPES_FORMAT_VERSION,
    PROTOTYPES_JSON,
    PROTOTYPES_KEY,
    check_format_version,
    confined,
    embed_prototypes,
    parse_prototypes,
    read_onnx_props,
)

__all__ = ["build_prototypes", "crop_box", "embedded_prototypes", "load_prototypes", "prototypes_metadata",
           "read_prototypes_folder", "save_prototypes"]


def crop_box(r: int, c: int, grid: tuple[int, int], size: tuple[int, int], context: float) -> tuple[int, ...]:
    """A square-ish window (``context`` patches wide, at most 45 % of the image) centred on patch ``(r, c)``,
    shifted to stay inside the image; returned in pixels of an image of ``size = (W, H)``."""
    gh, gw = grid
    width, height = size
    side_x = min(context / gw, 0.45) * width
    side_y = min(context / gh, 0.45) * height
    cx, cy = (c + 0.5) / gw * width, (r + 0.5) / gh * height
    x0 = min(max(cx - side_x / 2, 0.0), width - side_x)
    y0 = min(max(cy - side_y / 2, 0.0), height - side_y)
    left, top = min(round(x0), width - 1), min(round(y0), height - 1)
    return (left, top, max(round(x0 + side_x), left + 1), max(round(y0 + side_y), top + 1))  # never an empty box


def build_prototypes(model: Any, train_cache: Any, dataset: Any, run_dir: str | os.PathLike[str],
                     per_feature: int = 6, *, batch_size: int = 256, crop_px: int = 64, context: float = 3.0,
                     device: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Find, per selected feature, the ``per_feature`` training images whose map peaks highest (one patch each), and
    store crops around those patches in ``<run>/prototypes/`` (``f<id>_<rank>.png`` + ``prototypes.json``).

    ``model``: the final (sparse) :class:`~qpmcli.model.QPMModel`; ``train_cache``: the run's train
    :class:`~qpmcli.cache.TokenCache`; ``dataset``: the same train split (for the pixels; ``train_cache.indices``
    maps cache rows to dataset items). The search is one pass over the cached tokens with a running top-k per feature.
    Returns a JSON-able summary. A model without a feature selection gets no prototypes (nothing is written).
    """
    import numpy as np
    import torch

    run = Path(run_dir)
    if not getattr(model, "is_sparse", False):
        return {"written": False, "reason": "the model has no feature selection", "features": 0}
    if per_feature < 1:
        raise ConfigError(f"per_feature must be >= 1, not {per_feature}")
    ids = [int(i) for i in model.sel_index.tolist()]
    k = len(ids)
    dev = torch.device(device) if device else next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = len(train_cache)
    m = min(per_feature, n)
    best_v = torch.full((0, k), -math.inf)
    best_i = torch.zeros((0, k), dtype=torch.long)
    best_p = torch.zeros((0, k), dtype=torch.long)
    tokens = train_cache.tokens
    bar = None
    if progress:
        from qpmcli.progress import progress_bar

        bar = progress_bar()
        bar.start()
        task = bar.add_task("prototypes", total=n)
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                x = torch.from_numpy(np.asarray(tokens[start:start + batch_size], dtype=np.float32)).to(dev)
                maps = model(x).maps.float()  # [B, K, h, w]
                flat = maps.flatten(2)
                v, p = flat.max(dim=2)  # [B, K]
                rows = torch.arange(start, start + x.shape[0]).unsqueeze(1).expand(-1, k)
                cat_v = torch.cat([best_v, v.cpu()])
                cat_i = torch.cat([best_i, rows])
                cat_p = torch.cat([best_p, p.cpu()])
                top = cat_v.topk(min(m, cat_v.shape[0]), dim=0)
                best_v = top.values
                best_i = cat_i.gather(0, top.indices)
                best_p = cat_p.gather(0, top.indices)
                if bar is not None:
                    bar.advance(task, x.shape[0])
    finally:
        if bar is not None:
            bar.stop()
        model.train(was_training)
    grid = tuple(int(g) for g in train_cache.grid)
    names = [str(c) for c in (train_cache.classes or getattr(dataset, "classes", None) or [])]
    labels = np.asarray(train_cache.labels)
    indices = np.asarray(train_cache.indices)
    from PIL import Image

    # decode each training image once (rows in order), crop every prototype it holds, then let it go
    wanted: dict[int, list[tuple[int, int]]] = {}
    for j in range(k):
        for rank in range(best_v.shape[0]):
            wanted.setdefault(int(best_i[rank, j]), []).append((j, rank))
    found: dict[tuple[int, int], dict[str, Any]] = {}
    crops: dict[str, Any] = {}
    unreadable = 0
    for row in sorted(wanted):
        try:
            img = dataset[int(indices[row])].image.convert("RGB")
        except (QpmError, OSError, ValueError):  # an image moved/broke after caching: fewer prototypes
            unreadable += 1
            continue
        label = int(labels[row])
        pw, ph = img.size[0] / grid[1], img.size[1] / grid[0]
        for j, rank in wanted[row]:
            r, c = divmod(int(best_p[rank, j]), grid[1])
            box = crop_box(r, c, grid, img.size, context)
            crop = img.crop(box).resize((crop_px, crop_px), Image.Resampling.BICUBIC)
            sx, sy = crop_px / (box[2] - box[0]), crop_px / (box[3] - box[1])
            pbox = [round((c * pw - box[0]) * sx, 1), round((r * ph - box[1]) * sy, 1),
                    round(((c + 1) * pw - box[0]) * sx, 1), round(((r + 1) * ph - box[1]) * sy, 1)]
            name = f"f{ids[j]}_{rank}.png"
            crops[name] = crop
            found[(j, rank)] = {"file": name, "class": names[label] if label < len(names) else str(label),
                                "label": label, "activation": float(best_v[rank, j]), "row": row,
                                "index": int(indices[row]), "patch": [r, c], "patch_box": pbox}
    doc_feats = {str(fid): [found[(j, rank)] for rank in range(best_v.shape[0]) if (j, rank) in found]
                 for j, fid in enumerate(ids)}
    doc = {"format": PROTOTYPES_FORMAT, "format_version": PROTOTYPES_FORMAT_VERSION, "per_feature": m,
           "crop_px": crop_px, "context_patches": context, "grid": list(grid), "n_train": n, "features": doc_feats}
    final = save_prototypes(run, doc, crops)
    return {"written": True, "path": str(final), "features": k, "per_feature": m,
            "images": len(wanted) - unreadable, "unreadable": unreadable}


def save_prototypes(run_dir: str | os.PathLike[str], doc: dict[str, Any], images: dict[str, Any]) -> Path:
    """Write ``<run>/prototypes/``: every PIL image of ``images`` as ``<name>`` (PNG) and ``doc`` as
    ``prototypes.json``, into a side folder that then replaces the old one (readers never see half a folder)."""
    run = Path(run_dir)
    final = run / PROTOTYPES
    tmp = run / PROTOTYPES_PARTIAL
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, image in images.items():
        image.save(tmp / name, format="PNG", optimize=True)
    atomic_write_json(tmp / PROTOTYPES_JSON, doc)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final



def read_prototypes_folder(folder: str | os.PathLike[str]) -> dict[int, list[dict[str, Any]]]:
    """``<run>/prototypes/`` as ``{feature_id: [entry + {"png_b64"}]}`` (every entry of ``prototypes.json``, its
    PNG ``file`` embedded as base64). A missing index or PNG is an :class:`ArtifactError`."""
    import base64

    doc_path = Path(folder) / PROTOTYPES_JSON
    if not doc_path.is_file():
        raise ArtifactError(f"{doc_path} is missing: the run has no prototypes; build them with "
                            f"qpmcli.prototypes.build_prototypes(model, train_cache, dataset, '{Path(folder).parent}')")
    doc = read_json(doc_path)
    if not isinstance(doc, dict) or not isinstance(doc.get("features", {}), dict):
        raise ArtifactError(f"{doc_path} is not a qpm prototypes document; rebuild the prototypes")
    check_format_version(doc, PROTOTYPES_FORMAT_VERSION, doc_path, default=1)
    out: dict[int, list[dict[str, Any]]] = {}
    for fid, entries in doc.get("features", {}).items():
        items = []
        for e in entries:
            png = confined(doc_path.parent, e.get("file") if isinstance(e, dict) else None,
                           f"{doc_path} entry 'file' of feature {fid}")
            if not png.is_file():
                raise ArtifactError(f"prototype image {png} is missing; rebuild the prototypes")
            items.append({**e, "png_b64": base64.b64encode(png.read_bytes()).decode("ascii")})
        out[int(fid)] = items
    return out


def load_prototypes(source: Any) -> dict[int, list[dict[str, Any]]]:
    """Prototypes as ``{feature_id: [{"png_b64", "class", "activation", ...}]}`` from a run directory
    (``prototypes/prototypes.json``), an ``.onnx`` file (metadata key ``qpm_prototypes``, the same JSON with
    string keys), or a metadata dict holding that key. Missing prototypes are an :class:`ArtifactError`."""
    if isinstance(source, dict):
        raw = source.get(PROTOTYPES_KEY, source.get("prototypes"))
        if raw is None:
            raise ArtifactError(f"the model carries no prototypes (no '{PROTOTYPES_KEY}' metadata)")
        return parse_prototypes(raw)
    path = Path(source)
    if path.is_dir():
        return read_prototypes_folder(path / PROTOTYPES)
    if path.suffix.lower() == ".onnx" and path.is_file():
        raw = read_onnx_props(path).get(PROTOTYPES_KEY)
        if raw is None:
            raise ArtifactError(f"{path} carries no prototypes (no '{PROTOTYPES_KEY}' metadata); export a run "
                                f"that has prototypes/")
        return parse_prototypes(raw)
    raise ArtifactError(f"{path} is neither a run directory nor an .onnx file")


def prototypes_metadata(run_dir: str | os.PathLike[str]) -> str:
    """The JSON string embedded as ONNX metadata ``qpm_prototypes``:
    ``{"<feature id>": [{"png_b64", "class", "activation", "patch_box"}, ...]}``."""
    return json.dumps(embed_prototypes(load_prototypes(run_dir)), separators=(",", ":"))


def embedded_prototypes(run_dir: str | os.PathLike[str], *, max_bytes: int = MAX_PROTOTYPE_BYTES,
                        log: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """The run's prototypes in embedded form (:func:`qpmcli.modelfile.embed_prototypes`), or ``None`` when the run
    has no ``prototypes/`` folder, it is empty, or the document exceeds ``max_bytes`` (``log`` says so)."""
    if not (Path(run_dir) / PROTOTYPES).is_dir():
        return None
    doc = embed_prototypes(load_prototypes(run_dir))
    if not doc:
        return None
    size = len(json.dumps(doc, separators=(",", ":")))
    if size > max_bytes:
        if log:
            log(f"prototypes are {size / 2**20:.1f} MB (limit {max_bytes >> 20} MB); not embedded")
        return None
    return doc

"""Features named in words: ``qpm name-features``.

A feature is named by the attributes it fires on. The alignment matrix of the reference's alignment metric
(:func:`qpmcli.metrics.alignment_matrix`, with the dataset's certainty mask: an unknown label counts neither as
present nor as absent) ranks, for every selected feature, the attributes whose training images raise it most above
the images without them. A candidate name must

- have **support**: at least ``min_support`` training images known to show the attribute and as many known not to;
- **fire more with it than without** (M > 0);
- be **stable** over ``bootstrap`` resamples of the training images (drawn with replacement by a numpy Generator
  seeded with ``seed``): in at least ``min_stability`` of them it ranks at least as high as on all images (the best
  name stays the best, the second stays in the first two, ...) and still fires more with than without. Each
  resample re-ranks the feature's :data:`POOL` best candidates;
- for a further name, align at least :data:`MIN_RELATIVE` as strongly as the best (a bootstrap cannot tell the
  best of many unrelated attributes from a real one: resamples keep the noise they were drawn from).

If the best candidate is not stable the feature gets no name and a note saying why, never a guess. Attributes with
identical labels on every image always co-occur, so the data cannot tell them apart: they are ranked as one
candidate and their names are listed together. A person's name (``--set FID=NAME``) wins: it becomes the feature's
first name, marked ``"user": true``, and survives recomputation.

Attributes come from the run's dataset (its optional ``image_attributes()``, ``image_attribute_known()`` and
``attribute_names()``: CUB, ``shapes``) or from a CSV file with the columns ``image, attribute, present[, known]``
(:func:`read_attribute_csv`). The result is written atomically to ``<run>/feature_names.json`` (the format of
:mod:`qpmcli.featurenames`; :mod:`qpmcli.modelfile` reads it back into
:class:`~qpmcli.modelfile.ClassifierMetadata`, so explain, predict, serve and exported ONNX files show the names).
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpmcli.errors import ArtifactError, ConfigError, DatasetError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from qpmcli.evaluate import ImageAttributes

__all__ = ["CSV_COLUMNS", "POOL", "NameRequest", "name_features", "parse_name_sets", "read_attribute_csv",
           "run_name_features"]

POOL = 12  # candidates per feature that the bootstrap re-ranks (at least 4 x --top)
MIN_RELATIVE = 0.5  # a further name must align at least this fraction as strongly as the feature's best name
CSV_COLUMNS = ("image", "attribute", "present", "known")  # the last one is optional
_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f"}


# --------------------------------------------------------------------------------------------------- the request
@dataclass
class NameRequest:
    """Everything ``qpm name-features`` needs. ``sets`` maps a dense feature id to a person's name ("" removes it)."""

    run: str
    top: int = 3
    min_support: int = 10
    bootstrap: int = 200
    min_stability: float = 0.7
    attributes: str | None = None
    sets: dict[int, str] = field(default_factory=dict)
    seed: int = 0
    device: str | None = None  # None: the device setting
    batch_size: int = 256

    def checked(self) -> NameRequest:
        """Every check that needs no data (one line, exit 2); returns the request."""
        import math

        from qpmcli.featurenames import clean_feature_name

        if not 1 <= self.top <= 20:
            raise ConfigError(f"--top must be between 1 and 20, not {self.top}")
        if self.min_support < 1:
            raise ConfigError(f"--min-support must be at least 1 image, not {self.min_support}")
        if not 0 <= self.bootstrap <= 10_000:
            raise ConfigError(f"--bootstrap must be between 0 (no stability check) and 10000, not {self.bootstrap}")
        if not (math.isfinite(self.min_stability) and 0.0 <= self.min_stability <= 1.0):
            raise ConfigError(f"--min-stability must be between 0 and 1, not {self.min_stability}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.attributes is not None and not Path(self.attributes).expanduser().is_file():
            raise ConfigError(f"--attributes {self.attributes}: no such file (a CSV with the columns image, "
                              f"attribute, present[, known])")
        for fid, name in self.sets.items():
            if name:
                try:
                    self.sets[fid] = clean_feature_name(name, f"--set {fid}")
                except ArtifactError as exc:
                    raise ConfigError(str(exc)) from None
        return self


def parse_name_sets(pairs: Iterable[str] | None) -> dict[int, str]:
    """``["232=red wing bar", "12="]`` -> ``{232: "red wing bar", 12: ""}`` (an empty name removes a person's name)."""
    out: dict[int, str] = {}
    for pair in pairs or ():
        fid, sep, name = str(pair).partition("=")
        if not sep or not fid.strip().lstrip("f").isdigit():
            raise ConfigError(f"--set {pair!r}: expected FEATURE=NAME with a feature id, e.g. --set 232=\"red wing "
                              f"bar\" (an empty NAME removes your name)")
        key = int(fid.strip().lstrip("f"))
        if key in out:
            raise ConfigError(f"--set names feature {key} twice")
        out[key] = name.strip()
    return out


# ------------------------------------------------------------------------------------------------- the naming
def _attribute_groups(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Attributes with identical labels on every image, as groups numbered by their first attribute:
    ``(representative attribute of each group [G], members of each group)``."""
    import numpy as np

    bits = np.concatenate([np.packbits(pos.T, axis=1), np.packbits(neg.T, axis=1)], axis=1)  # [A, bytes]
    groups: dict[bytes, list[int]] = {}
    for a, row in enumerate(bits):
        groups.setdefault(row.tobytes(), []).append(a)
    members = [np.asarray(m, dtype=np.int64) for m in groups.values()]  # dicts keep first-seen order
    return np.asarray([int(m[0]) for m in members], dtype=np.int64), members


def _bootstrap_stability(f: np.ndarray, pos: np.ndarray, neg: np.ndarray, pools: list[np.ndarray], n: int,
                         rng: np.random.Generator) -> list[np.ndarray]:
    """Per feature, the fraction of ``n`` resamples in which each pool entry (columns of ``pos``/``neg``, in rank
    order) ranks at least as high as its position and still fires more with than without.

    Only ranks within a feature are compared, so the per-feature normaliser of M drops out: a resample needs the
    two group means of each (feature, candidate) pair, i.e. weighted sums ``W @ (F_j * pos_a)`` with the resample's
    image counts ``W [n, N]``.
    """
    import numpy as np

    n_img = f.shape[0]
    draws = rng.integers(0, n_img, size=(n, n_img))
    counts = np.bincount((draws + np.arange(n)[:, None] * n_img).ravel(), minlength=n * n_img)
    w = counts.reshape(n, n_img).astype(np.float32)  # image counts: exact in float32
    used = np.unique(np.concatenate([p for p in pools if p.size] or [np.zeros(0, np.int64)]))
    col = {int(a): i for i, a in enumerate(used)}
    n_pos, n_neg = w @ pos[:, used].astype(np.float32), w @ neg[:, used].astype(np.float32)  # [n, U]
    pairs = [(j, int(a)) for j, pool in enumerate(pools) for a in pool]
    diff = np.empty((n, len(pairs)), np.float32)
    f32 = f.astype(np.float32)
    for s in range(0, len(pairs), 512):  # bounded memory for dense heads (many features)
        chunk = pairs[s:s + 512]
        fj = f32[:, [j for j, _ in chunk]]
        cols = [col[a] for _, a in chunk]
        attrs = [a for _, a in chunk]
        with np.errstate(divide="ignore", invalid="ignore"):
            cp, cn = n_pos[:, cols], n_neg[:, cols]
            mp = np.where(cp > 0, (w @ (fj * pos[:, attrs])) / cp, 0.0)
            mn = np.where(cn > 0, (w @ (fj * neg[:, attrs])) / cn, 0.0)
        diff[:, s:s + len(chunk)] = mp - mn
    out, start = [], 0
    for pool in pools:
        d = diff[:, start:start + pool.size]  # [n, P], columns in full-data rank order
        start += pool.size
        idx = np.arange(pool.size)
        ahead = (d[:, None, :] > d[:, :, None]) | ((d[:, None, :] == d[:, :, None]) & (idx[None, :] < idx[:, None]))
        rank = ahead.sum(axis=2)  # [n, P]: how many candidates beat each one in this resample
        out.append(((rank <= idx[None, :]) & (d > 0)).mean(axis=0))
    return out


def _short(value: float) -> float:
    """A float as stored in the names file: 6 significant digits (the same file for the same seed and data)."""
    return float(f"{value:.6g}")


def name_features(features: Any, present: Any, known: Any, attribute_names: Sequence[str], *,
                  feature_ids: Sequence[int] | None = None, top: int = 3, min_support: int = 10,
                  bootstrap: int = 200, min_stability: float = 0.7, min_relative: float = MIN_RELATIVE,
                  seed: int = 0) -> list[dict[str, Any]]:
    """Names for every column of ``features [N, K]`` (train images x features) from attribute labels
    ``present [N, A]`` with the mask ``known [N, A]`` (None = all known); see the module docstring for the rules.

    Returns one entry per feature: ``{"feature", "column", "names" (best first, at most ``top``), "user": False,
    "support" (images known to show each name), "stability" (fraction of resamples; None without bootstrap),
    "alignment" (M of each name), "note" (why a feature has no name, else None)}``.
    """
    import numpy as np

    from qpmcli.metrics import alignment_matrix

    f = np.asarray(features, dtype=np.float64)
    att = np.asarray(present, dtype=bool)
    kn = np.ones_like(att) if known is None else np.asarray(known, dtype=bool)
    if f.ndim != 2 or att.ndim != 2 or att.shape[0] != f.shape[0] or kn.shape != att.shape:
        raise ValueError(f"features [N, K] and attributes [N, A] must share N: got {f.shape}, {att.shape}, "
                         f"known {kn.shape}")
    if len(attribute_names) != att.shape[1]:
        raise ValueError(f"{len(attribute_names)} attribute names for {att.shape[1]} attributes")
    ids = list(range(f.shape[1])) if feature_ids is None else [int(i) for i in feature_ids]
    pos, neg = att & kn, ~att & kn
    rep, members = _attribute_groups(pos, neg)
    pos_g, neg_g = pos[:, rep], neg[:, rep]
    m = alignment_matrix(f, att[:, rep], kn[:, rep])  # [K, G]
    support, against = pos_g.sum(axis=0), neg_g.sum(axis=0)
    eligible = (support >= min_support) & (against >= min_support)
    pool_size = max(POOL, 4 * int(top))
    pools, notes = [], []
    for k in range(f.shape[1]):
        row = m[k]
        if not np.isfinite(row).all():
            pools.append(np.zeros(0, np.int64))
            notes.append("constant on the training images, so it cannot be named")
            continue
        cand = np.flatnonzero(eligible & (row > 0))
        cand = cand[np.argsort(-row[cand], kind="stable")][:pool_size]  # ties: the earlier attribute first
        pools.append(cand)
        if not eligible.any():
            notes.append(f"no attribute has {min_support} training images with it and {min_support} without it "
                         f"(lower --min-support)")
        elif not cand.size:
            notes.append("fires no more on images with any attribute than on images without it")
        else:
            notes.append(None)
    stab = _bootstrap_stability(f, pos_g, neg_g, pools, bootstrap, np.random.default_rng(seed)) if bootstrap else \
        [np.ones(p.size) for p in pools]
    out = []
    for k, (pool, st) in enumerate(zip(pools, stab, strict=True)):
        names: list[str] = []
        sup: list[int] = []
        stb: list[float | None] = []
        ali: list[float] = []
        for j, g in enumerate(pool):
            if bootstrap and st[j] < min_stability:
                if j == 0:
                    break  # the best candidate is not reliably the best: no name rather than a guess
                continue
            if j and m[k, g] < min_relative * m[k, pool[0]]:
                break  # ranked lower, so are all the rest
            for a in members[g][: top - len(names)]:
                names.append(str(attribute_names[a]))
                sup.append(int(support[g]))
                stb.append(round(float(st[j]), 4) if bootstrap else None)
                ali.append(_short(float(m[k, g])))
            if len(names) >= top:
                break
        note = notes[k]
        if not names and note is None:
            best = attribute_names[members[pool[0]][0]]
            note = (f"no stable name: the best candidate {best!r} stays the best in {float(st[0]):.0%} of "
                    f"{bootstrap} resamples (needs {min_stability:.0%})")
        out.append({"feature": ids[k], "column": k, "names": names, "user": False, "support": sup,
                    "stability": stb, "alignment": ali, "note": note})
    return out


def with_user_names(entries: list[dict[str, Any]], user: dict[int, str]) -> list[dict[str, Any]]:
    """Entries with a person's name first (``"user": true``) where ``user`` has one; the computed names follow.
    Idempotent: an entry's earlier person's name is replaced, not stacked."""
    out = []
    for e in entries:
        e = dict(e)
        if e.get("user"):  # drop the previous person's name (always the first)
            for key in ("names", "support", "stability", "alignment"):
                e[key] = list(e[key])[1:]
        name = user.get(int(e["feature"]))
        e["user"] = bool(name)
        if name:
            e["names"] = [name, *e["names"]]
            for key in ("support", "stability", "alignment"):
                e[key] = [None, *e[key]]
        out.append(e)
    return out


# ----------------------------------------------------------------------------------------------- attribute CSV
def _flag(value: str | None, column: str, where: str) -> bool:
    text = (value or "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{where}: {column} must be 1/0, true/false or yes/no, not {value!r}")


def _image_rows(keys: list[str], dataset: Any, test_dataset: Callable[[], Any] | None, train_rows: dict[int, int],
                source: str) -> tuple[dict[str, int], int]:
    """``{image key: train cache row}`` for the CSV's image keys and the number of test-split images (ignored).

    Keys are the train split's dataset indices when every key is an integer, else paths as the dataset lists them
    (:meth:`qpmcli.contracts.Dataset.path`), relative to its root, or bare file names where they are unique.
    """
    if all(k.isdigit() for k in keys):
        bad = [k for k in keys if int(k) >= len(dataset)]
        if bad:
            raise ConfigError(f"{source}: image {bad[0]} is not an index of the {len(dataset)} training images "
                              f"({len(bad)} such image(s)); give 0-based train indices or image paths")
        return {k: train_rows.get(int(k), -1) for k in keys}, 0

    def index(ds: Any) -> dict[str, int]:
        root = getattr(ds, "root", None)
        names: dict[str, list[int]] = {}
        out: dict[str, int] = {}
        for i in range(len(ds)):
            p = str(ds.path(i))
            out[p] = i
            if root is not None and Path(p).is_relative_to(Path(root)):
                out[Path(p).relative_to(Path(root)).as_posix()] = i
            names.setdefault(Path(p).name, []).append(i)
        for name, hits in names.items():
            if len(hits) == 1:
                out.setdefault(name, hits[0])
        return out

    train_index = index(dataset)
    rows = {k: train_rows.get(train_index[k], -1) for k in keys if k in train_index}
    rest = [k for k in keys if k not in rows]
    n_test = 0
    if rest and test_dataset is not None:
        test_index = index(test_dataset())
        n_test = sum(1 for k in rest if k in test_index)
        rest = [k for k in rest if k not in test_index]
    if rest:
        raise ConfigError(f"{source}: {len(rest)} image(s) are not images of the run's dataset, e.g. {rest[0]!r}; "
                          f"use the paths the dataset lists, paths relative to its root, unique file names or 0-based "
                          f"train indices")
    return rows, n_test


def read_attribute_csv(path: str | os.PathLike[str], dataset: Any, train_cache: Any,
                       test_dataset: Callable[[], Any] | None = None) -> ImageAttributes:
    """Attribute labels from a CSV file with the header ``image,attribute,present[,known]`` (one row per image and
    attribute; present/known are 1/0, true/false or yes/no; ``known`` defaults to 1), as an
    :class:`qpmcli.evaluate.ImageAttributes` in the train cache's row order. Pairs the file does not list are
    unknown; rows of test-split images are ignored. Every problem is a :class:`ConfigError` naming the line.

    ``dataset`` is the run's train split (image keys: see :func:`_image_rows`), ``test_dataset`` opens its test split.
    """
    import numpy as np

    from qpmcli.evaluate import ImageAttributes

    p = Path(path).expanduser()
    src = str(p)
    try:
        with open(p, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise ConfigError(f"{src} is empty; expected the header {','.join(CSV_COLUMNS)}")
            cols = [h.strip().lower() for h in header]
            missing = [c for c in CSV_COLUMNS[:3] if c not in cols]
            extra = [h for h in cols if h not in CSV_COLUMNS]
            if missing or extra or len(set(cols)) != len(cols):
                raise ConfigError(f"{src}: the header is {','.join(header)!r}; expected the columns image, attribute, "
                                  f"present and optionally known")
            at = {c: cols.index(c) for c in cols}
            images: list[str] = []
            attrs: list[str] = []
            flags: list[tuple[bool, bool]] = []
            for line, row in enumerate(reader, start=2):
                if not row or all(not v.strip() for v in row):
                    continue
                where = f"{src} line {line}"
                if len(row) != len(cols):
                    raise ConfigError(f"{where} has {len(row)} fields; expected {len(cols)} ({','.join(cols)})")
                image, attr = row[at["image"]].strip(), row[at["attribute"]].strip()
                if not image or not attr:
                    raise ConfigError(f"{where}: image and attribute must not be empty")
                known = _flag(row[at["known"]], "known", where) if "known" in at else True
                flags.append((_flag(row[at["present"]], "present", where), known))
                images.append(image)
                attrs.append(attr)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{src} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise ConfigError(f"{src} is not a readable CSV file: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {src}: {exc.strerror or exc}") from None
    if not images:
        raise ConfigError(f"{src} has a header but no rows")
    names = list(dict.fromkeys(attrs))
    keys = list(dict.fromkeys(images))
    train_rows = {int(i): r for r, i in enumerate(np.asarray(train_cache.indices, dtype=np.int64))}
    rows_of, n_test = _image_rows(keys, dataset, test_dataset, train_rows, src)
    attr_col = {a: i for i, a in enumerate(names)}
    row = np.array([rows_of.get(k, -1) for k in images], dtype=np.int64)
    col = np.array([attr_col[a] for a in attrs], dtype=np.int64)
    value = np.array([2 * pr + kn for pr, kn in flags], dtype=np.int8)  # known bit 1, present bit 2
    keep = row >= 0
    if not keep.any():
        raise ConfigError(f"{src} labels none of the run's {len(train_cache)} training images (it lists "
                          f"{len(keys)} image(s){f', {n_test} of them test images' if n_test else ''})")
    row, col, value = row[keep], col[keep], value[keep]
    cell = row * len(names) + col
    order = np.argsort(cell, kind="stable")
    same = cell[order][1:] == cell[order][:-1]
    clash = same & (value[order][1:] != value[order][:-1])
    if clash.any():
        i = order[1:][clash][0]
        raise ConfigError(f"{src} gives image {images[int(np.flatnonzero(keep)[i])]!r} two different labels for "
                          f"attribute {names[col[i]]!r}")
    present = np.zeros((len(train_cache), len(names)), dtype=bool)
    known = np.zeros_like(present)
    known[row, col] = (value & 1) > 0
    present[row, col] = (value & 2) > 0
    return ImageAttributes(present, known, names, f"attributes {src}")


# ---------------------------------------------------------------------------------------------------- the job
def _document(entries: list[dict[str, Any]], *, meta: Any, weights_sha256: str, source: str | None,
              table: ImageAttributes | None, req: NameRequest, user: dict[int, str]) -> dict[str, Any]:
    from qpmcli.featurenames import FEATURE_NAMES_FORMAT, FEATURE_NAMES_FORMAT_VERSION
    from qpmcli.version import qpm_version

    entries = with_user_names(entries, user)
    return {
        "format": FEATURE_NAMES_FORMAT, "format_version": FEATURE_NAMES_FORMAT_VERSION, "qpm_version": qpm_version(),
        "model": {"features": [int(i) for i in meta.features], "weights_sha256": weights_sha256},
        "source": source, "images": None if table is None else int(table.present.shape[0]),
        "attributes": None if table is None else int(table.present.shape[1]),
        "settings": {"top": req.top, "min_support": req.min_support, "bootstrap": req.bootstrap,
                     "min_stability": req.min_stability, "seed": req.seed},
        "user_names": {str(k): v for k, v in sorted(user.items())},
        "named": sum(1 for e in entries if e["names"]),
        "features": entries,
        "classes": class_features(meta),
    }


def class_features(meta: Any) -> dict[str, list[int]]:
    """``{class name: the dense ids of its features}`` (nonzero weights)."""
    import numpy as np

    return {name: [int(meta.features[k]) for k in np.flatnonzero(meta.weight[c] != 0)]
            for c, name in enumerate(meta.class_names)}


def _check_ids(sets: dict[int, str], features: Sequence[int], run: Path) -> None:
    unknown = sorted(set(sets) - {int(f) for f in features})
    if unknown:
        listed = ", ".join(str(f) for f in list(features)[:12]) + (", ..." if len(features) > 12 else "")
        raise ConfigError(f"--set: feature {unknown[0]} is not a selected feature of {run} (its features: {listed})")


def _edit(req: NameRequest, run: Path, path: Path, old: dict[str, Any]) -> dict[str, Any]:
    """``--set`` on an existing names file: only the names given change (no model, no data)."""
    from qpmcli import artifact
    from qpmcli.featurenames import feature_names_of, weights_fingerprint
    from qpmcli.modelfile import confined

    info = artifact.read_json(run / artifact.MODEL_JSON)
    if not isinstance(info, dict):
        raise ArtifactError(f"{run / artifact.MODEL_JSON} is not a qpm model description")
    weights = confined(run, info.get("weights_file", artifact.MODEL), "model.json weights_file")
    if old["model"].get("weights_sha256") != weights_fingerprint(weights):
        raise ArtifactError(f"{path} names an earlier model of this run (it was retrained since); rerun "
                            f"`qpm name-features {run}` first")
    features = [int(f) for f in old["model"].get("features", [])]
    _check_ids(req.sets, features, run)
    feature_names_of(old, features, str(path))  # the entries are sound before they are rewritten
    user = {int(k): str(v) for k, v in (old.get("user_names") or {}).items()}
    for fid, name in req.sets.items():
        if name:
            user[fid] = name
        else:
            user.pop(fid, None)
    doc = dict(old)
    doc["features"] = with_user_names(old["features"], user)
    doc["user_names"] = {str(k): v for k, v in sorted(user.items())}
    doc["named"] = sum(1 for e in doc["features"] if e["names"])
    return doc


def run_name_features(req: NameRequest, settings: Any, *, progress: bool = True,
                      log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``qpm name-features``: name the selected features of a run and write ``<run>/feature_names.json``.

    With ``req.sets`` and an existing names file (and no ``req.attributes``), only those names change. Otherwise the
    names are computed from the train images' features under the run's final model and the attributes of its dataset
    (or ``req.attributes``); earlier names set by a person are kept. A run whose dataset has no image attributes is
    a :class:`ConfigError` unless only names set by a person are written. Returns the document plus ``path`` and
    ``seconds``.
    """
    from qpmcli import artifact
    from qpmcli.featurenames import read_feature_names_document

    t0 = time.perf_counter()
    say = log or (lambda _m: None)
    req = req.checked()
    run = Path(req.run).expanduser()
    path = run / artifact.FEATURE_NAMES
    old = read_feature_names_document(path) if path.is_file() else None
    if req.sets and req.attributes is None and old is not None:
        doc = _edit(req, run, path, old)
    else:
        doc = _compute(req, settings, run, old, say, progress)
    artifact.atomic_write_json(path, doc)
    return {**doc, "run": str(run), "path": str(path), "seconds": round(time.perf_counter() - t0, 3)}


def _compute(req: NameRequest, settings: Any, run: Path, old: dict[str, Any] | None, say: Callable[[str], None],
             progress: bool) -> dict[str, Any]:
    """Names from the data (or only a person's names when the run has no attributes and ``--set`` was given)."""
    from qpmcli import artifact
    from qpmcli.evaluate import collect_train_features, open_run_caches
    from qpmcli.featurenames import weights_fingerprint
    from qpmcli.modelfile import confined, metadata_from_run
    from qpmcli.progress import progress_bar

    if not (run / artifact.CONFIG).is_file():
        raise ArtifactError(f"{run} is not a run of `qpm train` (no {artifact.CONFIG}); pass a run directory")
    config = artifact.read_json(run / artifact.CONFIG)
    request = config.get("request", {}) if isinstance(config, dict) else {}
    from_data = req.attributes is not None or _dataset_has_attributes(request, settings, bool(req.sets))
    device = req.device or settings.torch_device()
    model, info = artifact.load_model(run, "final", device=device)
    meta = metadata_from_run(model, info)
    _check_ids(req.sets, meta.features, run)
    user = {} if old is None else {int(k): str(v) for k, v in (old.get("user_names") or {}).items()}
    user.update(req.sets)  # "" removes a name
    user = {k: v for k, v in user.items() if v and k in set(meta.features)}
    digest = weights_fingerprint(confined(run, info.get("weights_file", artifact.MODEL), "model.json weights_file"))
    if not from_data:
        say(f"no attribute labels: writing the {len(user)} name(s) you set")
        entries = [{"feature": int(fid), "column": k, "names": [], "user": False, "support": [], "stability": [],
                    "alignment": [], "note": "no attribute labels to name it from"}
                   for k, fid in enumerate(meta.features)]
        return _document(entries, meta=meta, weights_sha256=digest, source=None, table=None, req=req, user=user)
    train_cache, _ = open_run_caches(run, info)
    table = _attributes(req, settings, request, train_cache, meta)
    say(f"naming {meta.n_features} features from {table.source} ({table.present.shape[0]} train images x "
        f"{table.present.shape[1]} attributes, {table.known.mean():.0%} of the labels known)")
    with progress_bar(enabled=progress) as bar:
        feats = collect_train_features(model, train_cache, device=device, batch_size=req.batch_size, progress=bar)
    entries = name_features(feats, table.present, table.known, table.names, feature_ids=meta.features, top=req.top,
                            min_support=req.min_support, bootstrap=req.bootstrap, min_stability=req.min_stability,
                            seed=req.seed)
    return _document(entries, meta=meta, weights_sha256=digest, source=table.source, table=table, req=req, user=user)


def _no_attributes(dataset: str | None, why: str = "") -> ConfigError:
    return ConfigError(f"the run's dataset {dataset or '(none)'} has no per-image attribute labels{why}, so its "
                       f"features cannot be named from data; pass --attributes FILE.csv (columns image, attribute, "
                       f"present[, known]) or name features yourself with --set FEATURE=NAME")


def _dataset_has_attributes(request: dict[str, Any], settings: Any, user_names: bool) -> bool:
    """Whether the run's dataset labels its images with attributes (checked before the model is loaded). Without
    them: ``False`` when the person gives names (``--set``), else the one-line :class:`ConfigError`."""
    from qpmcli.data import load_dataset
    from qpmcli.errors import QpmError

    dataset = request.get("dataset")
    why = ""
    has = False
    if dataset:
        try:
            ds = load_dataset(dataset, root=request.get("data_root"), split="train", settings=settings,
                              **(request.get("dataset_options") or {}))
            has = bool(getattr(ds, "has_image_attributes", False))
        except QpmError as exc:
            why = f" (it cannot be opened: {exc})"
    if not has and not user_names:
        raise _no_attributes(dataset, why)
    return has


def _attributes(req: NameRequest, settings: Any, request: dict[str, Any], train_cache: Any,
                meta: Any) -> ImageAttributes:
    """The attribute table to name from: ``--attributes`` (a CSV), else the run's dataset's own labels."""
    from qpmcli.data import load_dataset
    from qpmcli.evaluate import dataset_attributes

    dataset = request.get("dataset")
    if req.attributes is None:
        _, table, notes = dataset_attributes(dataset, settings, data_root=request.get("data_root"),
                                             dataset_options=request.get("dataset_options"), train_cache=train_cache,
                                             n_classes=meta.n_classes)
        if table is None:
            raise _no_attributes(dataset, f" ({'; '.join(notes)})" if notes else "")
        return table
    if not dataset:
        raise ConfigError("the run's config.json names no dataset, so the CSV's images cannot be matched")

    def open_split(split: str) -> Any:
        return load_dataset(dataset, root=request.get("data_root"), split=split, settings=settings,
                            **(request.get("dataset_options") or {}))

    try:
        train = open_split("train")
    except DatasetError as exc:
        raise DatasetError(f"the run's dataset is needed to match the CSV's images: {exc}") from exc
    return read_attribute_csv(req.attributes, train, train_cache, test_dataset=lambda: open_split("test"))

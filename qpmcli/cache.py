"""The token cache: frozen-backbone outputs of one dataset split, stored once and memory-mapped by training.

Layout, one directory per key (backbone + weights digest, dataset fingerprint, split, preprocessing, image size)::

    <cache_dir>/<dataset>-<split>-<backbone>-<key>/
        tokens.npy     fp16 [N, 1 + h*w, D]: CLS first, then the patch tokens in row-major grid order
        labels.npy     int64 [N]
        masks.npy      bool [N, h, w] (patch-resolution object masks; only when the dataset has masks)
        indices.npy    int64 [N]: the dataset index of every row (rows of skipped images are left out)
        manifest.json  everything the key is made of, plus N, T, D, grid, class names, skipped images

Building happens in ``<dir>.partial/`` chunk by chunk. Chunks are fixed row ranges (``chunk_images`` rows, never
derived from the batch size; batches never cross them) and every finished chunk leaves a marker naming the rows it
covers and the SHA-256 of what was written, so a rerun after a kill continues where it stopped (with any batch size
or worker count; a marker that does not describe its chunk is redone) and with the same batch size produces a
byte-identical cache. The manifest keeps those per-chunk records: opening a cache checks that they tile every row and
probes the first and last row of each chunk (cheap), :meth:`TokenCache.verify` (``qpm extract --verify``) rehashes
everything. A file lock (``<dir>.lock``) keeps two processes
from building one cache at once (the second waits, then opens the finished cache). The directory is finalised by an
atomic rename. Under ``torchrun`` every rank extracts a disjoint, contiguous range of chunks into one partial cache.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qpmcli.artifact import atomic_path, atomic_write_text
from qpmcli.errors import CacheError, ImageError
from qpmcli.files import check_free_space, clean_stale_temps, reserve

FORMAT_VERSION = 2  # 2: per-chunk records (row ranges + SHA-256) in the manifest
CHUNK_IMAGES = 256  # rows per resumable chunk, whatever the batch size
SPLITS = ("train", "test")


# ---------------------------------------------------------------------------------------------------- reading
@dataclass
class TokenCache:
    """An opened, finished cache. ``tokens`` is a read-only fp16 memmap ``[N, 1 + h*w, D]`` (CLS first)."""

    path: Path
    tokens: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None
    indices: np.ndarray
    manifest: dict[str, Any]

    @property
    def grid(self) -> tuple[int, int]:
        g = self.manifest["grid"]
        return (int(g[0]), int(g[1]))

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("classes") or [])

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @classmethod
    def open(cls, path: str | Path, expect: dict[str, Any] | None = None) -> TokenCache:
        """Open a finished cache; with ``expect`` (key fields), refuse one built with other settings."""
        path = Path(path)
        mf = path / "manifest.json"
        if not mf.is_file():
            raise CacheError(f"{path} is not a finished token cache (no manifest.json); rerun qpm extract")
        try:
            manifest = json.loads(mf.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise CacheError(f"token cache {path} has an unreadable manifest.json ({exc}); delete it and rerun "
                             f"qpm extract") from exc
        if not isinstance(manifest, dict):
            raise CacheError(f"token cache {path} has a malformed manifest.json; delete it and rerun qpm extract")
        if manifest.get("format") != FORMAT_VERSION:
            raise CacheError(f"token cache {path} has format {manifest.get('format')}, expected {FORMAT_VERSION}; "
                             f"delete it and rerun qpm extract")
        if expect is not None:
            _check_key(manifest.get("key_fields", {}), expect, path)
        try:  # never pickle; a truncated or foreign file is our error, not numpy's
            tokens = np.load(path / "tokens.npy", mmap_mode="r", allow_pickle=False)
            labels = np.load(path / "labels.npy", allow_pickle=False)
            masks = np.load(path / "masks.npy", allow_pickle=False) if (path / "masks.npy").is_file() else None
            indices = np.load(path / "indices.npy", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise CacheError(f"token cache {path} is damaged ({exc}); delete it and rerun qpm extract") from exc
        if tokens.ndim != 3 or labels.shape != (tokens.shape[0],) or indices.shape != (tokens.shape[0],):
            raise CacheError(f"token cache {path} is inconsistent (tokens {tokens.shape}, labels {labels.shape}, "
                             f"indices {indices.shape}); delete it and rerun qpm extract")
        if tokens.shape[0] != manifest.get("n") or labels.shape[0] != manifest.get("n"):
            raise CacheError(f"token cache {path} is inconsistent (rows {tokens.shape[0]} vs manifest "
                             f"{manifest.get('n')}); delete it and rerun qpm extract")
        _check_chunks(path, manifest.get("chunks"), tokens, labels, masks, full=False)
        return cls(path, tokens, labels, masks, indices, manifest)

    def verify(self) -> int:
        """Rehash every row against the per-chunk SHA-256 records; returns the number of chunks checked."""
        return _check_chunks(self.path, self.manifest.get("chunks"), self.tokens, self.labels, self.masks, full=True)


def _chunk_digests(tokens: np.ndarray, labels: np.ndarray, masks: np.ndarray | None, a: int, b: int,
                   full: bool) -> dict[str, str]:
    """The record of rows ``a..b-1``: ``probe`` (first + last token row and all labels) and, with ``full``, the
    SHA-256 of every token, label and mask byte."""
    probe = hashlib.sha256()
    if b > a:
        probe.update(np.ascontiguousarray(tokens[a]).tobytes())
        probe.update(np.ascontiguousarray(tokens[b - 1]).tobytes())
        probe.update(np.ascontiguousarray(labels[a:b]).tobytes())
    out = {"probe": probe.hexdigest()}
    if full:
        h = hashlib.sha256()
        step = max(1, (64 << 20) // max(1, tokens[0].nbytes if len(tokens) else 1))
        for s in range(a, b, step):
            h.update(np.ascontiguousarray(tokens[s:min(b, s + step)]).tobytes())
        out["tokens"] = h.hexdigest()
        out["labels"] = hashlib.sha256(np.ascontiguousarray(labels[a:b]).tobytes()).hexdigest()
        if masks is not None:
            out["masks"] = hashlib.sha256(np.ascontiguousarray(masks[a:b]).tobytes()).hexdigest()
    return out


def _check_chunks(path: Path, chunks: Any, tokens: np.ndarray, labels: np.ndarray, masks: np.ndarray | None,
                  full: bool) -> int:
    """The per-chunk records must tile the rows ``0..n-1``; each chunk's probe (or, with ``full``, every hash) must
    match what is on disk. Any mismatch is a :class:`CacheError` naming the chunk and its rows."""
    n = int(tokens.shape[0])
    fix = "; delete it and rerun qpm extract"
    if not isinstance(chunks, list):
        raise CacheError(f"token cache {path} has no per-chunk records{fix}")
    row = 0
    for c, rec in enumerate(chunks):
        try:
            a, b = int(rec["rows"][0]), int(rec["rows"][1])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CacheError(f"token cache {path}: chunk {c} has a malformed record{fix}") from exc
        if a != row or b < a or b > n:
            raise CacheError(f"token cache {path}: chunk {c} covers rows {a}..{b - 1}, expected to start at row "
                             f"{row} (of {n}){fix}")
        got = _chunk_digests(tokens, labels, masks, a, b, full)
        for key, value in got.items():
            if rec.get(key) != value:
                what = "was not completely written" if key == "probe" else f"has changed ({key} hash differs)"
                raise CacheError(f"token cache {path}: chunk {c} (rows {a}..{b - 1}) {what}{fix}")
        row = b
    if row != n:
        raise CacheError(f"token cache {path}: its chunks cover rows 0..{row - 1} of {n}{fix}")
    return len(chunks)


def _check_key(found: dict[str, Any], expect: dict[str, Any], path: Path) -> None:
    diffs = [k for k in sorted(set(found) | set(expect)) if found.get(k) != expect.get(k)]
    if diffs:
        raise CacheError(f"cache {path} was built with other settings ({', '.join(diffs)} differ); "
                         f"delete it or use another cache_dir")


# ------------------------------------------------------------------------------------------------------ keys
def cache_key_fields(backbone: Any, dataset: Any, split: str) -> dict[str, Any]:
    """What identifies a cache: backbone (name, weights digest, architecture), dataset, split, preprocessing, size."""
    info = getattr(backbone, "info", {}) or {}
    return {
        "format": FORMAT_VERSION,
        "backbone": backbone.name,
        "weights_digest": backbone.weights_digest,
        "arch": info.get("arch") or {},
        "dataset": _jsonable(dataset.fingerprint()),
        "split": split,
        "preprocess": _jsonable(backbone.preprocess_config),
        "image_size": list(backbone.image_size),
        "grid": list(backbone.grid),
        "embed_dim": int(backbone.embed_dim),
    }


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def cache_digest(fields: dict[str, Any]) -> str:
    """The cache's fingerprint: ``sha256`` of its key fields (:func:`cache_key_fields`), 16 hex digits. A run records
    the fingerprints of its caches (``config.json`` ``cache_keys``) so that ``qpm evaluate`` can check them."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(cache_dir: str | Path, fields: dict[str, Any]) -> Path:
    """``<cache_dir>/<dataset>-<split>-<backbone>-<cache_digest(fields)>``."""
    digest = cache_digest(fields)
    ds = fields["dataset"].get("name", "dataset") if isinstance(fields["dataset"], dict) else "dataset"
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{ds}-{fields['split']}-{fields['backbone']}")
    return Path(cache_dir).expanduser() / f"{label}-{digest}"


# ------------------------------------------------------------------------------------------------------ lock
class CacheLock:
    """An exclusive ``flock`` on ``<cache>.lock``: waits up to ``timeout`` seconds, then raises :class:`CacheError`."""

    def __init__(self, path: Path, timeout: float | None = None, on_wait=None) -> None:
        self.path = path
        self.timeout = timeout
        self.on_wait = on_wait
        self._fh = None

    def __enter__(self) -> CacheLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+")
        start = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                if self._current():
                    return self
                self._fh.close()  # the holder removed the file when it let go: lock the file that is there now
                self._fh = open(self.path, "a+")
                continue
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if self.timeout is not None and time.monotonic() - start >= self.timeout:
                self._fh.close()
                raise CacheError(f"token cache {self.path.with_suffix('')} is being built by another process "
                                 f"(lock {self.path} held for over {self.timeout:g} s); wait for it or rerun later")
            if not told and self.on_wait is not None:
                self.on_wait(self.path)
                told = True
            time.sleep(0.2)

    def _current(self) -> bool:
        try:
            return os.fstat(self._fh.fileno()).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def __exit__(self, *exc: Any) -> None:
        if self._fh is not None:
            built = self.path.with_suffix("")
            if not built.exists() and not built.with_name(built.name + ".partial").exists():
                self.path.unlink(missing_ok=True)  # nothing was made (the build failed up front): no stray lock file
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


# ------------------------------------------------------------------------------------------------ data loading
class _Images:
    """torch Dataset over dataset indices: decoded, preprocessed images (+ patch masks); errors come back as text."""

    def __init__(self, dataset: Any, preprocess_config: dict[str, Any], grid: tuple[int, int], masks: bool) -> None:
        self.dataset = dataset
        self.config = preprocess_config
        self.grid = grid
        self.masks = masks

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        import torch

        from qpmcli.backbone import preprocess_image

        h, w = self.config["size"]
        from qpmcli.images import MIN_TRAIN_SIDE, too_small

        try:
            sample = self.dataset[index]
            size = getattr(sample.image, "size", None)
            if size is not None and min(size) < MIN_TRAIN_SIDE:  # 1xN, Nx1: refused before any training
                raise too_small(_sample_path(self.dataset, index), *size)
            x = preprocess_image(sample.image, self.config)
            label = int(sample.label)
            if self.masks and sample.mask is not None:
                from qpmcli.masks import patch_mask

                m = torch.from_numpy(np.ascontiguousarray(patch_mask(sample.mask, self.grid), dtype=bool))
            else:
                m = torch.zeros(self.grid, dtype=torch.bool)
            return index, x, label, m, ""
        except (ImageError, OSError, ValueError, SyntaxError) as exc:
            where = getattr(exc, "filename", None) or _sample_path(self.dataset, index)
            msg = str(exc) if isinstance(exc, ImageError) else f"cannot read image {where}: {exc}"
            return index, torch.zeros(3, h, w), -1, torch.zeros(self.grid, dtype=torch.bool), msg.replace("\n", " ")


def _sample_path(dataset: Any, index: int) -> str:
    for attr in ("path", "image_path"):
        fn = getattr(dataset, attr, None)
        if callable(fn):
            try:
                return str(fn(index))
            except Exception:  # noqa: BLE001 - only used to name a file in a message
                pass
    return f"item {index} of {getattr(dataset, 'name', 'dataset')}"


def _collate(items):
    import torch

    idx = torch.tensor([it[0] for it in items], dtype=torch.long)
    x = torch.stack([it[1] for it in items])
    y = torch.tensor([it[2] for it in items], dtype=torch.long)
    m = torch.stack([it[3] for it in items])
    return idx, x, y, m, [it[4] for it in items]


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)  # decoding workers must not fight the backbone for cores


class _ChunkBatches:
    """Batch sampler: batches never cross chunk boundaries, so a resumed run forms exactly the same batches."""

    def __init__(self, chunks: list[tuple[int, int]], batch_size: int) -> None:
        self.batches = [list(range(s, min(s + batch_size, e))) for a, e in chunks for s in range(a, e, batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# ------------------------------------------------------------------------------------------------------ build
def build_cache(
    backbone: Any,
    dataset: Any,
    split: str,
    cache_dir: str | Path,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    skip_bad: bool = False,
    progress: bool = True,
    lock_timeout: float | None = None,
    chunk_images: int = CHUNK_IMAGES,
) -> TokenCache:
    """Extract ``dataset`` with ``backbone`` into the cache for this key (or open it if it exists already).

    Resumable (finished chunks are kept), locked against concurrent builders, finalised atomically. A corrupt image
    is a :class:`ImageError` naming the file unless ``skip_bad`` (then it is left out and listed in the manifest).
    """
    fields = cache_key_fields(backbone, dataset, split)
    final = cache_path(cache_dir, fields)
    if (final / "manifest.json").is_file():
        return TokenCache.open(final, expect=fields)
    from qpmcli.distributed import init_distributed

    dist = init_distributed()  # joins the torchrun process group when launched by it
    partial = final.with_name(final.name + ".partial")
    n = len(dataset)
    if n == 0:
        raise CacheError(f"dataset {getattr(dataset, 'name', '')} split {split} is empty; nothing to extract")
    bs = max(1, int(batch_size))
    chunk = max(1, int(chunk_images))  # fixed rows per chunk: a resume with another batch size keeps the same chunks
    grid = tuple(backbone.grid)
    t = 1 + grid[0] * grid[1]
    d = int(backbone.embed_dim)
    has_masks = bool(getattr(dataset, "has_masks", False))

    lock = CacheLock(final.with_name(final.name + ".lock"), timeout=lock_timeout,
                     on_wait=(lambda p: _say(f"waiting for another process building {final.name} ...")) if progress
                     else None)
    held = None
    if dist.rank == 0:
        held = lock.__enter__()
    try:
        state = "build"
        if dist.rank == 0:
            if (final / "manifest.json").is_file():
                state = "done"
            else:  # an unfinished build keeps the chunking it started with
                chunk = _prepare_partial(partial, fields, n, t, d, grid, has_masks, chunk)
                clean_stale_temps([partial, partial / "done"])  # half-written markers of a killed build
        state, chunk = dist.broadcast((state, chunk))
        chunks = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
        if state == "done":
            dist.barrier()
            return TokenCache.open(final, expect=fields)
        dist.barrier()
        # every rank: a disjoint, contiguous range of chunks
        per = (len(chunks) + dist.world - 1) // dist.world
        mine = list(range(dist.rank * per, min(len(chunks), (dist.rank + 1) * per)))
        done_dir = partial / "done"
        todo = [c for c in mine if not _chunk_done(done_dir, c, chunks[c])]
        try:
            _extract_chunks(backbone, dataset, partial, chunks, todo, bs, num_workers, skip_bad, grid, has_masks,
                            progress and dist.rank == 0, sum(chunks[c][1] - chunks[c][0] for c in mine), split)
        except (ImageError, CacheError):
            if dist.world == 1 and not any(done_dir.iterdir()):  # nothing finished: leave no partial cache behind
                shutil.rmtree(partial, ignore_errors=True)
            raise
        dist.barrier()
        if dist.rank == 0:
            _finalise(partial, final, fields, chunks, dataset, backbone, split)
        dist.barrier()
        return TokenCache.open(final, expect=fields)
    finally:
        if held is not None:
            lock.__exit__(None, None, None)


def _say(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(msg)


def _chunk_done(done_dir: Path, c: int, rows: tuple[int, int]) -> bool:
    """Whether chunk ``c``'s marker exists and describes exactly ``rows`` (else the chunk is extracted again)."""
    f = done_dir / f"{c:06d}.json"
    if not f.is_file():
        return False
    try:
        rec = json.loads(f.read_text())
        ok = (rec.get("chunk"), rec.get("start"), rec.get("stop")) == (c, rows[0], rows[1]) and "tokens" in rec
    except (OSError, ValueError, AttributeError, RecursionError):
        ok = False
    if not ok:
        f.unlink(missing_ok=True)
    return ok


def _prepare_partial(partial: Path, fields: dict[str, Any], n: int, t: int, d: int, grid: tuple[int, int],
                     has_masks: bool, chunk: int) -> int:
    """Create the partial directory with preallocated arrays, or check that an existing one is for this key.
    Returns the rows per chunk: ``chunk`` for a new build, the recorded one for an unfinished build."""
    intent = {"key_fields": fields, "n": n, "t": t, "d": d, "has_masks": has_masks}
    marker = partial / "build.json"
    if marker.is_file():
        try:
            old = json.loads(marker.read_text())
            started = int(old.pop("chunk"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            old, started = None, 0
        if old != _jsonable(intent) or started < 1:
            raise CacheError(f"unfinished cache {partial} was started with other settings; delete it and rerun")
        return started
    if partial.exists():
        shutil.rmtree(partial)  # no build.json: it died while being created; nothing to keep
    arrays = [("tokens.npy", np.float16, (n, t, d)), ("labels.npy", np.int64, (n,))]
    if has_masks:
        arrays.append(("masks.npy", np.bool_, (n, *grid)))
    check_free_space(partial.parent, sum(int(np.prod(shape)) * np.dtype(dt).itemsize for _, dt, shape in arrays),
                     "the token cache", error=CacheError,
                     fix="free space or set cache_dir (QPM_CACHE_DIR) to a larger disk")
    try:
        partial.mkdir(parents=True)
        (partial / "done").mkdir()
        for name, dtype, shape in arrays:
            np.lib.format.open_memmap(partial / name, mode="w+", dtype=dtype, shape=shape).flush()
            reserve(partial / name)
        atomic_write_text(marker, json.dumps({**intent, "chunk": chunk}, sort_keys=True))
    except OSError as exc:  # the disk filled up while the arrays were reserved: leave nothing half made
        shutil.rmtree(partial, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheError(f"no space left for the token cache in {partial.parent} ({exc.strerror}); free space or "
                             f"set cache_dir (QPM_CACHE_DIR) to a larger disk; nothing was written") from None
        raise
    return chunk


def _extract_chunks(backbone, dataset, partial: Path, chunks, todo: list[int], bs: int, num_workers: int,
                    skip_bad: bool, grid, has_masks: bool, progress: bool, total: int, split: str) -> None:
    """Extract the chunks ``todo`` into the partial cache (its arrays reserved on disk first)."""
    if not todo:
        return
    try:
        for name in ("tokens.npy", "labels.npy", "masks.npy"):  # a partial cache of an older qpm may be sparse
            if (partial / name).is_file():
                reserve(partial / name)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheError(f"no space left to continue the token cache {partial} ({exc.strerror}); free space and "
                             f"rerun (finished chunks are kept)") from None
        raise
    try:
        _extract_into(backbone, dataset, partial, chunks, todo, bs, num_workers, skip_bad, grid, has_masks,
                      progress, total, split)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheError(f"no space left while writing the token cache {partial} ({exc.strerror}); free space "
                             f"and rerun (finished chunks are kept)") from None
        raise


def _extract_into(backbone, dataset, partial: Path, chunks, todo: list[int], bs: int, num_workers: int,
                  skip_bad: bool, grid, has_masks: bool, progress: bool, total: int, split: str) -> None:
    import torch
    from torch.utils.data import DataLoader

    tokens = np.load(partial / "tokens.npy", mmap_mode="r+")
    labels = np.load(partial / "labels.npy", mmap_mode="r+")
    masks = np.load(partial / "masks.npy", mmap_mode="r+") if has_masks else None
    loader = DataLoader(
        _Images(dataset, backbone.preprocess_config, grid, has_masks), batch_sampler=_ChunkBatches(
            [chunks[c] for c in todo], bs), num_workers=num_workers, collate_fn=_collate,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        pin_memory=backbone.device.type == "cuda", persistent_workers=False)
    ends = {chunks[c][1]: c for c in todo}
    starts = {chunks[c][0]: c for c in todo}
    record: _ChunkRecord | None = None
    skipped: list[dict[str, Any]] = []
    from qpmcli.progress import progress_bar

    with progress_bar(enabled=progress, transient=False, rate="img/s") as bar:
        already = total - sum(chunks[c][1] - chunks[c][0] for c in todo)
        task = bar.add_task(f"extract {getattr(dataset, 'name', '')}/{split}", total=total, completed=already)
        for idx, x, y, m, errs in loader:
            bad = [i for i, e in enumerate(errs) if e]
            if bad and not skip_bad:
                raise ImageError(f"{errs[bad[0]]} (rerun with --skip-bad to leave bad images out)")
            for i in bad:
                skipped.append({"index": int(idx[i]), "path": _sample_path(dataset, int(idx[i])), "error": errs[i]})
            cls, patches = backbone(x)
            out = torch.cat([cls[:, None], patches], dim=1).to(torch.float16).cpu().numpy()
            a, b = int(idx[0]), int(idx[-1]) + 1
            if a in starts:
                record = _ChunkRecord(masks is not None)
            tokens[a:b] = out
            labels[a:b] = y.numpy()
            if masks is not None:
                masks[a:b] = m.numpy()
            kept = [i for i in range(b - a) if not errs[i]]
            record.add(out[kept], y.numpy()[kept], None if masks is None else m.numpy()[kept])
            bar.update(task, advance=b - a)
            if b in ends:  # chunk finished: flush, then leave its marker
                tokens.flush()
                labels.flush()
                if masks is not None:
                    masks.flush()
                c = ends[b]
                mine = [s for s in skipped if chunks[c][0] <= s["index"] < chunks[c][1]]
                atomic_write_text(partial / "done" / f"{c:06d}.json",
                              json.dumps({"chunk": c, "start": chunks[c][0], "stop": chunks[c][1], "skipped": mine,
                                          **record.digests()}))
    del tokens, labels, masks


class _ChunkRecord:
    """SHA-256 of the rows of one chunk as they were written (skipped images left out, so the hashes describe the
    finished cache's rows): the same record :func:`_chunk_digests` computes from the files."""

    def __init__(self, has_masks: bool) -> None:
        self.rows = 0
        self.tokens, self.labels = hashlib.sha256(), hashlib.sha256()
        self.masks = hashlib.sha256() if has_masks else None
        self.first = self.last = b""
        self.label_bytes: list[bytes] = []

    def add(self, tokens: np.ndarray, labels: np.ndarray, masks: np.ndarray | None) -> None:
        if len(tokens) == 0:
            return
        tokens = np.ascontiguousarray(tokens, dtype=np.float16)
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        if self.rows == 0:
            self.first = tokens[0].tobytes()
        self.last = tokens[-1].tobytes()
        self.rows += len(tokens)
        self.tokens.update(tokens.tobytes())
        self.labels.update(labels.tobytes())
        self.label_bytes.append(labels.tobytes())
        if self.masks is not None and masks is not None:
            self.masks.update(np.ascontiguousarray(masks, dtype=np.bool_).tobytes())

    def digests(self) -> dict[str, Any]:
        probe = hashlib.sha256()
        if self.rows:
            probe.update(self.first + self.last + b"".join(self.label_bytes))
        out = {"rows": self.rows, "probe": probe.hexdigest(), "tokens": self.tokens.hexdigest(),
               "labels": self.labels.hexdigest()}
        if self.masks is not None:
            out["masks"] = self.masks.hexdigest()
        return out


def _finalise(partial: Path, final: Path, fields: dict[str, Any], chunks, dataset, backbone, split: str) -> None:
    """Check every chunk is done, drop skipped rows, write indices + manifest, rename atomically."""
    done = partial / "done"
    skipped: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    row = 0
    for c in range(len(chunks)):
        f = done / f"{c:06d}.json"
        if not _chunk_done(done, c, chunks[c]):
            raise CacheError(f"cache {partial} is missing chunk {c}; rerun the extraction to finish it")
        rec = json.loads(f.read_text())
        skipped.extend(rec["skipped"])
        records.append({"chunk": c, "start": rec["start"], "stop": rec["stop"], "rows": [row, row + rec["rows"]],
                        **{k: rec[k] for k in ("probe", "tokens", "labels", "masks") if k in rec}})
        row += rec["rows"]
    n = chunks[-1][1]
    bad = sorted(s["index"] for s in skipped)
    keep = np.setdiff1d(np.arange(n, dtype=np.int64), np.asarray(bad, dtype=np.int64))
    if bad:
        if keep.size == 0:
            raise CacheError(f"every image of {getattr(dataset, 'name', '')}/{split} failed to load; nothing cached")
        _compact(partial, keep)
    np.save(partial / "indices.npy", keep)
    tokens = np.load(partial / "tokens.npy", mmap_mode="r")
    labels = np.load(partial / "labels.npy", mmap_mode="r")
    _check_chunks(partial, records, tokens, labels, None, full=False)  # every row written before it is published
    del labels
    manifest = {
        "format": FORMAT_VERSION,
        "key_fields": fields,
        "backbone": backbone.describe() if hasattr(backbone, "describe") else {"name": backbone.name},
        "weights_digest": backbone.weights_digest,
        "dataset": fields["dataset"],
        "split": split,
        "preprocess": fields["preprocess"],
        "image_size": fields["image_size"],
        "grid": fields["grid"],
        "n": int(tokens.shape[0]),
        "t": int(tokens.shape[1]),
        "d": int(tokens.shape[2]),
        "dtype": "float16",
        "layout": "cls_first",
        "classes": list(getattr(dataset, "classes", []) or []),
        "has_masks": (partial / "masks.npy").is_file(),
        "skipped": skipped,
        "chunks": records,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    del tokens
    atomic_write_text(partial / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
    shutil.rmtree(done)
    (partial / "build.json").unlink()
    os.replace(partial, final)


def _compact(partial: Path, keep: np.ndarray) -> None:
    """Rewrite the arrays without the rows of skipped images (streamed, so big caches stay out of RAM)."""
    for name in ("tokens.npy", "labels.npy", "masks.npy"):
        src_path = partial / name
        if not src_path.is_file():
            continue
        src = np.load(src_path, mmap_mode="r")
        with atomic_path(src_path) as tmp:
            dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=src.dtype, shape=(keep.size, *src.shape[1:]))
            reserve(tmp)
            for s in range(0, keep.size, 1024):
                dst[s:s + 1024] = src[keep[s:s + 1024]]
            dst.flush()
            del src, dst


# -------------------------------------------------------------------------------------------------- front door
def ensure_cache(
    backbone: str,
    dataset: str,
    split: str,
    settings: Any,
    *,
    weights: str | None = None,
    preprocess: str = "official",
    data_root: str | Path | None = None,
    dataset_options: dict[str, Any] | None = None,
    progress: bool = True,
    backbone_obj: Any = None,
    dataset_obj: Any = None,
    batch_size: int = 32,
    skip_bad: bool = False,
    image_size: int | None = None,
    amp: bool = False,
    lock_timeout: float | None = None,
) -> TokenCache:
    """Open the token cache of (backbone, dataset, split), building it (resumably) when missing.

    ``backbone_obj``/``dataset_obj`` reuse already built objects (then the names only label the cache).
    """
    if split not in SPLITS:
        raise CacheError(f"unknown split {split!r}; use train or test")
    if dataset_obj is None:
        from qpmcli.data import load_dataset

        dataset_obj = load_dataset(dataset, root=data_root, split=split, settings=settings,
                                   **(dataset_options or {}))
    if backbone_obj is None:
        backbone_obj = backbone_for_cache(backbone, settings, weights=weights, preprocess=preprocess,
                                          dataset=dataset, image_size=image_size, amp=amp)
    return build_cache(backbone_obj, dataset_obj, split, settings.cache_dir, batch_size=batch_size,
                       num_workers=settings.num_workers, skip_bad=skip_bad, progress=progress,
                       lock_timeout=lock_timeout)


def backbone_for_cache(backbone: str, settings: Any, *, weights: str | None = None, preprocess: str = "official",
                       dataset: str | None = None, image_size: int | None = None, amp: bool = False) -> Any:
    """Load a backbone for extraction; under ``torchrun`` with CUDA each rank takes ``cuda:LOCAL_RANK``."""
    from qpmcli.backbone import load_backbone

    opts: dict[str, Any] = {"amp": amp, "dataset": dataset}
    if image_size is not None:
        opts["image_size"] = image_size
    from qpmcli.distributed import local_device

    device = local_device(settings.torch_device())
    return load_backbone(backbone, weights=weights, preprocess=preprocess, settings=settings, device=device, **opts)

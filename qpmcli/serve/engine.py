"""The serving engine: one exported model in ONNX Runtime, its explorer facts, upload decoding, micro-batching.

Nothing here imports torch: the model is the exported ``.onnx`` file (its metadata carries class names, W, mu, sigma,
preprocessing and the training prototypes), run by ONNX Runtime in one session.

Micro-batching (:class:`MicroBatcher`): requests hand their upload to one worker thread, which decodes every upload
that is queued when it picks up work (waiting up to ``window`` seconds for more only while other requests are about
to submit, so a lone request never waits), then the ones that arrived during that decoding, and runs the session
once on all of them, up to ``max_batch`` images per call.
"""

from __future__ import annotations

import io
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpmcli.artifact import ONNX_MODEL, SELECTION, read_json
from qpmcli.errors import ArtifactError, ConfigError
from qpmcli.evidence import HEAT_CMAP
from qpmcli.serve.facts import ModelFacts, run_of

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

DEFAULT_MAX_UPLOAD = 20 << 20  # bytes
DEFAULT_MAX_PIXELS = 40_000_000  # decoded pixels; larger images are refused before decoding (decompression bombs)
DEFAULT_MAX_BATCH = 16
DEFAULT_WINDOW = 0.004  # seconds
HEATMAP_SIDE = 256  # longest side of the heatmap PNGs (aspect of the upload kept)
METRIC_COLUMNS = [  # the paper's table columns (metric key, header)
    ("Accuracy", "Accuracy"), ("Plausibility", "Plausibility"), ("SID@5", "SID@5"),
    ("Class-Independence", "Class-Indep."), ("Contrastiveness", "Contrastiveness"),
    ("Structural-Grounding", "Struct. Grounding")]


class UploadError(Exception):
    """A bad upload: ``status`` is the HTTP status to answer (4xx), the message says what is wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------- model location
def resolve_model_path(model: str | os.PathLike[str] | None, settings: Any = None) -> Path:
    """The ``.onnx`` file to serve: the file itself, a run directory's export, or (no MODEL) the ``model`` setting /
    the current run's export (:mod:`qpmcli.current`). A run without an export and an adapter-only graph are
    :class:`ArtifactError` naming the command that fixes it."""
    from qpmcli.current import resolve_model

    if settings is None:
        from qpmcli.settings import resolve_settings

        settings, _ = resolve_settings()
    resolved = resolve_model(settings, str(model) if model is not None else None, prefer_onnx=True, given_as="MODEL")
    path = resolved.path
    if path.is_dir():
        onnx = path / ONNX_MODEL  # served even when older than the run's model (the overview shows what it serves)
        if not onnx.is_file():
            raise ArtifactError(f"run directory {path} has no exported model; run `qpm export {path} --onnx` first "
                                f"(qpm serve runs the ONNX graph with ONNX Runtime, without PyTorch)")
        return onnx
    if path.is_file():
        if path.suffix.lower() != ".onnx":
            raise ArtifactError(f"{path} is neither a run directory nor an .onnx file")
        if path.name.endswith(".adapter.onnx"):
            raise ArtifactError(f"{path} is an adapter-only graph (tokens in) and needs the backbone in PyTorch; "
                                f"serve the full graph {path.name.replace('.adapter.onnx', '.onnx')}")
        return path
    raise ArtifactError(f"model {path} does not exist; pass a run directory or an .onnx file from `qpm export`")


# ----------------------------------------------------------------------------------------------- uploads
def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Any:
    """Upload bytes -> RGB PIL image, or :class:`UploadError`: empty/non-image 415 (400 when empty), more than
    ``max_pixels`` pixels 413 (checked from the header, before decoding), truncated or corrupt 400."""
    from PIL import Image, UnidentifiedImageError

    from qpmcli.images import to_rgb

    if not data:
        raise UploadError(400, "the upload is empty; send an image file in the form field 'file'")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UploadError(413, f"the image has too many pixels to decode safely ({exc})") from exc
    except (UnidentifiedImageError, SyntaxError, ValueError, OSError) as exc:
        raise UploadError(415, "the upload is not an image format that can be read (PNG, JPEG, WebP, GIF, BMP, "
                               "TIFF, ...)") from exc
    w, h = im.size
    if w * h > max_pixels:
        raise UploadError(413, f"the image is {w}x{h} pixels ({w * h / 1e6:.0f} MP); the limit is "
                               f"{max_pixels / 1e6:.0f} MP")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
            return to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UploadError(413, f"the image has too many pixels to decode safely ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UploadError(400, f"the image cannot be decoded (truncated or corrupt): {exc}") from exc


# ------------------------------------------------------------------------------------------------ batching
@dataclass
class _Item:
    x: Any
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.perf_counter)


@dataclass
class Timing:
    """Where one request's seconds went in the worker: waiting in the queue (``queue``), decoding and preprocessing
    its upload (``decode``), the ONNX Runtime call it shared with ``batch - 1`` others (``infer``)."""

    queue: float = 0.0
    decode: float = 0.0
    infer: float = 0.0
    batch: int = 1


class MicroBatcher:
    """One worker thread that runs ``run_fn(batch [B, ...]) -> {name: [B, ...]}`` on queued single images.

    With ``prepare_fn(item) -> (x, info)`` the queued items are raw (upload bytes) and the worker prepares them
    itself right before the session call; a future then resolves to ``(outputs, info, timing)`` (:class:`Timing`).
    Decoding in the worker keeps it from competing with the session's own threads for the cores (oversubscription
    made concurrent requests slower than sequential ones on 2 cores), and lets requests queue up, and batch, while
    the session runs. Requests that arrive while a batch decodes join it: with 8 clients, the 4 answered by one call
    otherwise came back while the other 4 ran, and the two halves alternated in calls of 4.
    """

    def __init__(self, run_fn: Callable[[Any], dict[str, Any]], *, max_batch: int = DEFAULT_MAX_BATCH,
                 window: float = DEFAULT_WINDOW, prepare_fn: Callable[[Any], tuple[Any, Any]] | None = None) -> None:
        if max_batch < 1:
            raise ConfigError(f"the batch cap must be at least 1, not {max_batch}")
        if window < 0:
            raise ConfigError(f"the batching window must be >= 0 ms, not {window * 1e3:g}")
        self.run_fn = run_fn
        self.prepare_fn = prepare_fn
        self.max_batch = int(max_batch)
        self.window = float(window)
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._lock = threading.Lock()
        self._incoming = 0  # requests that are decoding/preprocessing and will submit soon
        self.requests = 0
        self.batches = 0
        self.largest_batch = 0
        self.busy = 0.0  # seconds the worker spent preparing and running batches
        self._thread = threading.Thread(target=self._loop, name="qpm-serve-batcher", daemon=True)
        self._thread.start()

    @contextmanager
    def incoming(self) -> Iterator[Callable[[Any], Future]]:
        """Announce a request that will submit an image; yields ``submit(x) -> Future``. While announced requests
        are outstanding, the worker may wait (up to the window) to batch them with queued ones."""
        with self._lock:
            self._incoming += 1
        done = False

        def submit(x: Any) -> Future:
            nonlocal done
            item = _Item(x)
            with self._lock:
                if not done:
                    done = True
                    self._incoming -= 1
                self.requests += 1
            self._queue.put(item)
            return item.future

        try:
            yield submit
        finally:
            with self._lock:
                if not done:
                    done = True
                    self._incoming -= 1

    def submit(self, x: Any) -> Future:
        with self.incoming() as submit:
            return submit(x)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": self.requests, "batches": self.batches, "largest_batch": self.largest_batch,
                    "max_batch": self.max_batch, "window_ms": self.window * 1e3, "busy_s": round(self.busy, 3)}

    def _collect(self, batch: list[_Item], limit: int, deadline: float) -> bool:
        """Add queued items to ``batch`` until it holds ``limit``, waiting until ``deadline`` only while announced
        requests are outstanding. Returns False when the stop sentinel was seen (it is put back for the next pickup).
        """
        while len(batch) < limit:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                with self._lock:
                    waiting = self._incoming
                remaining = deadline - time.perf_counter()
                if waiting == 0 or remaining <= 0:
                    return True
                try:
                    item = self._queue.get(timeout=min(remaining, 0.0005))
                except queue.Empty:
                    continue
            if item is None:
                self._queue.put(None)
                return False
            batch.append(item)
        return True

    def _prepare(self, items: list[_Item], started: float) -> list[tuple[_Item, Any, Timing]]:
        """Decode and preprocess raw items (a bad upload fails its own request only)."""
        out = []
        for it in items:
            tm = Timing(queue=started - it.queued)
            t0 = time.perf_counter()
            try:
                x, info = self.prepare_fn(it.x) if self.prepare_fn is not None else (it.x, None)
            except BaseException as exc:
                it.future.set_exception(exc)
                continue
            tm.decode = time.perf_counter() - t0
            it.x = x
            out.append((it, info, tm))
        return out

    def _loop(self) -> None:
        import numpy as np

        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            running = self._collect(batch, self.max_batch, time.perf_counter() + self.window)
            started = time.perf_counter()
            ready = self._prepare(batch, started)
            # Requests that arrived while these were decoding join the same session call (decoded in turn): under
            # load, the clients answered by the last call come back during the decoding, and their requests batch
            # with the ones that waited, instead of alternating with them in half-size calls. A lone request finds
            # the queue empty and runs at once.
            while running and self.prepare_fn is not None and len(ready) < self.max_batch:
                more: list[_Item] = []
                running = self._collect(more, self.max_batch - len(ready), 0.0)
                if not more:
                    break
                ready += self._prepare(more, time.perf_counter())
            if not ready:
                continue
            items = [r[0] for r in ready]
            t0 = time.perf_counter()
            try:
                out = self.run_fn(np.stack([it.x for it in items]))
            except BaseException as exc:  # the session failed: every waiting request gets the error
                for it in items:
                    it.future.set_exception(exc)
                continue
            infer = time.perf_counter() - t0
            with self._lock:
                self.batches += 1
                self.largest_batch = max(self.largest_batch, len(items))
                self.busy += time.perf_counter() - started
            for row, (it, info, tm) in enumerate(ready):
                tm.infer, tm.batch = infer, len(items)
                result = {name: value[row] for name, value in out.items()}
                it.future.set_result(result if self.prepare_fn is None else (result, info, tm))


# --------------------------------------------------------------------------------------------------- model
class ServedModel(ModelFacts):
    """An exported model opened for serving: ONNX Runtime session + metadata + the explorer's facts
    (:class:`~qpmcli.serve.facts.ModelFacts`) + the test images it is evaluated on, when it has any."""

    def __init__(self, path: Path, classifier: Any, *, max_batch: int = DEFAULT_MAX_BATCH,
                 window: float = DEFAULT_WINDOW, max_pixels: int = DEFAULT_MAX_PIXELS, run: Path | None = None,
                 test_images: Any = None, say: Callable[[str], None] | None = None, settings: Any = None) -> None:
        super().__init__(path, classifier.metadata, _prototypes(classifier.metadata.prototypes, path), run)
        self.classifier = classifier
        self.max_pixels = int(max_pixels)
        self.selection = (self.meta.extra or {}).get("selection_result") or _run_selection(run or path.parent)
        self.batcher = MicroBatcher(classifier.run_array, max_batch=max_batch, window=window,
                                    prepare_fn=self.prepare)
        self.settings = settings
        from qpmcli.serve.testset import Evaluation, Unavailable

        self.test_images = test_images or Unavailable(
            "no test images: serve a run folder (its test split) or pass --test-images DIR")
        self.evaluation = Evaluation(self, say=say)

    # ---------------------------------------------------------------------------------------------- facts
    def summary(self) -> dict[str, Any]:
        """``GET /api/model``: what the model is, how good it is, how it was selected, and its W (binary for QPM)."""
        sel = self.selection or {}
        return {
            "model": str(self.path), "title": self.title, "run": None if self.run is None else str(self.run),
            "kind": self.classifier.kind, "provider": self.classifier.provider,
            "backbone": self.meta.backbone, "weights_digest": self.meta.weights_digest, "dataset": self.dataset,
            "head": self.head, "head_kind": self.head_kind,
            "image_size": list(self.meta.image_size), "grid": list(self.meta.grid),
            "precision": (self.meta.extra or {}).get("precision", "fp32"), "qpm_version": self.meta.qpm_version,
            "classes": len(self.class_names), "features": len(self.feature_ids), "feature_ids": self.feature_ids,
            "feature_labels": {str(f): self.label(f) for f in self.feature_ids},
            "named_features": sum(1 for f in self.feature_ids if self.meta.feature_name(f)),
            "per_class": _per_class(self.uses) if self.sparse else None, "sparse": self.sparse,
            "metrics": {k: self.metrics.get(k) for k, _ in METRIC_COLUMNS if k in self.metrics} | {
                k: v for k, v in self.metrics.items() if isinstance(v, int | float) or v is None},
            "selection": {k: sel.get(k) for k in ("status", "objective", "bound", "gap", "solver", "seconds")
                          if k in sel} or None,
            "has_prototypes": bool(self.prototypes),
            "calibrations": [{k: e.get(k) for k in ("coverage", "score", "per_class", "level")}
                             for e in self.calibrations()],
            "test_images": self.test_images.describe(),
            "weight": self.weight.tolist(),
        }

    def prototype_source(self, fid: int, rank: int, side: int = 768) -> bytes | None:
        """The whole training image a prototype was cropped from, as PNG (longest side at most ``side``)."""
        entry = self._source_entry(fid, rank)
        if entry is None or self.run is None:
            return None
        from qpmcli.serve.testset import training_image_png

        return training_image_png(self, entry["index"], side)

    def resolve_class(self, query: str | int | None) -> int | None:
        """A class index from an index or a name (exact, case-insensitive, unique substring); ``None`` passes."""
        if query is None or str(query).strip() == "":
            return None
        from qpmcli.evidence import resolve_class

        try:
            return resolve_class(query, self.class_names)
        except ConfigError as exc:
            raise UploadError(422, str(exc)) from exc

    # ---------------------------------------------------------------------------------------------- inference
    def prepare(self, data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
        """Upload bytes -> (preprocessed ``[3, H, W]``, the image's (width, height)); :class:`UploadError` if bad."""
        image = decode_image(data, self.max_pixels)
        return self.preprocess(image), image.size

    def preprocess(self, image: Any) -> np.ndarray:
        from qpmcli.images import preprocess_array

        return preprocess_array(image, self.meta.preprocess)

    def describe(self, out: dict[str, Any], top_k: int) -> dict[str, Any]:
        from qpmcli.predict import describe_prediction

        return describe_prediction(self.meta, out["logits"], out["features"], top_k=top_k)

    def calibrations(self) -> list[dict[str, Any]]:
        """The model's conformal calibrations (``qpm conformal``, carried in the export's metadata), oldest first."""
        return list((self.meta.conformal or {}).get("calibrations") or [])

    def calibration(self, coverage: float | None = None) -> dict[str, Any] | None:
        """The calibration prediction sets use: the one for ``coverage`` (:func:`qpmcli.conformal.select_calibration`;
        none for it is a 422), by default the one calibrated last; ``None`` for a model without calibrations."""
        if coverage is None:
            entries = self.calibrations()
            return dict(entries[-1]) if entries else None
        from qpmcli.conformal import select_calibration

        try:
            return select_calibration(self.meta, coverage, model=self.run_name, onnx=True)
        except ConfigError as exc:
            raise UploadError(422, str(exc)) from exc

    def explain(self, out: dict[str, Any], image_size: tuple[int, int], *, class_index: int | None,
                compare: int | None, top_k: int, heatmaps: str, coverage: float | None = None) -> dict[str, Any]:
        """The explain page's data: top-k, the explained class's evidence, the compared class's evidence (which
        features they share, and each feature's share of the logit difference), one heatmap per feature shown
        (PNG data URIs or arrays on the token grid) on one shared scale, and the prediction set
        (:func:`qpmcli.conformal.prediction_set`) when the model carries a calibration."""
        import numpy as np

        from qpmcli.evidence import compare_classes, compare_colours, explain_output

        md = self.meta
        logits, maps, feats = out["logits"], out["maps"], out["features"]
        expl = explain_output(logits, maps, feats, md, class_index=class_index, top_k=top_k)
        if compare is None:  # the runner-up: the best other class
            order = [int(i) for i in np.argsort(-logits, kind="stable")]
            compare = next(i for i in order if i != expl.class_index) if len(order) > 1 else None
        result: dict[str, Any] = {
            "model": str(self.path), "head": self.head_kind,
            "predicted": {"index": expl.predicted_index, "class": expl.predicted_name},
            "top_k": expl.top, "explained": self._evidence(expl), "compare": None, "grid": list(self.meta.grid),
            "set": None}
        calibration = self.calibration(coverage)
        if calibration is not None:
            from qpmcli.conformal import prediction_set

            result["set"] = prediction_set(calibration, md, logits, feats)
        cols = [e.column for e in expl.features]
        if compare is not None and compare != expl.class_index:
            other = explain_output(logits, maps, feats, md, class_index=compare, top_k=top_k)
            other = explain_output(logits, maps, feats, md, class_index=compare, top_k=top_k,
                                   colours=compare_colours(expl, other))
            if self.sparse:
                groups = compare_classes(md, expl.class_index, compare)
            else:
                groups = compare_classes(md, expl.class_index, compare, cols, [e.column for e in other.features])
            a, b = expl.class_index, compare
            x = md.standardize(np.asarray(feats, dtype=np.float64), np.float64)
            union = groups["shared"] + groups["only_a"] + groups["only_b"]
            result["compare"] = {
                **self._evidence(other), "shared": groups["shared_features"],
                "only_explained": groups["only_a_features"], "only_compared": groups["only_b_features"],
                "logit_difference": expl.logit - other.logit,
                # shared features cancel exactly only where both classes weigh them the same (a binary W)
                "shared_cancel": bool(all(md.weight[a, k] == md.weight[b, k] for k in groups["shared"])),
                "difference": [{**self.feature_ref(self.feature_ids[k]), "column": k,
                                "delta": float((md.weight[a, k] - md.weight[b, k]) * x[k])} for k in union]}
            cols += [e.column for e in other.features if e.column not in cols]
        shown = np.clip(maps[cols], 0.0, None) if cols else np.zeros((0, 1, 1), dtype=np.float32)
        vmax = float(shown.max()) if shown.size else 0.0
        result["heatmap_scale"] = {"min": 0.0, "max": vmax, "colormap": HEAT_CMAP, "stops": colormap_stops(),
                                   "what": "feature map value (one scale for every heatmap of this image)"}
        if heatmaps == "array":
            result["heatmaps"] = {str(self.feature_ids[k]): maps[k].tolist() for k in cols}
        elif heatmaps == "png":
            result["heatmaps"] = {str(self.feature_ids[k]): heatmap_png(maps[k], vmax, image_size) for k in cols}
        return result

    def _evidence(self, expl: Any) -> dict[str, Any]:
        return {"index": expl.class_index, "class": expl.class_name, "probability": expl.probability,
                "logit": expl.logit, "bias": expl.bias,
                "features": [{"feature": e.feature, "name": e.name, "label": e.label, "colour": e.colour,
                              "column": e.column, "weight": e.weight, "activation": e.activation,
                              "zscore": e.zscore, "contribution": e.contribution, "peak": e.peak,
                              "peak_at": e.peak_at, "prototypes": self.prototype_refs(e.feature)}
                             for e in expl.features]}

    def close(self) -> None:
        self.batcher.close()


def _per_class(uses: Any) -> int | None:
    counts = set(int(n) for n in uses.sum(axis=1))
    return counts.pop() if len(counts) == 1 else None


def _prototypes(doc: Any, source: Path) -> dict[int, list[dict[str, Any]]]:
    """The metadata's prototypes document as ``{feature_id: [entries]}``, checked once at load: every entry a JSON
    object whose ``activation`` is a finite number, ``class`` a name or index and ``png_b64`` text (what the pages
    and the API read from it). A tampered document is an :class:`ArtifactError` (the server refuses to start, one
    line) instead of a 500 on every request that shows a prototype."""
    import math

    from qpmcli.modelfile import parse_prototypes

    if not doc:
        return {}
    try:
        protos = parse_prototypes(doc)
    except ArtifactError as exc:
        raise ArtifactError(f"{source}: {exc}; re-export the run") from None
    for fid, entries in protos.items():
        for rank, e in enumerate(entries):
            act, cls, png = e.get("activation", 0.0), e.get("class", ""), e.get("png_b64")
            problem = ("activation is not a finite number" if isinstance(act, bool) or not isinstance(act, int | float)
                       or not math.isfinite(act) else
                       "class is not a name" if not isinstance(cls, str | int) or isinstance(cls, bool) else
                       "png_b64 is not text" if png is not None and not isinstance(png, str) else None)
            if problem:
                raise ArtifactError(f"{source}: prototype {rank} of feature {fid} in the qpm_prototypes metadata is "
                                    f"malformed ({problem}); re-export the run")
    return protos


def _run_selection(folder: Path) -> dict[str, Any] | None:
    """The selection facts of a run folder (``<run>/selection.json``), when it has one."""
    sel = folder / SELECTION
    if not sel.is_file():
        return None
    try:
        doc = read_json(sel)
    except (ArtifactError, ValueError):  # ValueError: undecodable bytes
        return None
    return doc if isinstance(doc, dict) else None


_LUT: Any = None


def _heat_lut() -> Any:
    """:data:`qpmcli.evidence.HEAT_CMAP` (the CLI figures' colormap) as 256 RGB rows."""
    global _LUT
    if _LUT is None:
        import numpy as np
        from matplotlib import colormaps

        _LUT = (colormaps[HEAT_CMAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)
    return _LUT


def colormap_stops(n: int = 9) -> list[str]:
    """``n`` evenly spaced colours of the heatmaps' colormap (the pages draw the colour bar from them)."""
    lut = _heat_lut()
    return ["#" + "".join(f"{int(v):02x}" for v in lut[round(i * 255 / (n - 1))]) for i in range(n)]


def heatmap_png(grid_map: Any, vmax: float, image_size: tuple[int, int], side: int = HEATMAP_SIDE) -> str:
    """A feature map as a transparent PNG data URI at the upload's aspect ratio (longest side ``side``):
    :data:`~qpmcli.evidence.HEAT_CMAP` colours on a shared scale ``[0, vmax]``, opacity growing with the value so that
    cold areas show the image."""
    import base64

    import numpy as np
    from PIL import Image

    from qpmcli.evidence import upsample

    w, h = image_size
    scale = side / max(w, h)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    v = np.clip(upsample(np.clip(np.asarray(grid_map, dtype=np.float32), 0, None), size) / max(vmax, 1e-12), 0, 1)
    rgba = np.empty((*size, 4), dtype=np.uint8)
    rgba[..., :3] = _heat_lut()[(v * 255).astype(np.uint8)]
    rgba[..., 3] = (40 + 215 * v).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", compress_level=3)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def load_served_model(model: str | os.PathLike[str] | None, *, device: str = "auto",
                      max_batch: int = DEFAULT_MAX_BATCH, window: float = DEFAULT_WINDOW,
                      max_pixels: int = DEFAULT_MAX_PIXELS, settings: Any = None,
                      test_images: str | os.PathLike[str] | None = None,
                      say: Callable[[str], None] | None = None) -> ServedModel:
    """Open MODEL (an ``.onnx`` file, a run directory with its export, or the current run) for serving, with the
    test images it is evaluated on: ``test_images`` (a folder of ``<class>/<image>``), else the test split of the
    run the file belongs to (:func:`~qpmcli.serve.facts.run_of`), when its data can be opened here."""
    from qpmcli.predict import load_classifier
    from qpmcli.serve.testset import folder_test_images, run_test_images

    if settings is None:
        from qpmcli.settings import resolve_settings

        settings, _ = resolve_settings()
    path = resolve_model_path(model, settings)
    clf = load_classifier(path, device)
    if getattr(clf, "graph", "full") != "full":
        raise ArtifactError(f"{path} is an adapter-only graph; serve the full graph (model.onnx) instead")
    run = run_of(path, settings)
    names = [str(c) for c in clf.metadata.class_names]
    if test_images is not None:
        tests = folder_test_images(test_images, names)
    else:
        adapter = path.with_name(path.name[:-len(".onnx")] + ".adapter.onnx")  # qpm evaluate's inputs: cached tokens
        tests = run_test_images(run, names, settings, adapter_path=adapter, device=device) if run is not None else None
    return ServedModel(path, clf, max_batch=max_batch, window=window, max_pixels=max_pixels, run=run,
                       test_images=tests, say=say, settings=settings)

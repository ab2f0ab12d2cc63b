"""The images a served model is evaluated on, and the evaluation: confusion matrix, per-class accuracy, mistakes.

Two sources (:class:`TestImages`):

- a run's test split: the run's own test token cache (what ``qpm evaluate`` reads) through the export's adapter graph
  (``<stem>.adapter.onnx``, tokens in, ONNX Runtime): the same inputs as ``qpm evaluate``, so the per-class accuracy is
  ``qpm evaluate``'s (a test compares them); the pictures of the mistakes come from the run's dataset when it can be
  opened here. Without the cache or the adapter graph, the dataset's test images through the full graph;
- ``qpm serve --test-images DIR``: a folder of ``<class>/<image>`` whose folder names are the model's class names,
  each image decoded and preprocessed as an upload and run through the served graph (what ``qpm predict`` does).

:class:`Evaluation` runs every test item once (batched, in a background thread started by the first page or API call
that needs it, with progress lines on the server's console) and keeps the logits and pooled features, so the confusion
matrix (:func:`qpmcli.metrics.confusion`, the owner of per-class accuracy), and every mistake's decisive features are
read from memory afterwards.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qpmcli.errors import ConfigError, QpmError

BATCH = 32
THUMB_SIDE = 224


class TestImages:
    """Labelled test images: ``image(i)`` (RGB PIL), ``label(i)`` (the model's class index), ``name(i)``, and
    ``outputs(model, rows)``: the model's outputs for those items (``tokens``: a callable giving their cached tokens
    and ``adapter`` the graph that takes them; else the images through the served graph)."""

    available = True

    def __init__(self, source: str, labels: list[int], opener: Callable[[int], Any] | None, names: list[str], *,
                 tokens: Callable[[list[int]], Any] | None = None, adapter: Any = None) -> None:
        self.source = source
        self.labels = labels
        self._open = opener
        self._names = names
        self._tokens = tokens
        self.adapter = adapter

    @property
    def has_pictures(self) -> bool:
        return self._open is not None

    def outputs(self, model: Any, rows: list[int], failed: list[dict[str, str]]) -> tuple[list[int], dict[str, Any]]:
        """The model's outputs for ``rows`` (the rows it could read, their outputs); unreadable images go to
        ``failed``."""
        import numpy as np

        if self._tokens is not None:
            return rows, self.adapter.run_tokens(np.asarray(self._tokens(rows), dtype=np.float32))
        ok, xs = [], []
        for i in rows:
            try:
                xs.append(model.preprocess(self.image(i)))
                ok.append(i)
            except (QpmError, OSError, ValueError) as exc:
                failed.append({"image": self.name(i), "error": str(exc).splitlines()[0]})
        return ok, (model.classifier.run_array(np.stack(xs)) if ok else {})

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Any:
        if self._open is None:
            raise QpmError(f"the pictures of {self.source} are not available here")
        return self._open(i)

    def label(self, i: int) -> int:
        return self.labels[i]

    def name(self, i: int) -> str:
        return self._names[i]

    def of_class(self, c: int) -> list[int]:
        return [i for i, lab in enumerate(self.labels) if lab == c]

    def describe(self) -> dict[str, Any]:
        return {"available": True, "source": self.source, "images": len(self), "classes": len(set(self.labels)),
                "pictures": self.has_pictures}


class Unavailable:
    """No test images, and why (shown on the pages that would use them)."""

    available = False

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def describe(self) -> dict[str, Any]:
        return {"available": False, "reason": self.reason}


def run_test_images(run: Path, class_names: list[str], settings: Any = None, *,
                    adapter_path: Path | None = None, device: str = "cpu") -> TestImages | Unavailable:
    """The test split of ``run``: its test token cache through ``adapter_path`` (the export's adapter graph) when
    both are here, else its dataset's test images; classes matched to the model's by name."""
    from qpmcli.artifact import RunFolder

    ds, ds_error = None, None
    try:
        ds = RunFolder(run).dataset("test", settings)
    except (QpmError, OSError) as exc:
        ds_error = str(exc).splitlines()[0]
    if adapter_path is not None and adapter_path.is_file():
        try:
            return _cached_test_split(run, class_names, adapter_path, device, ds)
        except (QpmError, OSError) as exc:
            ds_error = ds_error or str(exc).splitlines()[0]
    if ds is None:
        return Unavailable(f"the test split of run {run} cannot be opened here ({ds_error}); pass --test-images DIR")
    try:
        mapping = _class_mapping([str(c) for c in ds.classes], class_names, f"the test split of {run.name}")
        labels = [mapping[int(ds.label(i))] for i in range(len(ds))]
    except (QpmError, OSError) as exc:
        return Unavailable(f"the test split of run {run} cannot be read ({str(exc).splitlines()[0]}); "
                           f"pass --test-images DIR")
    if not labels:
        return Unavailable(f"the test split of run {run} is empty")
    names = [_item_name(ds, i) for i in range(len(ds))]
    return TestImages(f"test split of {ds.name or 'the dataset'} (run {run.name}; images)", labels,
                      lambda i: ds[i].image.convert("RGB"), names)


def _cached_test_split(run: Path, class_names: list[str], adapter_path: Path, device: str,
                       ds: Any) -> TestImages:
    """The run's test token cache (``qpm evaluate``'s inputs) run by the adapter graph."""
    import numpy as np

    from qpmcli.evaluate import open_run_caches
    from qpmcli.predict import load_classifier

    adapter = load_classifier(adapter_path, device)
    md = adapter.metadata
    _, cache = open_run_caches(run, {"backbone": md.backbone, "weights_digest": md.weights_digest,
                                     "grid": list(md.grid)})
    if getattr(adapter, "graph", None) != "adapter":
        raise QpmError(f"{adapter_path} is not an adapter graph")
    if list(adapter.metadata.class_names) != list(class_names):
        raise QpmError(f"{adapter_path} has other classes than the served model")
    classes = cache.classes or list(class_names)
    mapping = _class_mapping([str(c) for c in classes], class_names, f"the test cache of {run.name}")
    labels = [mapping[int(y)] for y in np.asarray(cache.labels)]
    indices = [int(i) for i in np.asarray(cache.indices)]
    opener = None
    names = [f"test image {i}" for i in indices]
    if ds is not None and len(ds) > max(indices, default=-1):
        opener = lambda r: ds[indices[r]].image.convert("RGB")  # noqa: E731 - a row of the cache -> its image
        names = [_item_name(ds, i) for i in indices]
    return TestImages(f"test split of {ds.name if ds is not None and ds.name else run.name} (run {run.name}; its "
                      f"token cache, as qpm evaluate)", labels, opener, names,
                      tokens=lambda rows: cache.tokens[rows[0]:rows[-1] + 1], adapter=adapter)


def folder_test_images(folder: str | os.PathLike[str], class_names: list[str]) -> TestImages:
    """``--test-images DIR``: ``DIR/<class>/<image>``, each subfolder named after one of the model's classes
    (exactly, or ignoring case). A folder that names no class is a :class:`ConfigError` (before serving)."""
    from qpmcli.images import is_image_file, open_image

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--test-images {root} is not a folder (expected <class>/<image> inside)")
    subs = sorted(p for p in root.iterdir() if p.is_dir())
    if not subs:
        raise ConfigError(f"--test-images {root} holds no class folders (expected <class>/<image> inside)")
    lower = {c.lower(): i for i, c in enumerate(class_names)}
    paths: list[Path] = []
    labels: list[int] = []
    for sub in subs:
        c = class_names.index(sub.name) if sub.name in class_names else lower.get(sub.name.lower())
        if c is None:
            raise ConfigError(f"--test-images: folder {sub.name!r} is not a class of the model (e.g. "
                              f"{', '.join(repr(n) for n in class_names[:3])}); name each folder after its class")
        found = sorted(f for f in sub.rglob("*") if is_image_file(f))
        paths += found
        labels += [c] * len(found)
    if not paths:
        raise ConfigError(f"--test-images {root}: the class folders hold no images")
    return TestImages(f"folder {root}", labels, lambda i: open_image(paths[i]),
                      [str(p.relative_to(root)) for p in paths])


def _class_mapping(source: list[str], model: list[str], what: str) -> dict[int, int]:
    lower = {c.lower(): i for i, c in enumerate(model)}
    out = {}
    for j, name in enumerate(source):
        i = model.index(name) if name in model else lower.get(name.lower())
        if i is None:
            raise ConfigError(f"{what} has class {name!r}, which the model does not know")
        out[j] = i
    return out


def _item_name(ds: Any, i: int) -> str:
    try:
        p = ds.path(i)
    except (QpmError, OSError, NotImplementedError):
        p = None
    return Path(p).name if p and os.sep in str(p) else str(p or f"test image {i}")


def png_bytes(image: Any, side: int | None = None, fmt: str = "PNG") -> bytes:
    """An RGB image as PNG (lossless: decoding it gives the very pixels) or, for thumbnails, JPEG; ``side`` bounds
    its longest side."""
    from PIL import Image

    if side and max(image.size) > side:
        scale = side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 88} if fmt == "JPEG" else {"compress_level": 3}))
    return buf.getvalue()


_TRAIN: dict[Path, Any] = {}
_TRAIN_LOCK = threading.Lock()


def training_image_png(model: Any, index: int, side: int) -> bytes | None:
    """A training image of ``model.run``'s dataset (for a prototype's whole image), or ``None`` when unavailable."""
    from qpmcli.artifact import RunFolder

    with _TRAIN_LOCK:
        if model.run not in _TRAIN:
            try:
                _TRAIN[model.run] = RunFolder(model.run).dataset("train", getattr(model, "settings", None))
            except (QpmError, OSError):
                _TRAIN[model.run] = None
        ds = _TRAIN[model.run]
    if ds is None or not 0 <= index < len(ds):
        return None
    try:
        return png_bytes(ds[index].image.convert("RGB"), side)
    except (QpmError, OSError, ValueError):
        return None


class Evaluation:
    """The served model on its test images, computed once (see the module docstring)."""

    def __init__(self, model: Any, say: Callable[[str], None] | None = None) -> None:
        self.model = model
        self.tests = model.test_images
        self.say = say or (lambda m: print(m, flush=True))
        self._lock = threading.Lock()
        self._done_event = threading.Event()
        self._thread: threading.Thread | None = None
        self.state = "idle" if self.tests.available else "unavailable"
        self.done = 0
        self.seconds = 0.0
        self.error: str | None = None
        self.failed: list[dict[str, str]] = []
        self.logits: Any = None
        self.features: Any = None
        self.labels: Any = None

    # ------------------------------------------------------------------------------------------------- running
    def start(self) -> None:
        with self._lock:
            if self.state != "idle":
                return
            self.state = "running"
            self._thread = threading.Thread(target=self._run, name="qpm-serve-evaluate", daemon=True)
            self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        self.start()
        return self._done_event.wait(timeout) if self.state != "unavailable" else True

    def status(self) -> dict[str, Any]:
        total = len(self.tests) if self.tests.available else 0
        return {"state": self.state, "done": self.done, "total": total, "seconds": round(self.seconds, 3),
                "error": self.error, "test_images": self.tests.describe()}

    def _run(self) -> None:
        import numpy as np

        t0 = time.perf_counter()
        n = len(self.tests)
        self.say(f"qpm serve: evaluating on {n} test images ({self.tests.source}) for /confusion ...")
        logits = np.full((n, len(self.model.class_names)), np.nan, np.float32)
        feats = np.full((n, len(self.model.feature_ids)), np.nan, np.float32)
        ok = np.zeros(n, dtype=bool)
        next_report = 0.25
        try:
            for start in range(0, n, BATCH):
                rows, out = self.tests.outputs(self.model, list(range(start, min(start + BATCH, n))), self.failed)
                if rows:
                    logits[rows] = out["logits"]
                    feats[rows] = out["features"]
                    ok[rows] = True
                self.done = min(start + BATCH, n)
                self.seconds = time.perf_counter() - t0
                if self.done / n >= next_report and self.done < n:
                    self.say(f"qpm serve: evaluated {self.done}/{n} test images ({self.seconds:.1f} s)")
                    next_report += 0.25
            self.logits, self.features = logits[ok], feats[ok]
            self.labels = np.asarray(self.tests.labels, dtype=np.int64)[ok]
            self.index = np.flatnonzero(ok)
            self.seconds = time.perf_counter() - t0
            self.state = "done"
            acc = float((self.logits.argmax(1) == self.labels).mean()) if len(self.labels) else float("nan")
            self.say(f"qpm serve: confusion matrix ready: accuracy {100 * acc:.1f} % on {int(ok.sum())} test images"
                     f" ({self.seconds:.1f} s)" + (f"; {len(self.failed)} unreadable" if self.failed else ""))
        except Exception as exc:  # reported on the page and the API instead of killing the thread silently
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            self.say(f"qpm serve: the evaluation failed: {self.error}")
        finally:
            self._done_event.set()

    # ------------------------------------------------------------------------------------------------- results
    def confusion(self) -> dict[str, Any]:
        """``GET /api/confusion``: ``matrix[true][predicted]`` counts, per-class accuracy (``None`` for a class
        without test images), support, overall accuracy."""
        import numpy as np

        from qpmcli.metrics import confusion, predictions

        cm = confusion(predictions(self.logits), self.labels, len(self.model.class_names))
        matrix, support, per_class = cm["matrix"], cm["support"], cm["per_class_accuracy"]
        return {"classes": self.model.class_names, "matrix": matrix.tolist(), "per_class_accuracy": per_class,
                "support": support.tolist(), "accuracy": float(np.trace(matrix) / max(1, matrix.sum())),
                "images": int(matrix.sum()), "mistakes": int(matrix.sum() - np.trace(matrix)),
                "source": self.tests.source, "seconds": round(self.seconds, 3), "unreadable": self.failed,
                "model": str(self.model.path)}

    def mistakes(self, true: int | None = None, pred: int | None = None) -> list[int]:
        """Rows of the evaluation that are misclassified (optionally of one true / predicted class), the most
        confident mistakes first."""
        import numpy as np

        from qpmcli.modelfile import softmax

        p = self.logits.argmax(1)
        wrong = np.flatnonzero((p != self.labels) & (True if true is None else self.labels == true)
                               & (True if pred is None else p == pred))
        conf = softmax(self.logits[wrong])[np.arange(len(wrong)), p[wrong]] if len(wrong) else np.zeros(0)
        return [int(wrong[j]) for j in np.argsort(-conf, kind="stable")]

    def mistake(self, row: int, n: int = 3) -> dict[str, Any]:
        """One mistake: the image, its true and predicted class with probabilities, and the features that decided
        between them, each with its share ``(W_pred - W_true) * z`` of the logit difference."""
        import numpy as np

        from qpmcli.modelfile import softmax

        m = self.model
        logits, f = self.logits[row].astype(np.float64), self.features[row].astype(np.float64)
        probs = softmax(logits)
        t, p = int(self.labels[row]), int(np.argmax(logits))
        delta = m.meta.contributions(f[None], p)[0] - m.meta.contributions(f[None], t)[0]
        cols = np.flatnonzero(m.uses[p] | m.uses[t]) if m.sparse else np.arange(len(delta))
        colours = m.colours(p, t)
        order = cols[np.argsort(-delta[cols], kind="stable")]

        def ref(k: int) -> dict[str, Any]:
            fid = m.feature_ids[int(k)]
            return {**m.feature_ref(fid, colours.get(fid)), "delta": float(delta[k])}

        index = int(self.index[row])
        pictures = self.tests.has_pictures
        return {"row": row, "image": index, "name": self.tests.name(index),
                "url": f"/api/test-images/{index}.png" if pictures else None,
                "thumb": f"/api/test-images/{index}.png?thumb=1" if pictures else None,
                "true": {"index": t, "class": m.class_names[t], "probability": float(probs[t])},
                "predicted": {"index": p, "class": m.class_names[p], "probability": float(probs[p])},
                "logit_difference": float(logits[p] - logits[t]),
                "for_predicted": [ref(k) for k in order[:n] if delta[k] > 0],
                "for_true": [ref(k) for k in order[::-1][:n] if delta[k] < 0],
                "explain": f"/explain?test={index}&class={p}&compare={t}" if pictures else None}

"""What the explorer says about a served model, read from its metadata alone (numpy; no session, no torch).

The head decides what may be claimed (:attr:`ModelFacts.head_kind`):

- ``binary``: a QPM head, ``W`` in {0, 1}: a class decides with its few features, its logit is the *sum* of their
  standardised activations (plus bias), and features two classes share add the same to both logits;
- ``sparse``: few features per class with real-valued weights (a weighted sum; shared features count with
  different weights);
- ``dense``: every class uses every feature with a real weight of either sign (a linear probe, a dense model): a
  page shows the features with the largest |weight|, never "the class decides with N features".

Words: **activation** is always a feature's mean over the image's patches (what the head multiplies by W, after
standardising); **peak** is its map's largest value at one patch (what ranks the prototypes and what their box
marks). Colours come from :func:`qpmcli.evidence.class_colours`, the rule of the CLI figures.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

DENSE_HEADS = ("dense", "linear-probe")
SHOWN_DENSE = 10  # features listed for a class of a dense head (largest |W|)
GRAPH_MAX_EDGES = 1500  # the sharing graph keeps the strongest edges beyond this


def run_of(path: Path, settings: Any = None) -> Path | None:
    """The run an exported file belongs to: its own folder when that is a run, else the run the current-run pointer
    or a demo's ``demo.json`` beside it records for this very file; ``None`` when none is known."""
    from qpmcli.artifact import RunFolder, read_json
    from qpmcli.errors import QpmError

    path = path.resolve()
    if RunFolder(path.parent).is_run:
        return path.parent
    candidates = []
    try:
        from qpmcli.current import read_pointer

        doc = read_pointer(settings) if settings is not None else None
        if doc and doc.get("onnx") and Path(doc["onnx"]).resolve() == path:
            candidates.append(Path(doc["run"]))
    except QpmError:
        pass
    demo = path.parent / "demo.json"
    if demo.is_file():
        try:
            doc = read_json(demo)
            if isinstance(doc, dict) and doc.get("onnx") and Path(doc["onnx"]).resolve() == path:
                run = (doc.get("runs") or {}).get("qpm")
                if isinstance(run, str):
                    candidates.append(Path(run))
        except (QpmError, ValueError):
            pass
    return next((c for c in candidates if RunFolder(c).is_run), None)


class ModelFacts:
    """The explorer's facts about one model: its title, head kind, classes, features, prototypes, search, graph."""

    def __init__(self, path: Path, meta: Any, prototypes: dict[int, list[dict[str, Any]]],
                 run: Path | None = None) -> None:
        import numpy as np

        self.path = path
        self.meta = meta
        self.run = run
        self.class_names: list[str] = [str(c) for c in meta.class_names]
        self.feature_ids: list[int] = [int(f) for f in meta.features]
        self.weight = np.asarray(meta.weight, dtype=np.float32)  # [C, K]
        self.uses = self.weight != 0
        extra = dict(meta.extra or {})
        self.head = extra.get("head")
        self.sparse = self.head not in DENSE_HEADS and not bool(self.uses.all()) and self.weight.size > 0
        self.binary = self.sparse and bool(np.all(self.weight[self.uses] == 1.0))
        self.head_kind = "binary" if self.binary else "sparse" if self.sparse else "dense"
        self.column_of = {fid: k for k, fid in enumerate(self.feature_ids)}
        self.prototypes = prototypes
        self.metrics = extra.get("metrics") if isinstance(extra.get("metrics"), dict) else {}
        self.dataset = extra.get("dataset")
        self.run_name = run.name if run is not None else (path.parent.name if path.stem == "model" else path.stem)
        self.title = " \u00b7 ".join(str(p) for p in (self.run_name, self.dataset, meta.backbone) if p)
        self._sizes: dict[tuple[int, int], tuple[int, int]] = {}
        self._graph: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------------ features
    def label(self, fid: int) -> str:
        return self.meta.feature_label(fid)

    def feature_ref(self, fid: int, colour: str | None = None) -> dict[str, Any]:
        """How a feature appears anywhere in the API: id, best name, label, and its colour in the current view."""
        return {"feature": int(fid), "name": self.meta.feature_name(fid), "label": self.label(fid),
                **({"colour": colour} if colour else {})}

    def class_columns(self, c: int) -> list[int]:
        """The columns a class page shows: its features (sparse heads) or its largest |W| (dense heads)."""
        import numpy as np

        if self.sparse:
            return [int(k) for k in np.flatnonzero(self.uses[c])]
        return [int(k) for k in np.argsort(-np.abs(self.weight[c]), kind="stable")[:SHOWN_DENSE]]

    def colours(self, c: int, other: int | None = None) -> dict[int, str]:
        from qpmcli.evidence import class_colours

        return class_colours(self.meta, c, other, columns=None if self.sparse else self.class_columns(c),
                             other_columns=None if self.sparse or other is None else self.class_columns(other))

    # ------------------------------------------------------------------------------------------------- classes
    def class_info(self, c: int) -> dict[str, Any]:
        """A class: its features (weight, colour, prototypes, the other classes that use each) and the classes most
        like it (shared features; cosine of W's rows for a dense head)."""
        import numpy as np

        colours = self.colours(c)
        feats = []
        for k in self.class_columns(c):
            fid = self.feature_ids[k]
            others = [int(o) for o in np.flatnonzero(self.uses[:, k]) if o != c] if self.sparse else []
            feats.append({**self.feature_ref(fid, colours[fid]), "column": k, "weight": float(self.weight[c, k]),
                          "shared_with": [{"index": o, "class": self.class_names[o]} for o in others],
                          "prototypes": self.prototype_refs(fid)})
        return {"index": c, "class": self.class_names[c], "head": self.head_kind,
                "uses": int(self.uses[c].sum()), "features": feats, "similar": self.similar(c),
                "bias": None if self.meta.bias is None else float(self.meta.bias[c])}

    def similar(self, c: int, n: int = 10) -> list[dict[str, Any]]:
        """Sparse heads: the classes sharing most features with ``c`` (ties by index). Dense heads: the classes whose
        weight rows point the same way (cosine), since every class uses every feature."""
        import numpy as np

        if not self.sparse:
            w = self.weight / np.maximum(np.linalg.norm(self.weight, axis=1, keepdims=True), 1e-12)
            cos = w @ w[c]
            cos[c] = -np.inf
            return [{"index": int(o), "class": self.class_names[o], "cosine": float(cos[o])}
                    for o in np.argsort(-cos, kind="stable")[:min(n, len(cos) - 1)]]
        shared = (self.uses & self.uses[c]).sum(axis=1)
        shared[c] = -1
        out = []
        for o in np.argsort(-shared, kind="stable")[:n]:
            if shared[o] <= 0:
                break
            fids = [self.feature_ids[k] for k in np.flatnonzero(self.uses[o] & self.uses[c])]
            out.append({"index": int(o), "class": self.class_names[o], "shared": int(shared[o]), "features": fids,
                        "labels": [self.label(f) for f in fids]})
        return out

    # ------------------------------------------------------------------------------------------------ features
    def feature_info(self, fid: int) -> dict[str, Any]:
        """A feature (dense id): the classes that use it (dense heads: every class, by weight), its training
        statistics, the features it is used with, and its prototypes."""
        import numpy as np

        k = self.column_of[fid]
        order = np.argsort(-self.weight[:, k], kind="stable")
        users = [int(c) for c in order if self.uses[c, k]]
        co: dict[int, int] = {}
        if self.sparse:
            for c in users:
                for j in np.flatnonzero(self.uses[c]):
                    if j != k:
                        co[int(j)] = co.get(int(j), 0) + 1
        if not self.sparse:  # every class: the strongest weights of either sign
            users = users[:SHOWN_DENSE] + [c for c in users[-SHOWN_DENSE:] if c not in users[:SHOWN_DENSE]]
        peaks = [float(p.get("activation", 0.0)) for p in self.prototypes.get(fid, [])]
        return {
            **self.feature_ref(fid), "column": k, "head": self.head_kind,
            "classes": [{"index": c, "class": self.class_names[c], "weight": float(self.weight[c, k])}
                        for c in users],
            "statistics": {"mu": float(self.meta.mu[k]), "sigma": float(self.meta.sigma[k]),
                           "classes_using": int(self.uses[:, k].sum()),
                           "share_of_classes": float(self.uses[:, k].mean()) if len(self.class_names) else 0.0,
                           "prototype_peak_max": max(peaks) if peaks else None,
                           "prototype_peak_min": min(peaks) if peaks else None},
            "co_occurring": [{**self.feature_ref(self.feature_ids[j]), "classes": n}
                             for j, n in sorted(co.items(), key=lambda t: (-t[1], t[0]))[:10]],
            "prototypes": self.prototype_refs(fid),
        }

    # ---------------------------------------------------------------------------------------------- prototypes
    def prototype_refs(self, fid: int) -> list[dict[str, Any]]:
        """A feature's prototypes: the crop's URL and size, ``box`` (the patch where the map peaks, in the crop's
        pixels ``[x0, y0, x1, y1]``), ``peak`` (the map's value there), the training image's class, and ``source``
        (the whole training image with the box as fractions of its size) when the run's data is at hand."""
        out = []
        for r, p in enumerate(self.prototypes.get(fid, [])):
            size = self.prototype_size(fid, r)
            src = self._source_entry(fid, r)
            out.append({"rank": r, "class": str(p.get("class", "")), "peak": float(p.get("activation", 0.0)),
                        "url": f"/api/prototypes/{fid}/{r}.png", "size": list(size) if size else None,
                        "box": [float(v) for v in p["patch_box"]] if _is_box(p.get("patch_box")) else None,
                        "source": None if src is None else {"url": f"/api/prototypes/{fid}/{r}/source.png",
                                                            "box": src["box"], "index": src["index"]}})
        return out

    def prototype_png(self, fid: int, rank: int) -> bytes | None:
        import base64
        import binascii

        protos = self.prototypes.get(fid)
        if not protos or not 0 <= rank < len(protos) or "png_b64" not in protos[rank]:
            return None
        try:
            return base64.b64decode(protos[rank]["png_b64"], validate=True)
        except (binascii.Error, ValueError):
            return None

    def prototype_size(self, fid: int, rank: int) -> tuple[int, int] | None:
        """(width, height) of a stored prototype crop, read from its PNG header once."""
        import struct

        key = (fid, rank)
        if key not in self._sizes:
            png = self.prototype_png(fid, rank)
            if png is None or len(png) < 24 or png[12:16] != b"IHDR":
                return None
            self._sizes[key] = struct.unpack(">II", png[16:24])
        return self._sizes[key]

    def _source_entry(self, fid: int, rank: int) -> dict[str, Any] | None:
        """The training image a prototype was cropped from (dataset index, patch box as fractions of the image), from
        the run's ``prototypes/prototypes.json`` when it describes the very prototypes the model carries."""
        doc = self._run_prototypes()
        entries = (doc or {}).get(str(fid))
        if not entries or rank >= len(entries):
            return None
        e = entries[rank]
        patch, index = e.get("patch"), e.get("index")
        gh, gw = (int(g) for g in self.meta.grid)
        if not (isinstance(index, int) and isinstance(patch, list) and len(patch) == 2
                and all(isinstance(v, int) for v in patch)):
            return None
        r, c = patch
        return {"index": index, "box": [c / gw, r / gh, (c + 1) / gw, (r + 1) / gh]}

    def _run_prototypes(self) -> dict[str, Any] | None:
        if not hasattr(self, "_run_protos"):
            self._run_protos = None
            if self.run is not None:
                from qpmcli.artifact import PROTOTYPES, read_json
                from qpmcli.errors import QpmError
                from qpmcli.modelfile import PROTOTYPES_JSON

                try:
                    doc = read_json(self.run / PROTOTYPES / PROTOTYPES_JSON)
                    feats = doc.get("features") if isinstance(doc, dict) else None
                    same = isinstance(feats, dict) and all(
                        len(feats.get(str(f), [])) == len(v)
                        and all(isinstance(a, dict) and a.get("activation") == b.get("activation")
                                for a, b in zip(feats.get(str(f), []), v, strict=False))
                        for f, v in self.prototypes.items())
                    self._run_protos = feats if same else None  # a re-built folder describes other prototypes
                except (QpmError, ValueError, OSError):
                    self._run_protos = None
        return self._run_protos

    # -------------------------------------------------------------------------------------------- search, graph
    def search(self, query: str, limit: int = 50) -> dict[str, Any]:
        """Classes whose name contains ``query`` and features whose id (``12``, ``f12``) or name does (any case)."""
        q = query.strip().lower()
        if not q:
            return {"query": query, "classes": [], "features": []}
        classes = [{"index": i, "class": c} for i, c in enumerate(self.class_names) if q in c.lower()]
        fid = re.fullmatch(r"f?(\d{1,9})", q)
        feats = []
        for f in self.feature_ids:
            names = [str(n).lower() for n in ((self.meta.feature_names or {}).get(f, {}) or {}).get("names", [])]
            if (fid and int(fid.group(1)) == f) or any(q in n for n in names):
                feats.append({**self.feature_ref(f), "classes_using": int(self.uses[:, self.column_of[f]].sum()),
                              "matched": next((n for n in names if q in n), None)})
        return {"query": query, "classes": classes[:limit], "features": feats[:limit],
                "more": max(0, len(classes) - limit) + max(0, len(feats) - limit)}

    def sharing_graph(self) -> dict[str, Any]:
        """Which classes share which features: nodes (classes) with a layout, edges (pairs of classes with the
        features they share), and per feature the classes using it. Computed once (networkx spring layout, seeded).
        A dense head has no sharing structure (every class uses every feature): ``edges`` is empty."""
        if self._graph is not None:
            return self._graph
        import networkx as nx
        import numpy as np

        n = len(self.class_names)
        edges: list[dict[str, Any]] = []
        total = 0
        if self.sparse:
            u = self.uses.astype(np.int32)
            shared = u @ u.T
            iu, ju = np.triu_indices(n, 1)
            keep = shared[iu, ju] > 0
            pairs = sorted(zip(iu[keep], ju[keep], shared[iu, ju][keep], strict=True),
                           key=lambda t: (-t[2], t[0], t[1]))
            total = len(pairs)
            for a, b, s in pairs[:GRAPH_MAX_EDGES]:
                fids = [self.feature_ids[k] for k in np.flatnonzero(self.uses[a] & self.uses[b])]
                edges.append({"a": int(a), "b": int(b), "shared": int(s), "features": fids})
        g = nx.Graph()
        g.add_nodes_from(range(n))
        g.add_weighted_edges_from((e["a"], e["b"], float(e["shared"])) for e in edges)
        pos = nx.spring_layout(g, seed=0, iterations=100) if n > 1 else {0: np.zeros(2)}
        xy = np.array([pos[i] for i in range(n)], dtype=np.float64).reshape(n, 2)
        lo, hi = xy.min(0), xy.max(0)
        xy = (xy - lo) / np.where(hi - lo > 0, hi - lo, 1.0)
        degree = dict(g.degree())
        self._graph = {
            "head": self.head_kind,
            "nodes": [{"index": i, "class": c, "x": round(float(xy[i, 0]), 4), "y": round(float(xy[i, 1]), 4),
                       "degree": int(degree.get(i, 0))} for i, c in enumerate(self.class_names)],
            "edges": edges, "edges_total": total,
            "features": sorted(({**self.feature_ref(f), "classes": [int(c) for c in np.flatnonzero(self.uses[:, k])]}
                                for k, f in enumerate(self.feature_ids)), key=lambda e: -len(e["classes"]))
            if self.sparse else [],  # the most shared first
        }
        return self._graph


def _is_box(box: Any) -> bool:
    return isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                          for v in box)

"""The FastAPI application: explorer pages (server-rendered, Jinja2 autoescaped), the JSON API, local assets.

Routes never read a path chosen by the client: pages and API address classes and features by index, prototypes by
``(feature id, rank)`` into the model's own metadata, and static assets by name from a fixed in-memory table.
"""

from __future__ import annotations

import asyncio
import sys
import time
from importlib import resources
from typing import Any

from fastapi import File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from qpmcli.errors import QpmError
from qpmcli.serve.engine import DEFAULT_MAX_UPLOAD, METRIC_COLUMNS, ServedModel, UploadError
from qpmcli.serve.middleware import ResponseHeaders, UploadLimit

STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".png": "image/png",
                ".svg": "image/svg+xml"}
PER_PAGE = 48  # mistakes per page of /misclassified


def _static_files() -> dict[str, tuple[bytes, str]]:
    out = {}
    for entry in resources.files("qpmcli.serve").joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in STATIC_TYPES:
            out[entry.name] = (entry.read_bytes(), STATIC_TYPES[suffix])
    return out


def create_app(model: ServedModel, *, max_upload: int = DEFAULT_MAX_UPLOAD) -> Any:
    """The ASGI app serving ``model`` (pages, API, OpenAPI at /docs with its assets served locally)."""
    from fastapi_offline import FastAPIOffline

    from qpmcli import __version__

    app = FastAPIOffline(
        title="qpm serve", version=__version__,
        description=f"Inference and explanations for {model.title} ({len(model.class_names)} classes, "
                    f"{len(model.feature_ids)} features, {model.head_kind} head) with ONNX Runtime.",
        static_url="/docs-assets", redoc_url=None)
    templates = Jinja2Templates(directory=str(resources.files("qpmcli.serve").joinpath("templates")))
    templates.env.autoescape = True
    templates.env.filters["weight"] = lambda w: _weight(w, model.head_kind)
    static = _static_files()
    started = time.time()
    app.state.model = model
    evaluation = model.evaluation

    app.add_middleware(UploadLimit, limit=max_upload)
    app.add_middleware(ResponseHeaders)  # outermost: its total covers the upload limit and the parsing

    @app.exception_handler(UploadError)
    async def upload_error(_request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        base = {"model": model, "head": model.head_kind, "n_features": len(model.feature_ids)}
        return templates.TemplateResponse(request, name, {**base, **context}, status_code=status)

    def not_found(request: Request, what: str) -> HTMLResponse:
        return page(request, "error.html", status=404, title="Not found", message=what)

    def check_class(index: int) -> None:
        if not 0 <= index < len(model.class_names):
            raise HTTPException(404, f"there is no class {index} (the model has {len(model.class_names)})")

    # ------------------------------------------------------------------------------------------------ pages
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def overview(request: Request) -> HTMLResponse:
        summary = model.summary()
        metrics = [(label, summary["metrics"].get(key)) for key, label in METRIC_COLUMNS
                   if key in summary["metrics"]]
        return page(request, "overview.html", title=model.title, active="model", summary=summary, metrics=metrics,
                    classes=list(enumerate(model.class_names)), uses=model.uses.tolist(),
                    features=[model.feature_ref(f) for f in model.feature_ids])

    @app.get("/class/{index}", response_class=HTMLResponse, include_in_schema=False)
    async def class_page(request: Request, index: int) -> HTMLResponse:
        if not 0 <= index < len(model.class_names):
            return not_found(request, f"there is no class {index} (the model has {len(model.class_names)})")
        info = model.class_info(index)
        return page(request, "class.html", title=info["class"], active="model", info=info,
                    examples=_examples(model, index))

    @app.get("/feature/{fid}", response_class=HTMLResponse, include_in_schema=False)
    async def feature_page(request: Request, fid: int) -> HTMLResponse:
        if fid not in model.column_of:
            return not_found(request, f"feature {fid} is not one of the model's selected features")
        info = model.feature_info(fid)
        return page(request, "feature.html", title=info["label"], active="model", info=info)

    @app.get("/explain", response_class=HTMLResponse, include_in_schema=False)
    async def explain_page(request: Request) -> HTMLResponse:
        return page(request, "explain.html", title="Explain an image", active="explain",
                    class_list=[{"index": i, "class": c} for i, c in enumerate(model.class_names)])

    @app.get("/search", response_class=HTMLResponse, include_in_schema=False)
    async def search_page(request: Request, q: str = "") -> HTMLResponse:
        return page(request, "search.html", title=f"Search: {q}" if q else "Search", active="search",
                    result=model.search(q[:200]), q=q[:200])

    @app.get("/graph", response_class=HTMLResponse, include_in_schema=False)
    async def graph_page(request: Request) -> HTMLResponse:
        graph = await run_in_threadpool(model.sharing_graph)
        return page(request, "graph.html", title="Feature sharing", active="graph", graph=graph)

    @app.get("/confusion", response_class=HTMLResponse, include_in_schema=False)
    async def confusion_page(request: Request) -> HTMLResponse:
        evaluation.start()
        done = evaluation.state == "done"
        return page(request, "confusion.html", title="Confusion matrix", active="confusion",
                    progress=evaluation.status(), confusion=evaluation.confusion() if done else None)

    @app.get("/misclassified", response_class=HTMLResponse, include_in_schema=False)
    async def misclassified_page(request: Request, true: int | None = None, pred: int | None = None,
                                 page_no: int = Query(0, alias="page", ge=0)) -> HTMLResponse:
        for c in (true, pred):
            if c is not None and not 0 <= c < len(model.class_names):
                return not_found(request, f"there is no class {c}")
        evaluation.start()
        listing = _mistakes(evaluation, true, pred, page_no) if evaluation.state == "done" else None
        return page(request, "misclassified.html", title="Misclassified test images", active="mistakes",
                    progress=evaluation.status(), listing=listing, true_class=true, pred_class=pred)

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        if name not in static:
            raise HTTPException(404, "no such asset")
        body, media = static[name]
        return Response(body, media_type=media, headers={"Cache-Control": "public, max-age=3600"})

    # -------------------------------------------------------------------------------------------------- API
    async def _run(request: Request, upload: UploadFile) -> tuple[dict[str, Any], tuple[int, int]]:
        try:
            data = await upload.read()
        except ClientDisconnect:
            raise HTTPException(400, "the client went away during the upload") from None
        with model.batcher.incoming() as submit:
            future = submit(data)  # the batching worker decodes and preprocesses it (UploadError for bad ones)
        out, size, tm = await asyncio.wrap_future(future)
        request.scope["qpm.timing"] = [("queue", tm.queue * 1e3), ("decode", tm.decode * 1e3),
                                       ("infer", tm.infer * 1e3), ("batch", tm.batch)]
        return out, size

    def _check_top_k(top_k: int) -> None:
        if top_k < 1:
            raise UploadError(422, "top_k must be at least 1")

    @app.post("/api/predict", tags=["inference"], response_class=JSONResponse)
    async def api_predict(request: Request,
                          file: UploadFile = File(..., description="The image (any format PIL reads)."),
                          top_k: int = Form(5, description="Classes to list.")) -> JSONResponse:
        """Classify one image: the same JSON as `qpm predict --json` (top-k classes, and the features behind the
        top class with their contributions to its logit)."""
        _check_top_k(top_k)
        out, _ = await _run(request, file)
        result = model.describe(out, top_k)
        # plain JSON types already (as qpm predict --json writes them): no response-model validation per request
        return JSONResponse({"model": str(model.path), "kind": model.classifier.kind,
                             "provider": model.classifier.provider, "num_images": 1, "num_failed": 0,
                             "predictions": [{"path": file.filename or "upload", **result}]})

    @app.post("/api/explain", tags=["inference"])
    async def api_explain(
            request: Request,
            file: UploadFile = File(..., description="The image (any format PIL reads)."),
            class_: str | None = Form(None, alias="class", description="Explain this class (index or name) "
                                                                        "instead of the predicted one."),
            compare: str | None = Form(None, description="Compare with this class (default: the runner-up)."),
            top_k: int = Form(5, description="Classes to list."),
            heatmaps: str = Form("png", description="png (data URIs), array (token grid values) or none."),
            coverage: float | None = Form(None, description="The prediction set's coverage (e.g. 0.9), one the "
                                                            "model is calibrated for; default: its last calibration."),
    ) -> dict[str, Any]:
        """Explain one image: top-k, each feature's contribution to the explained class (activation: the feature's
        mean over the image; peak: its largest value), the comparison with another class (each feature's share of
        the logit difference; `shared_cancel` says whether shared features cancel), and a heatmap per feature
        shown, on one scale (`heatmap_scale`), and the prediction set (`set`, null without a calibration)."""
        _check_top_k(top_k)
        if heatmaps not in ("png", "array", "none"):
            raise UploadError(422, "heatmaps must be png, array or none")
        cls = model.resolve_class(class_)
        cmp_ = model.resolve_class(compare)
        model.calibration(coverage)  # a coverage the model has no calibration for: 422 before any work
        out, size = await _run(request, file)
        result = await run_in_threadpool(model.explain, out, size, class_index=cls, compare=cmp_, top_k=top_k,
                                         heatmaps=heatmaps, coverage=coverage)
        result["image"] = {"name": file.filename or "upload", "width": size[0], "height": size[1]}
        return result

    @app.get("/api/model", tags=["model"])
    async def api_model() -> dict[str, Any]:
        """Title, backbone, dataset, head kind, metrics, the selection's status and gap, the class x feature matrix W,
        the feature labels (names from `qpm name-features`) and the test images."""
        return model.summary()

    @app.get("/api/weights.csv", tags=["model"], response_class=Response)
    async def api_weights_csv() -> Response:
        """W as CSV: one row per class, one column per feature (its label)."""
        rows = [["class", *[model.label(f) for f in model.feature_ids]]]
        rows += [[c, *[f"{w:g}" for w in model.weight[i]]] for i, c in enumerate(model.class_names)]
        return _csv(rows, "weights.csv")

    @app.get("/api/classes", tags=["model"])
    async def api_classes() -> list[dict[str, Any]]:
        """Every class with the features it uses (a dense head: the ones with the largest |weight|)."""
        return [{"index": c, "class": name, "features": [model.feature_ids[k] for k in model.class_columns(c)]}
                for c, name in enumerate(model.class_names)]

    @app.get("/api/classes/{index}", tags=["model"])
    async def api_class(index: int) -> dict[str, Any]:
        """A class: its features with colour, weight, prototypes (patch `box` in the crop's pixels) and the classes
        sharing them, its most similar classes, and its test images."""
        check_class(index)
        return {**model.class_info(index), "examples": _examples(model, index)}

    @app.get("/api/features/{fid}", tags=["model"])
    async def api_feature(fid: int) -> dict[str, Any]:
        """A selected feature by its dense id: name, the classes using it, statistics and prototypes (each with its
        patch `box` in the crop's pixels, `peak`, and `source`: the whole training image when the run's data is
        here)."""
        if fid not in model.column_of:
            raise HTTPException(404, f"feature {fid} is not one of the model's selected features "
                                     f"({', '.join(map(str, model.feature_ids[:8]))}, ...)")
        return model.feature_info(fid)

    @app.get("/api/prototypes/{fid}/{rank}.png", tags=["model"], response_class=Response)
    async def api_prototype(fid: int, rank: int) -> Response:
        """A training prototype of a feature (the ``rank``-th most activating patch with context), as PNG."""
        png = model.prototype_png(fid, rank)
        if png is None:
            raise HTTPException(404, f"feature {fid} has no prototype {rank}")
        return Response(png, media_type="image/png", headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/api/prototypes/{fid}/{rank}/source.png", tags=["model"], response_class=Response)
    async def api_prototype_source(fid: int, rank: int) -> Response:
        """The whole training image of a prototype (when the run's training data can be opened here), as PNG."""
        png = await run_in_threadpool(model.prototype_source, fid, rank)
        if png is None:
            raise HTTPException(404, f"the training image of prototype {rank} of feature {fid} is not available")
        return Response(png, media_type="image/png", headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/api/search", tags=["model"])
    async def api_search(q: str = Query(..., max_length=200, description="Part of a class or feature name, or a "
                                                                          "feature id (12 or f12).")) -> dict:
        """Classes and features whose name contains the query (any case); features also by id."""
        return model.search(q)

    @app.get("/api/graph", tags=["model"])
    async def api_graph() -> dict[str, Any]:
        """The feature-sharing graph: classes (with a layout), pairs of classes with the features they share, and the
        classes using each feature (empty for a dense head, where every class uses every feature)."""
        return await run_in_threadpool(model.sharing_graph)

    # ------------------------------------------------------------------------------------------ evaluation
    def _evaluated(wait: bool) -> JSONResponse | None:
        if evaluation.state == "unavailable":
            raise HTTPException(404, evaluation.tests.reason)
        evaluation.start()
        if evaluation.state != "done" and not wait:
            return JSONResponse(evaluation.status(), status_code=202)
        return None

    @app.get("/api/confusion", tags=["evaluation"])
    async def api_confusion(wait: bool = Query(False, description="Wait for the evaluation instead of "
                                                                   "answering 202 with its progress.")) -> Any:
        """The confusion matrix on the test images (`matrix[true][predicted]`), `per_class_accuracy`, support and
        accuracy. Computed once, on the first call (202 with the progress until then, or `wait=true`)."""
        early = _evaluated(wait)
        if early is not None:
            return early
        await run_in_threadpool(evaluation.wait)
        if evaluation.state == "failed":
            raise HTTPException(500, f"the evaluation failed: {evaluation.error}")
        return evaluation.confusion()

    @app.get("/api/confusion.csv", tags=["evaluation"], response_class=Response)
    async def api_confusion_csv() -> Response:
        """The confusion matrix as CSV (rows: true class; columns: predicted class; then support and accuracy)."""
        early = _evaluated(False)
        if early is not None:
            return early
        cm = evaluation.confusion()
        rows = [["true \\ predicted", *cm["classes"], "support", "accuracy"]]
        rows += [[c, *cm["matrix"][i], cm["support"][i], "" if a is None else f"{a:.6g}"]
                 for i, (c, a) in enumerate(zip(cm["classes"], cm["per_class_accuracy"], strict=True))]
        return _csv(rows, "confusion.csv")

    @app.get("/api/misclassified", tags=["evaluation"])
    async def api_misclassified(true: int | None = None, pred: int | None = None,
                                page: int = Query(0, ge=0), per_page: int = Query(PER_PAGE, ge=1, le=1000),
                                wait: bool = False) -> Any:
        """Misclassified test images, the most confident mistakes first (optionally of one `true` and/or `pred`
        class): each with its true and predicted class and the features that decided between them."""
        for c in (true, pred):
            if c is not None:
                check_class(c)
        early = _evaluated(wait)
        if early is not None:
            return early
        await run_in_threadpool(evaluation.wait)
        return _mistakes(evaluation, true, pred, page, per_page)

    @app.get("/api/misclassified.csv", tags=["evaluation"], response_class=Response)
    async def api_misclassified_csv() -> Response:
        """Every misclassified test image as CSV: image, true class, predicted class, probabilities."""
        early = _evaluated(False)
        if early is not None:
            return early
        rows = [["image", "name", "true", "predicted", "p_true", "p_predicted"]]
        for r in evaluation.mistakes():
            m = evaluation.mistake(r)
            rows.append([m["image"], m["name"], m["true"]["class"], m["predicted"]["class"],
                         f"{m['true']['probability']:.6g}", f"{m['predicted']['probability']:.6g}"])
        return _csv(rows, "misclassified.csv")

    @app.get("/api/test-images/{index}.png", tags=["evaluation"], response_class=Response)
    async def api_test_image(index: int, thumb: bool = False) -> Response:
        """A test image: lossless PNG of the very pixels the evaluation saw (`thumb=true`: a small JPEG)."""
        tests = model.test_images
        if not tests.available or not 0 <= index < len(tests):
            raise HTTPException(404, f"there is no test image {index}")
        from qpmcli.serve.testset import THUMB_SIDE, png_bytes

        def encode() -> bytes:
            image = tests.image(index)
            return png_bytes(image, THUMB_SIDE, "JPEG") if thumb else png_bytes(image)

        try:
            body = await run_in_threadpool(encode)
        except (OSError, ValueError, QpmError) as exc:
            raise HTTPException(404, f"test image {index} cannot be read: {exc}") from None
        return Response(body, media_type="image/jpeg" if thumb else "image/png",
                        headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/api/health", tags=["server"])
    async def api_health() -> dict[str, Any]:
        """Liveness, the ONNX Runtime provider, micro-batching counters, the evaluation's state, and whether PyTorch
        was ever imported."""
        return {"status": "ok", "model": str(model.path), "provider": model.classifier.provider,
                "uptime_s": round(time.time() - started, 3), "batching": model.batcher.stats(),
                "evaluation": evaluation.status(), "torch_imported": "torch" in sys.modules}

    return app


def _weight(w: float, head: str) -> str:
    """A weight as the pages print it: ``+1`` for a binary head, three significant digits otherwise (never a
    real-valued weight rounded to ``+0``)."""
    return f"{w:+g}" if head == "binary" else f"{w:+.3g}"


def _csv(rows: list[list[Any]], name: str) -> Response:
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return Response(buf.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


def _examples(model: ServedModel, index: int, n: int = 4) -> list[dict[str, Any]]:
    """Up to ``n`` test images of a class (spread over its images) for the class page."""
    tests = model.test_images
    if not tests.available or not tests.has_pictures:
        return []
    rows = tests.of_class(index)
    picked = sorted({rows[int(i * len(rows) / min(n, len(rows)))] for i in range(min(n, len(rows)))}) if rows else []
    return [{"index": i, "name": tests.name(i), "url": f"/api/test-images/{i}.png",
             "thumb": f"/api/test-images/{i}.png?thumb=1"} for i in picked]


def _mistakes(evaluation: Any, true: int | None, pred: int | None, page: int,
              per_page: int = PER_PAGE) -> dict[str, Any]:
    rows = evaluation.mistakes(true, pred)
    chunk = rows[page * per_page:(page + 1) * per_page]
    return {"total": len(rows), "page": page, "per_page": per_page, "pages": -(-len(rows) // per_page),
            "true": true, "pred": pred, "items": [evaluation.mistake(r) for r in chunk]}

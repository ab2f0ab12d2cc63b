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

from fastapi import File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from qpmcli.serve.engine import DEFAULT_MAX_UPLOAD, METRIC_COLUMNS, ServedModel, UploadError

STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".png": "image/png",
                ".svg": "image/svg+xml"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
# Pages run only our own scripts (no inline script, no eval); images may be data URIs (heatmaps) or blobs (uploads).
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def _static_files() -> dict[str, tuple[bytes, str]]:
    out = {}
    for entry in resources.files("qpmcli.serve").joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in STATIC_TYPES:
            out[entry.name] = (entry.read_bytes(), STATIC_TYPES[suffix])
    return out


class ResponseHeaders:
    """Pure ASGI middleware (no extra task or stream per request, unlike ``@app.middleware``): the security headers
    on every response, the page CSP on our HTML pages, and a ``Server-Timing`` header on every response -- ``total``
    (request arrival to response start, multipart parsing included) plus what the handler put in
    ``scope["qpm.timing"]`` (the inference worker's queue, decode and infer milliseconds)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        docs = scope.get("path", "").startswith("/docs")

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                for key, value in SECURITY_HEADERS.items():
                    if key.lower().encode() not in present:
                        headers.append((key.lower().encode(), value.encode()))
                ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
                if ctype.startswith(b"text/html") and not docs:
                    headers = [(k, v) for k, v in headers if k.lower() != b"content-security-policy"]
                    headers.append((b"content-security-policy", PAGE_CSP.encode()))
                parts = [f"{name};dur={ms:.2f}" for name, ms in scope.get("qpm.timing", [])]
                parts.append(f"total;dur={(time.perf_counter() - t0) * 1e3:.2f}")
                headers.append((b"server-timing", ", ".join(parts).encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class UploadLimit:
    """ASGI middleware: request bodies above ``limit`` bytes get 413 with a JSON message, known from Content-Length
    before the app runs or as soon as a streamed body passes the limit (the app then sees a disconnect).

    Before answering, the rest of the body is read and dropped (up to :data:`DRAIN_CAP` bytes), because a server
    that closes a connection with unread data makes the client's TCP stack reset it, and the client never sees the
    413; a larger body is answered at once and the connection closed.
    """

    DRAIN_CAP = 64 << 20

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = int(limit)

    def _message(self) -> bytes:
        import json

        mb = self.limit / 2**20
        return json.dumps({"detail": f"the upload is larger than the server's limit of {mb:.3g} MB"}).encode()

    async def _reply(self, receive: Any, send: Any, more: bool, read: int) -> None:
        while more and read <= self.DRAIN_CAP:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away: nobody to answer
            read += len(message.get("body", b""))
            more = message.get("more_body", False)
        body = self._message()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = None
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
        if length is not None and length > self.limit:
            await self._reply(receive, send, more=length <= self.DRAIN_CAP, read=0)
            return
        total = 0
        replied = False
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal total, replied
            if replied:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.limit:
                    replied = True
                    if not started:
                        await self._reply(receive, send, more=message.get("more_body", False), read=total)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal started
            if replied:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


def create_app(model: ServedModel, *, max_upload: int = DEFAULT_MAX_UPLOAD) -> Any:
    """The ASGI app serving ``model`` (pages, API, OpenAPI at /docs with its assets served locally)."""
    from fastapi_offline import FastAPIOffline

    from qpmcli import __version__

    app = FastAPIOffline(
        title="qpm serve", version=__version__,
        description=f"Inference and explanations for {model.path.name} ({model.meta.backbone}, "
                    f"{len(model.class_names)} classes, {len(model.feature_ids)} features) with ONNX Runtime.",
        static_url="/docs-assets", redoc_url=None)
    templates = Jinja2Templates(directory=str(resources.files("qpmcli.serve").joinpath("templates")))
    templates.env.autoescape = True
    static = _static_files()
    started = time.time()
    app.state.model = model

    app.add_middleware(UploadLimit, limit=max_upload)
    app.add_middleware(ResponseHeaders)  # outermost: its total covers the upload limit and the parsing

    @app.exception_handler(UploadError)
    async def upload_error(_request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        base = {"model": model, "model_name": model.path.name, "backbone": model.meta.backbone}
        return templates.TemplateResponse(request, name, {**base, **context}, status_code=status)

    def not_found(request: Request, what: str) -> HTMLResponse:
        return page(request, "error.html", status=404, title="Not found", message=what)

    # ------------------------------------------------------------------------------------------------ pages
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def overview(request: Request) -> HTMLResponse:
        summary = model.summary()
        metrics = [(label, summary["metrics"].get(key)) for key, label in METRIC_COLUMNS
                   if key in summary["metrics"]]
        return page(request, "overview.html", title="Model", summary=summary, metrics=metrics,
                    classes=list(enumerate(model.class_names)), uses=model.uses.tolist(),
                    feature_ids=model.feature_ids)

    @app.get("/class/{index}", response_class=HTMLResponse, include_in_schema=False)
    async def class_page(request: Request, index: int) -> HTMLResponse:
        if not 0 <= index < len(model.class_names):
            return not_found(request, f"there is no class {index} (the model has {len(model.class_names)})")
        info = model.class_info(index)
        return page(request, "class.html", title=info["class"], info=info)

    @app.get("/feature/{fid}", response_class=HTMLResponse, include_in_schema=False)
    async def feature_page(request: Request, fid: int) -> HTMLResponse:
        if fid not in model.column_of:
            return not_found(request, f"feature {fid} is not one of the model's selected features")
        info = model.feature_info(fid)
        return page(request, "feature.html", title=f"Feature {fid}", info=info)

    @app.get("/explain", response_class=HTMLResponse, include_in_schema=False)
    async def explain_page(request: Request) -> HTMLResponse:
        return page(request, "explain.html", title="Explain an image",
                    class_list=[{"index": i, "class": c} for i, c in enumerate(model.class_names)])

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
    ) -> dict[str, Any]:
        """Explain one image: top-k, each feature's contribution to the explained class, the comparison with
        another class (shared features cancel in the logit difference), and a heatmap per feature shown."""
        _check_top_k(top_k)
        if heatmaps not in ("png", "array", "none"):
            raise UploadError(422, "heatmaps must be png, array or none")
        cls = model.resolve_class(class_)
        cmp_ = model.resolve_class(compare)
        out, size = await _run(request, file)
        result = await run_in_threadpool(model.explain, out, size, class_index=cls, compare=cmp_, top_k=top_k,
                                         heatmaps=heatmaps)
        result["image"] = {"name": file.filename or "upload", "width": size[0], "height": size[1]}
        return result

    @app.get("/api/model", tags=["model"])
    async def api_model() -> dict[str, Any]:
        """Backbone, dataset, metrics, the selection's status and gap, and the class x feature matrix W."""
        return model.summary()

    @app.get("/api/classes", tags=["model"])
    async def api_classes() -> list[dict[str, Any]]:
        """Every class with the features it uses."""
        return [{"index": c, "class": name,
                 "features": [model.feature_ids[k] for k in range(len(model.feature_ids)) if model.uses[c, k]]}
                for c, name in enumerate(model.class_names)]

    @app.get("/api/classes/{index}", tags=["model"])
    async def api_class(index: int) -> dict[str, Any]:
        """A class: its features with their prototypes and the classes sharing them, and its most similar classes."""
        if not 0 <= index < len(model.class_names):
            raise HTTPException(404, f"there is no class {index}")
        return model.class_info(index)

    @app.get("/api/features/{fid}", tags=["model"])
    async def api_feature(fid: int) -> dict[str, Any]:
        """A selected feature by its dense id: the classes using it, statistics and prototypes."""
        if fid not in model.column_of:
            raise HTTPException(404, f"feature {fid} is not one of the model's selected features "
                                     f"({', '.join(map(str, model.feature_ids[:8]))}, ...)")
        return model.feature_info(fid)

    @app.get("/api/prototypes/{fid}/{rank}.png", tags=["model"], response_class=Response)
    async def api_prototype(fid: int, rank: int) -> Response:
        """A training prototype of a feature (the ``rank``-th most activating patch), as PNG."""
        png = model.prototype_png(fid, rank)
        if png is None:
            raise HTTPException(404, f"feature {fid} has no prototype {rank}")
        return Response(png, media_type="image/png", headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/api/health", tags=["server"])
    async def api_health() -> dict[str, Any]:
        """Liveness, the ONNX Runtime provider, micro-batching counters, and whether PyTorch was ever imported."""
        return {"status": "ok", "model": str(model.path), "provider": model.classifier.provider,
                "uptime_s": round(time.time() - started, 3), "batching": model.batcher.stats(),
                "torch_imported": "torch" in sys.modules}

    return app

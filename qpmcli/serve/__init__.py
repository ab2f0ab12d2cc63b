"""``qpm serve``: the model explorer and inference server (FastAPI + uvicorn, ONNX Runtime, no PyTorch).

Pages: the model overview (metrics, selection, the interactive class x feature grid), a page per class and per
feature (training prototypes with their patch boxes, shared features, similar classes, test images with heatmaps),
the explain page (upload an image: top-k, contributions, heatmaps beside prototypes, comparison with any class),
search (classes and features by name), the feature-sharing graph, and, on the run's test split or
``--test-images DIR``, the confusion matrix with per-class accuracy and the misclassified images. API:
``POST /api/predict`` (the JSON of ``qpm predict --json``), ``POST /api/explain``, ``GET /api/model``,
``/api/classes``, ``/api/features/{id}``, ``/api/confusion``, ``/api/misclassified``, ``/api/search``,
``/api/graph``; the OpenAPI page is ``/docs``. Every asset is served by the server itself.

:func:`serve` binds the socket itself (a clear error when the port is taken; port 0 picks a free one) and prints the
URL it serves on before handing the socket to uvicorn.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from qpmcli.errors import ConfigError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 when the host is one), or a :class:`ConfigError`."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be 0..65535, not {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve --host {host!r}: {exc.strerror}") from exc
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        hint = "; choose another --port (0 picks a free one)" if exc.errno in (98, 48, 10048) else ""
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from exc
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(model: str | os.PathLike[str] | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          device: str = "auto", max_upload_mb: float = 20.0, max_batch: int = 16, batch_window_ms: float = 4.0,
          log_level: str = "warning", say: Callable[[str], None] | None = None, settings: Any = None,
          test_images: str | os.PathLike[str] | None = None) -> None:
    """Serve MODEL until interrupted (see the module docstring)."""
    import threading

    say = say or (lambda m: print(m, flush=True))
    if max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb must be positive, not {max_upload_mb}")
    if batch_window_ms < 0:
        raise ConfigError(f"--batch-window-ms must be >= 0, not {batch_window_ms}")
    sock = bind(host, port)
    loaded: dict[str, Any] = {}

    def load() -> None:  # ONNX Runtime loads the graph while this thread imports the web stack (start-up time)
        try:
            from qpmcli.serve.engine import load_served_model

            loaded["model"] = load_served_model(model, device=device, max_batch=max_batch,
                                                window=batch_window_ms / 1e3, settings=settings,
                                                test_images=test_images, say=say)
        except BaseException as exc:  # re-raised below, in the caller's thread
            loaded["error"] = exc

    loader = threading.Thread(target=load, name="qpm-serve-load", daemon=True)
    loader.start()
    try:
        import uvicorn

        from qpmcli.serve.app import create_app
    finally:
        loader.join()
    if "error" in loaded:
        sock.close()
        raise loaded["error"]
    served = loaded["model"]
    app = create_app(served, max_upload=int(max_upload_mb * 2**20))
    url = url_of(sock)
    say(f"qpm serve: {served.path} ({len(served.class_names)} classes, {served.classifier.provider})")
    tests = served.test_images.describe()
    say(f"test images: {tests['images']} ({tests['source']}), evaluated on the first visit of /confusion"
        if tests["available"] else f"no confusion matrix: {tests['reason']}")
    if host not in LOOPBACK:
        say(f"listening on {host}: the server is reachable from other machines")
    say(f"open {url}/ (explorer), {url}/explain, API docs at {url}/docs; Ctrl+C stops")
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5,
                            server_header=False)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        served.close()
        sock.close()
    sys.stdout.flush()


def create_app(*args: Any, **kwargs: Any) -> Any:
    """See :func:`qpmcli.serve.app.create_app`."""
    from qpmcli.serve.app import create_app as _create

    return _create(*args, **kwargs)


__all__ = ["bind", "create_app", "serve"]

"""ASGI middleware of ``qpm serve``: security headers, the page CSP and ``Server-Timing`` on every response, and the
upload size limit (413 before the app reads the body)."""

from __future__ import annotations

import time
from typing import Any

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
# Pages run only our own scripts (no inline script, no eval); images may be data URIs (heatmaps) or blobs (uploads).
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


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

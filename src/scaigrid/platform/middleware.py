"""Pure ASGI middleware of the controller (no ``BaseHTTPMiddleware``: it buffers streaming
responses and does not pass WebSockets through cleanly).

* :class:`RequestContextMiddleware` — request id (``req_`` + ULID) in
  ``request.state.request_id``, the ``X-Request-Id`` response header and every log line of the
  request; HTTP metrics and one access-log entry per request; unexpected exceptions become
  500 ``INTERNAL_ERROR`` (logged with the request id, nothing leaked to the caller).
* :class:`BodyLimitMiddleware` — request bodies over ``Settings.max_body_bytes`` get 413
  ``VALIDATION_ERROR``, except on routes whose endpoint is marked with :func:`streaming_body`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scaigrid.errors import InternalError
from scaigrid.platform.envelope import error_response, request_id_from_scope

log = structlog.get_logger(__name__)

_STREAMING_BODY_ATTR = "__scaigrid_streaming_body__"
_QUIET_PATHS = frozenset({"/health", "/metrics"})
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

EndpointT = TypeVar("EndpointT", bound=Callable[..., Any])


def streaming_body(endpoint: EndpointT) -> EndpointT:
    """Mark a route endpoint as reading its body as a stream: no ``max_body_bytes`` limit.

    Use on upload routes that consume ``request.stream()`` (file uploads, storage objects)::

        @router.put("/bunkers/{bunker_id}/files")
        @streaming_body
        async def upload_file(request: Request, ...) -> JSONResponse: ...

    The route is then responsible for its own size limits.
    """
    setattr(endpoint, _STREAMING_BODY_ATTR, True)
    return endpoint


class HttpMetrics:
    """Request counters and latency histograms registered in one app's registry.

    Metrics: ``scaigrid_http_requests_total{method,status}`` and
    ``scaigrid_http_request_duration_seconds{method}`` (time to the end of the response).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "scaigrid_http_requests_total",
            "HTTP requests answered, by method and status code",
            ["method", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "scaigrid_http_request_duration_seconds",
            "Time from request start to the end of the response, in seconds",
            ["method"],
            registry=registry,
        )

    def observe(self, method: str, status: int, seconds: float) -> None:
        """Record one answered request."""
        label = method if method in _KNOWN_METHODS else "other"
        self.requests.labels(method=label, status=str(status)).inc()
        self.duration.labels(method=label).observe(seconds)


class RequestContextMiddleware:
    """Request id, access log, HTTP metrics and the last-resort 500 envelope.

    Args:
        app: the next ASGI app.
        metrics: where HTTP requests are counted.
    """

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = request_id_from_scope(scope)
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            if scope["type"] == "websocket":
                await self.app(scope, receive, send)
                return
            await self._http(scope, receive, send, request_id)

    async def _http(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers.append("X-Request-Id", request_id)
                for name, value in scope.get("state", {}).get("ratelimit_headers", ()):
                    headers.raw.append((name, value))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("http.unhandled_error", method=scope["method"], path=scope["path"])
            if response_started:
                raise
            response = error_response(InternalError("Internal server error"), request_id)
            await response(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.observe(scope["method"], status, elapsed)
            level = log.debug if scope["path"] in _QUIET_PATHS else log.info
            level(
                "http.request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=round(elapsed * 1000, 1),
            )


class RequestBodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` once a non-streaming body passes the limit (rendered as 413
    ``VALIDATION_ERROR`` by the exception handlers).

    FastAPI re-raises ``HTTPException`` from body parsing unchanged, so this reaches the
    handler whether the body is read by FastAPI or by the endpoint.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body exceeds {limit} bytes")
        self.limit = limit


def _is_streaming_route(scope: Scope) -> bool:
    endpoint = getattr(scope.get("route"), "endpoint", None)
    return bool(getattr(endpoint, _STREAMING_BODY_ATTR, False))


class BodyLimitMiddleware:
    """Refuse request bodies larger than ``max_body_bytes`` (by ``Content-Length`` or by
    counting the bytes received) unless the matched route is marked :func:`streaming_body`.

    The decision is taken on the first ``receive()``, which happens after routing, so the
    matched route (``scope["route"]``) is known and no body byte is read before it.

    Args:
        app: the next ASGI app.
        max_body_bytes: largest accepted body, in bytes.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        exempt: bool | None = None
        received = 0

        async def limited_receive() -> Message:
            nonlocal exempt, received
            if exempt is None:
                exempt = _is_streaming_route(scope)
                declared = Headers(scope=scope).get("content-length", "")
                if not exempt and declared.isdigit() and int(declared) > limit:
                    raise RequestBodyTooLarge(limit)
            message = await receive()
            if not exempt and message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestBodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)

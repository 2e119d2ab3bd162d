"""Exception handlers: every error a caller sees leaves in the error envelope (SPEC §1.5).

* :class:`~scaigrid.errors.ScaiGridError` → its own code and status.
* :class:`~fastapi.exceptions.RequestValidationError` (bad body, query, path; malformed JSON)
  → 422 ``VALIDATION_ERROR`` with ``details = [{"field": "network_allowlist[1]", "message"}]``.
* Starlette HTTP errors (unknown route 404, wrong method 405, body too large 413, …) → the
  closest platform code.

An error raised while a WebSocket upgrade is being handled (e.g. by ``current_principal``) is
sent as the same envelope in the HTTP denial response (uvicorn supports the ASGI extension).
Unexpected exceptions are turned into 500 ``INTERNAL_ERROR`` by
:class:`scaigrid.platform.middleware.RequestContextMiddleware`.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any, cast

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from scaigrid import errors
from scaigrid.platform.envelope import error_response, request_id_from_scope
from scaigrid.platform.middleware import RequestBodyTooLarge


class MethodNotAllowed(errors.ScaiGridError):
    """``METHOD_NOT_ALLOWED`` (405): the path exists but not with this method."""

    code = "METHOD_NOT_ALLOWED"
    status_code = 405


_BODY_PREFIX = "body"


def field_path(loc: Sequence[int | str]) -> str:
    """Render a pydantic error location as a field path: ``("body", "a", 1, "b")`` →
    ``"a[1].b"``. Body fields drop the ``body`` segment; query, path and header fields keep
    their location (``"query.limit"``). A bare ``("body",)`` stays ``"body"``."""
    parts = list(loc)
    if len(parts) > 1 and parts[0] == _BODY_PREFIX:
        parts = parts[1:]
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _detail(error: dict[str, Any]) -> dict[str, str]:
    if error.get("type") == "json_invalid":
        reason = error.get("ctx", {}).get("error", "invalid JSON")
        return {"field": _BODY_PREFIX, "message": f"Malformed JSON: {reason}"}
    message = str(error.get("msg", "invalid value"))
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return {"field": field_path(error.get("loc", ())), "message": message}


async def scaigrid_error_handler(request: Request, exc: Exception) -> Response:
    """Render a :class:`~scaigrid.errors.ScaiGridError`."""
    return error_response(cast(errors.ScaiGridError, exc), request_id_from_scope(request.scope))


async def validation_error_handler(request: Request, exc: Exception) -> Response:
    """Render a request validation failure as 422 ``VALIDATION_ERROR`` with field details."""
    details = [_detail(e) for e in cast(RequestValidationError, exc).errors()]
    error = errors.ValidationFailed("The request is not valid", details=details)
    return error_response(error, request_id_from_scope(request.scope))


def _from_http_exception(exc: StarletteHTTPException, request: Request) -> errors.ScaiGridError:
    if isinstance(exc, RequestBodyTooLarge):
        return errors.PayloadTooLarge(
            f"The request body exceeds {exc.limit} bytes",
            details=[{"field": "body", "message": f"larger than {exc.limit} bytes"}],
        )
    status = exc.status_code
    if status == 404:
        return errors.NotFound(f"No route for {request.method} {request.url.path}")
    if status == 405:
        return MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    if status == 413:
        return errors.PayloadTooLarge("The request body is too large")
    if status in (400, 422):
        return errors.ValidationFailed(str(exc.detail))
    if status == 401:
        return errors.AuthTokenInvalid(str(exc.detail))
    if status == 403:
        return errors.AuthzPermissionDenied(str(exc.detail))
    if status >= 500:
        return errors.InternalError("Internal server error")
    error = errors.ScaiGridError(str(exc.detail))
    error.code, error.status_code = "HTTP_ERROR", status
    return error


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    """Render a Starlette/FastAPI ``HTTPException`` in the platform envelope."""
    http_exc = cast(StarletteHTTPException, exc)
    error = _from_http_exception(http_exc, request)
    response = error_response(error, request_id_from_scope(request.scope))
    if http_exc.headers:
        response.headers.update(http_exc.headers)
    return response


#: Handlers for ``FastAPI(exception_handlers=...)``.
EXCEPTION_HANDLERS: dict[
    int | type[Exception], Callable[[Request, Any], Coroutine[Any, Any, Response]]
] = {
    errors.ScaiGridError: scaigrid_error_handler,
    RequestValidationError: validation_error_handler,
    StarletteHTTPException: http_exception_handler,
}

"""Response envelopes (SPEC §1.4, §1.5).

* single object: ``{"status": "ok", "data": {...}}``
* list: ``{"status": "ok", "data": [...], "has_more": bool, "next_cursor": str | null}``
* error: ``{"status": "error", "error": {"code", "message", "details"?, "retry_after"?},
  "meta": {"request_id": "req_..."}}``

Datetimes in ``data`` are rendered as RFC 3339 UTC with a ``Z`` suffix.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from starlette.types import Scope

from scaigrid.errors import ScaiGridError
from scaigrid.ids import new_id


def _rfc3339(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def encode(data: Any) -> Any:
    """Turn ``data`` (dicts, lists, pydantic models, datetimes…) into JSON-ready values."""
    return jsonable_encoder(data, custom_encoder={datetime: _rfc3339})


def ok(data: Any, status_code: int = 200) -> JSONResponse:
    """Return ``{"status": "ok", "data": data}``; use ``status_code=201`` for creates."""
    return JSONResponse({"status": "ok", "data": encode(data)}, status_code=status_code)


def ok_list(items: Sequence[Any], next_cursor: str | None) -> JSONResponse:
    """Return one page of a list; ``has_more`` is true exactly when ``next_cursor`` is set."""
    return JSONResponse(
        {
            "status": "ok",
            "data": encode(list(items)),
            "has_more": next_cursor is not None,
            "next_cursor": next_cursor,
        }
    )


def request_id_from_scope(scope: Scope) -> str:
    """Return the request id set by the request-context middleware (a fresh one if absent)."""
    state = scope.setdefault("state", {})
    request_id: str = state.setdefault("request_id", new_id("req"))
    return request_id


def error_response(error: ScaiGridError, request_id: str) -> JSONResponse:
    """Return the error envelope for ``error`` with its HTTP status.

    ``Retry-After`` (seconds) is also sent as a header when ``error.retry_after`` is set.
    """
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return JSONResponse(
        {
            "status": "error",
            "error": encode(error.to_dict()),
            "meta": {"request_id": request_id},
        },
        status_code=error.status_code,
        headers=headers,
    )

"""Envelopes and errors on the wire: success and list shapes, 422 field paths, malformed JSON,
413 over max_body_bytes (and not on streaming routes), 404/405, 500 without leaks, request ids.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from pydantic import BaseModel, Field
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from scaigrid import errors
from scaigrid.platform.envelope import ok, ok_list
from scaigrid.platform.middleware import streaming_body

REQUEST_ID = re.compile(r"^req_[0-9A-HJKMNP-TV-Z]{26}$")


class Interface(BaseModel):
    name: str


class Body(BaseModel):
    network_allowlist: list[str] = Field(max_length=5)
    interfaces: list[Interface] = []
    memory_mb: int = 512


@pytest.fixture
def test_app(platform_app: FastAPI) -> FastAPI:
    async def echo(body: Body) -> Any:
        return ok(body.model_dump(), status_code=201)

    async def page() -> Any:
        return ok_list([{"at": datetime(2026, 5, 9, 12, tzinfo=UTC)}], "cursor-2")

    async def last_page() -> Any:
        return ok_list([], None)

    async def limited() -> Any:
        raise errors.RateLimited("slow down", retry_after=30)

    async def boom() -> Any:
        raise RuntimeError("password=hunter2 at /srv/secret")

    @streaming_body
    async def upload(request: Request) -> Any:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return ok({"size": size})

    platform_app.add_api_route("/test/echo", echo, methods=["POST"])
    platform_app.add_api_route("/test/page", page)
    platform_app.add_api_route("/test/last-page", last_page)
    platform_app.add_api_route("/test/limited", limited)
    platform_app.add_api_route("/test/boom", boom)
    platform_app.add_api_route("/test/upload", upload, methods=["PUT"])
    return platform_app


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert body["status"] == "error"
    assert body["meta"]["request_id"] == response.headers["x-request-id"]
    assert REQUEST_ID.match(body["meta"]["request_id"])
    return dict(body["error"])


async def test_success_and_list_envelopes(
    test_app: FastAPI, platform_client: httpx.AsyncClient
) -> None:
    created = await platform_client.post("/test/echo", json={"network_allowlist": ["a.example"]})
    assert created.status_code == 201
    assert created.json() == {
        "status": "ok",
        "data": {"network_allowlist": ["a.example"], "interfaces": [], "memory_mb": 512},
    }
    page = (await platform_client.get("/test/page")).json()
    assert page == {
        "status": "ok",
        "data": [{"at": "2026-05-09T12:00:00Z"}],
        "has_more": True,
        "next_cursor": "cursor-2",
    }
    last = (await platform_client.get("/test/last-page")).json()
    assert (last["has_more"], last["next_cursor"]) == (False, None)


async def test_validation_errors_name_field_paths(
    test_app: FastAPI, platform_client: httpx.AsyncClient
) -> None:
    response = await platform_client.post(
        "/test/echo",
        json={"network_allowlist": ["ok", 7], "interfaces": [{"name": "a"}, {}], "memory_mb": "x"},
    )
    assert response.status_code == 422
    error = _error(response)
    assert error["code"] == "VALIDATION_ERROR"
    fields = {detail["field"] for detail in error["details"]}
    assert fields == {"network_allowlist[1]", "interfaces[1].name", "memory_mb"}
    assert all(detail["message"] for detail in error["details"])


async def test_missing_body_is_422(test_app: FastAPI, platform_client: httpx.AsyncClient) -> None:
    missing = await platform_client.post("/test/echo")
    assert missing.status_code == 422
    assert _error(missing)["details"][0]["field"] == "body"


async def test_malformed_json_is_422(test_app: FastAPI, platform_client: httpx.AsyncClient) -> None:
    response = await platform_client.post(
        "/test/echo",
        content=b'{"network_allowlist": [',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422
    error = _error(response)
    assert error["code"] == "VALIDATION_ERROR"
    assert error["details"][0]["field"] == "body"


async def test_oversized_json_is_413(
    test_app: FastAPI, platform_client: httpx.AsyncClient, platform_app: FastAPI
) -> None:
    limit = platform_app.state.settings.max_body_bytes
    big = {"network_allowlist": ["x" * (limit + 10)]}
    response = await platform_client.post("/test/echo", json=big)
    assert response.status_code == 413
    error = _error(response)
    assert error["code"] == "VALIDATION_ERROR"
    assert error["details"] == [{"field": "body", "message": f"larger than {limit} bytes"}]


async def test_oversized_body_without_content_length_is_413(
    test_app: FastAPI, platform_client: httpx.AsyncClient, platform_app: FastAPI
) -> None:
    limit = platform_app.state.settings.max_body_bytes

    async def chunks() -> Any:
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    response = await platform_client.post(
        "/test/echo", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert _error(response)["code"] == "VALIDATION_ERROR"


async def test_streaming_routes_are_not_limited(
    test_app: FastAPI, platform_client: httpx.AsyncClient, platform_app: FastAPI
) -> None:
    size = platform_app.state.settings.max_body_bytes * 3
    response = await platform_client.put(
        "/test/upload", content=b"\0" * size, headers={"content-type": "application/octet-stream"}
    )
    assert response.status_code == 200
    assert response.json()["data"] == {"size": size}


async def test_unknown_route_and_method(platform_client: httpx.AsyncClient) -> None:
    missing = await platform_client.get("/v1/nothing-here")
    assert missing.status_code == 404
    assert _error(missing)["code"] == "NOT_FOUND"
    wrong = await platform_client.delete("/health")
    assert wrong.status_code == 405
    assert _error(wrong)["code"] == "METHOD_NOT_ALLOWED"


async def test_rate_limit_error_carries_retry_after(
    test_app: FastAPI, platform_client: httpx.AsyncClient
) -> None:
    response = await platform_client.get("/test/limited")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "30"
    assert _error(response) == {"code": "RATE_LIMITED", "message": "slow down", "retry_after": 30}


async def test_unexpected_exception_is_500_without_internals(
    test_app: FastAPI, platform_client: httpx.AsyncClient
) -> None:
    with capture_logs(processors=[merge_contextvars]) as logs:
        response = await platform_client.get("/test/boom")
    assert response.status_code == 500
    error = _error(response)
    assert error == {"code": "INTERNAL_ERROR", "message": "Internal server error"}
    assert "hunter2" not in response.text
    [entry] = [e for e in logs if e["event"] == "http.unhandled_error"]
    assert entry["request_id"] == response.headers["x-request-id"]
    assert entry["log_level"] == "error" and entry["exc_info"]


async def test_every_response_has_a_fresh_request_id(platform_client: httpx.AsyncClient) -> None:
    ids = {(await platform_client.get("/health")).headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3
    assert all(REQUEST_ID.match(request_id) for request_id in ids)

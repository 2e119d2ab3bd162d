"""Unauthenticated /health and /metrics, per-app metrics registries, module catalogue."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import Counter

from scaigrid import __version__
from scaigrid.platform.app import create_app


async def test_health_needs_no_credential(platform_client: httpx.AsyncClient) -> None:
    response = await platform_client.get("/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "data": {"status": "healthy", "version": __version__},
    }


async def test_metrics_needs_no_credential_and_counts_requests(
    platform_client: httpx.AsyncClient,
) -> None:
    await platform_client.get("/health")
    response = await platform_client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'scaigrid_http_requests_total{method="GET",status="200"}' in response.text


async def test_modules_register_metrics_in_their_own_app(
    platform_app: FastAPI, platform_client: httpx.AsyncClient, settings_for: Any, tmp_path: Path
) -> None:
    Counter("module_things_total", "things", registry=platform_app.state.metrics_registry).inc(3)
    # A second app in the same process gets its own registry: no duplicate-metric error.
    other = create_app(settings_for(tmp_path / "other"))
    Counter("module_things_total", "things", registry=other.state.metrics_registry)
    text = (await platform_client.get("/metrics")).text
    assert "module_things_total 3.0" in text


async def test_module_catalogue(
    platform_client: httpx.AsyncClient, admin_headers: dict[str, str], platform_app: FastAPI
) -> None:
    assert (await platform_client.get("/v1/modules")).status_code == 401
    listing = (await platform_client.get("/v1/modules", headers=admin_headers)).json()
    assert listing["has_more"] is False
    assert [m["id"] for m in listing["data"]] == list(platform_app.state.modules)
    assert all(m["status"] == "active" for m in listing["data"])
    for name in platform_app.state.modules:
        record = await platform_client.get(f"/v1/modules/{name}", headers=admin_headers)
        assert record.json()["data"]["status"] == "active"
    unknown = await platform_client.get("/v1/modules/nope", headers=admin_headers)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "NOT_FOUND"


async def test_bunker_proxy_mode_has_no_database_and_only_system_routes(
    settings_for: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The storage proxy verifies capabilities statelessly, so it refuses to start without
    # the shared secret (scaibunker storage settings).
    monkeypatch.setenv("SCAIBUNKER_STORAGE_CAPABILITY_SECRET", "s" * 48)
    settings = settings_for(tmp_path, mode="bunker_proxy")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        assert app.state.db is None
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/health")).status_code == 200
            assert (await client.get("/metrics")).status_code == 200
            catalogue = await client.get("/v1/modules")
    assert catalogue.status_code == 404
    assert not (tmp_path / "scaigrid.db").exists()
    assert not settings.admin_key_file.exists()

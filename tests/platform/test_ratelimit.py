"""Rate limits (SPEC §1.6): exact counts under a burst, most restrictive level wins, 429
envelope and headers, one window shared by two controllers on one Redis."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from scaigrid.platform.app import create_app
from scaigrid.platform.auth.service import create_api_key
from scaigrid.platform.db import Database
from scaigrid.platform.permissions import Role
from scaigrid.platform.ratelimit import Level, MemoryRateLimiter
from scaigrid.platform.tenancy import service as tenancy
from scaigrid.settings import Settings

SettingsFor = Callable[..., Settings]
URL = "/v1/modules"


@asynccontextmanager
async def _client(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield app, client


async def _user_keys(app: FastAPI, count: int, tenant: str = "rl") -> list[dict[str, str]]:
    """``count`` keys of one new user in tenant ``tenant``."""
    db: Database = app.state.db
    async with db.sessionmaker() as session:
        try:
            found = await tenancy.get_tenant(session, tenant)
        except Exception:
            partner = await tenancy.default_partner(session)
            found = await tenancy.create_tenant(session, partner.id, tenant, tenant)
        user = await tenancy.create_user(
            session, found.id, f"u{id(object())}@x.test", Role.TENANT_USER
        )
        secrets = [(await create_api_key(session, user, "k"))[1] for _ in range(count)]
        await session.commit()
    return [{"Authorization": f"Bearer {s}"} for s in secrets]


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings overrides selecting the in-process or the Redis limiter."""
    if request.param == "memory":
        return {}
    prefix = request.getfixturevalue("redis_prefix")
    return {"redis_url": request.getfixturevalue("redis_url"), "redis_prefix": prefix}


@pytest.fixture
def limited(
    tmp_path: Path, migrated_sqlite_template: Path, settings_for: SettingsFor
) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        shutil.copy2(migrated_sqlite_template, tmp_path / "scaigrid.db")
        values: dict[str, Any] = {
            "auth_cache_ttl_s": 30,
            "rate_limit_key_per_min": 60,
            "rate_limit_user_per_min": 120,
            "rate_limit_tenant_per_min": 1000,
            "rate_limit_partner_per_min": 5000,
            **overrides,
        }
        return settings_for(tmp_path, **values)

    return make


async def test_a_burst_of_1000_admits_exactly_the_key_limit(
    limited: Callable[..., Settings], backend: dict[str, Any]
) -> None:
    async with _client(limited(**backend)) as (app, client):
        (headers,) = await _user_keys(app, 1)
        responses = await asyncio.gather(*(client.get(URL, headers=headers) for _ in range(1000)))
    statuses = [r.status_code for r in responses]
    odd = [r.text for r in responses if r.status_code not in (200, 429)][:3]
    assert not odd, odd
    assert statuses.count(200) == 60
    assert statuses.count(429) == 940
    refused = next(r for r in responses if r.status_code == 429)
    body = refused.json()
    assert body["error"]["code"] == "RATE_LIMITED"
    assert 1 <= body["error"]["retry_after"] <= 60
    assert "details" not in body["error"]  # SPEC §1.5: only validation and quota errors
    assert refused.headers["retry-after"] == str(body["error"]["retry_after"])
    assert refused.headers["x-scaigrid-ratelimit-limit"] == "60"
    assert refused.headers["x-scaigrid-ratelimit-remaining"] == "0"
    assert 1 <= int(refused.headers["x-scaigrid-ratelimit-reset"]) <= 60
    assert body["meta"]["request_id"] == refused.headers["x-request-id"]


async def test_success_headers_count_down(
    limited: Callable[..., Settings], backend: dict[str, Any]
) -> None:
    async with _client(limited(rate_limit_key_per_min=5, **backend)) as (app, client):
        (headers,) = await _user_keys(app, 1)
        remaining = [
            (await client.get(URL, headers=headers)).headers["x-scaigrid-ratelimit-remaining"]
            for _ in range(5)
        ]
        assert remaining == ["4", "3", "2", "1", "0"]
        assert (await client.get(URL, headers=headers)).status_code == 429


async def test_the_most_restrictive_level_decides(
    limited: Callable[..., Settings], backend: dict[str, Any]
) -> None:
    settings = limited(rate_limit_user_per_min=7, rate_limit_tenant_per_min=10, **backend)
    async with _client(settings) as (app, client):
        first_key, second_key = await _user_keys(app, 2, tenant="t1")
        # Two keys of one user: each key allows 60, the user 7 in all.
        got = [await client.get(URL, headers=(first_key, second_key)[n % 2]) for n in range(12)]
        assert [r.status_code for r in got].count(200) == 7
        assert got[-1].headers["x-scaigrid-ratelimit-limit"] == "7"
        # A second user of the same tenant: the tenant's 10 leave it 3.
        (other,) = await _user_keys(app, 1, tenant="t1")
        got = [await client.get(URL, headers=other) for _ in range(6)]
        assert [r.status_code for r in got].count(200) == 3
        assert got[-1].headers["x-scaigrid-ratelimit-limit"] == "10"
        # Another tenant is untouched.
        (elsewhere,) = await _user_keys(app, 1, tenant="t2")
        assert (await client.get(URL, headers=elsewhere)).status_code == 200


async def test_two_controllers_sharing_redis_share_one_window(
    limited: Callable[..., Settings], redis_url: str, redis_prefix: str
) -> None:
    settings = limited(redis_url=redis_url, redis_prefix=redis_prefix)
    async with AsyncExitStack() as stack:
        app_a, client_a = await stack.enter_async_context(_client(settings))
        _app_b, client_b = await stack.enter_async_context(_client(settings))
        (headers,) = await _user_keys(app_a, 1)
        responses = await asyncio.gather(
            *((client_a, client_b)[n % 2].get(URL, headers=headers) for n in range(200))
        )
    assert [r.status_code for r in responses].count(200) == 60


async def test_memory_limiter_refusals_do_not_use_up_the_window() -> None:
    limiter = MemoryRateLimiter()
    levels = [Level("k", 2), Level("u", 3)]
    decisions = [await limiter.hit(levels) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, False, False]
    assert (await limiter.hit([Level("u", 3)])).allowed  # u counted only the two admitted
    assert not (await limiter.hit([Level("u", 3)])).allowed

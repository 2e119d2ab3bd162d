"""Shared platform fixtures: a migrated SQLite controller app, HTTP clients, identities.

* ``settings_for(data_dir, **overrides)`` — test settings for any directory.
* ``platform_settings`` — :class:`Settings` on a fresh per-test data dir whose SQLite file is a
  copy of a database migrated once per session (fast: the app's own upgrade is a no-op).
* ``platform_app`` — ``create_app(platform_settings)`` with its lifespan running (migrations,
  bootstrap, module startup), so ``app.state.db`` is ready.
* ``platform_client`` — ``httpx.AsyncClient`` on the app through ASGI (no socket).
* ``admin_key`` / ``admin_headers`` — the bootstrap ``super_admin`` key.
* ``empty_database_url`` — parametrised over SQLite, PostgreSQL and MariaDB: the URL of a
  fresh, empty database (a throwaway database on the local server, dropped afterwards); the
  test is skipped, with the reason, when that server is not reachable. Server addresses:
  ``SCAIGRID_TEST_POSTGRES_URL`` / ``SCAIGRID_TEST_MARIADB_URL`` (an admin database URL).
* ``redis_url`` — the local Redis (``SCAIGRID_TEST_REDIS_URL``), skipped with the reason when
  unreachable; ``redis_prefix`` — a unique key prefix whose keys are deleted afterwards.
* ``make_identity`` — ``await make_identity(role="tenant_user", tenant=None)`` creates (or
  reuses, by slug) a tenant, a user with ``role`` and an API key: an :class:`Identity`.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from fastapi import FastAPI
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine

from scaigrid import errors
from scaigrid.ids import new_id
from scaigrid.platform.app import create_app
from scaigrid.platform.auth.service import create_api_key
from scaigrid.platform.db import Database
from scaigrid.platform.migrate import migrate
from scaigrid.platform.permissions import Role
from scaigrid.platform.tenancy import service as tenancy
from scaigrid.settings import Settings

# The SPEC's default limits (60 requests a minute per key) would throttle suites that drive one
# key hard, including controllers the e2e stack starts (they inherit this environment); the
# rate-limit tests set their own limits.
for _level in ("KEY", "USER", "TENANT", "PARTNER"):
    os.environ.setdefault(f"SCAIGRID_RATE_LIMIT_{_level}_PER_MIN", "1000000")

DB_FILE = "scaigrid.db"
SERVER_ADMIN_URLS = {
    "postgresql": os.environ.get(
        "SCAIGRID_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
    ),
    "mariadb": os.environ.get(
        "SCAIGRID_TEST_MARIADB_URL", "mysql+aiomysql://root@127.0.0.1:3306/mysql"
    ),
}
SERVER_CONNECT_TIMEOUT_S = 10
REDIS_URL = os.environ.get("SCAIGRID_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(autouse=True)
def _default_structlog() -> Any:
    """Undo a test app's logging configuration (its level filter would hide events from
    ``structlog.testing.capture_logs`` in later tests)."""
    yield
    structlog.reset_defaults()


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test controller in ``data_dir`` (SQLite there, quiet logs)."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": f"sqlite+aiosqlite:///{data_dir / DB_FILE}",
        "log_level": "WARNING",
        "auth_cache_ttl_s": 0,
        **overrides,
    }
    return Settings(**values)


@dataclass(frozen=True)
class Identity:
    """A user with an API key, made by ``make_identity``."""

    tenant_id: str
    tenant_slug: str
    user_id: str
    email: str
    role: Role
    api_key_id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        """``{"Authorization": "Bearer <key>"}``."""
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture(scope="session")
def settings_for() -> Callable[..., Settings]:
    """``settings_for(data_dir, **overrides)``: test :class:`Settings` (SQLite in data_dir)."""
    return make_settings


@pytest.fixture(scope="session")
async def migrated_sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database migrated to head once per test session."""
    data_dir = tmp_path_factory.mktemp("migrated-template")
    await migrate(make_settings(data_dir))
    return data_dir / DB_FILE


async def _create_database(admin_url: str, name: str) -> None:
    engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    charset = " CHARACTER SET utf8mb4" if engine.dialect.name in ("mysql", "mariadb") else ""
    try:
        async with engine.connect() as connection:
            await connection.execute(text(f"CREATE DATABASE {name}{charset}"))
    finally:
        await engine.dispose()


async def _drop_database(admin_url: str, name: str) -> None:
    engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(text(f"DROP DATABASE IF EXISTS {name}"))
    finally:
        await engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
async def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """URL of a fresh empty database on SQLite, PostgreSQL or MariaDB (see module doc)."""
    kind: str = request.param
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
        return
    admin_url = SERVER_ADMIN_URLS[kind]
    name = f"scaigrid_test_{secrets.token_hex(6)}"
    try:
        await asyncio.wait_for(_create_database(admin_url, name), SERVER_CONNECT_TIMEOUT_S)
    except (OSError, SQLAlchemyError, TimeoutError) as exc:
        pytest.skip(f"{kind} at {make_url(admin_url).host} is not reachable: {exc}")
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        await _drop_database(admin_url, name)


@pytest.fixture
async def redis_url() -> str:
    """The test Redis URL; the test is skipped, with the reason, when Redis is unreachable."""
    client = Redis.from_url(REDIS_URL, socket_connect_timeout=SERVER_CONNECT_TIMEOUT_S)
    try:
        await client.ping()
    except RedisError as exc:
        pytest.skip(f"Redis at {REDIS_URL} is not reachable: {exc}")
    finally:
        await client.aclose()
    return REDIS_URL


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A unique key prefix on the test Redis; its keys (and only those) are deleted after."""
    prefix = f"scaigrid-test-{secrets.token_hex(6)}:"
    yield prefix
    client = Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
def platform_settings(tmp_path: Path, migrated_sqlite_template: Path) -> Settings:
    """Settings on ``tmp_path`` with a copy of the migrated template database."""
    shutil.copy2(migrated_sqlite_template, tmp_path / DB_FILE)
    return make_settings(tmp_path)


@pytest.fixture
async def platform_app(platform_settings: Settings) -> AsyncIterator[FastAPI]:
    """The controller app with its lifespan running."""
    app = create_app(platform_settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def platform_client(platform_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client calling ``platform_app`` in process (``base_url`` http://testserver)."""
    transport = httpx.ASGITransport(app=platform_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.fixture
def admin_key(platform_app: FastAPI, platform_settings: Settings) -> str:
    """The bootstrap super_admin API key, read from the admin key file."""
    return platform_settings.admin_key_file.read_text().strip()


@pytest.fixture
def admin_headers(admin_key: str) -> dict[str, str]:
    """Authorization headers of the bootstrap super_admin."""
    return {"Authorization": f"Bearer {admin_key}"}


MakeIdentity = Callable[..., Awaitable[Identity]]


@pytest.fixture
def make_identity(platform_app: FastAPI) -> MakeIdentity:
    """Factory: ``await make_identity(role="tenant_user", tenant=None)``.

    ``tenant`` is a slug: reused when it exists, created under the default partner
    otherwise; None makes a new tenant. Returns an :class:`Identity`.
    """
    db: Database = platform_app.state.db

    async def make(role: Role | str = Role.TENANT_USER, tenant: str | None = None) -> Identity:
        slug = tenant or new_id("ten").lower().replace("_", "-")
        email = f"{new_id('usr').lower()}@example.test"
        async with db.sessionmaker() as session:
            try:
                found = await tenancy.get_tenant(session, slug)
            except errors.NotFound:
                partner = await tenancy.default_partner(session)
                found = await tenancy.create_tenant(session, partner.id, slug, slug)
            user = await tenancy.create_user(session, found.id, email, role)
            key, secret = await create_api_key(session, user, "test")
            await session.commit()
        return Identity(found.id, slug, user.id, email, Role(role), key.id, secret)

    return make

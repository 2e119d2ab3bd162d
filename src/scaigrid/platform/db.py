"""Database access for the controller: declarative base, engine, sessions, time helpers.

One migration history serves SQLite (embedded default), PostgreSQL and MariaDB, so models use
portable types only: ``String(n)`` with explicit lengths, :class:`UTCDateTime` for instants,
constraint names from :data:`NAMING_CONVENTION` (stable across dialects, so later migrations
can drop or alter them by name).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, MetaData, event
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator, TypeEngine
from starlette.requests import HTTPConnection

from scaigrid.errors import InternalError

#: Length of an id column: a 3-letter prefix, ``_`` and a 26-character ULID, with room to spare.
ID_LENGTH = 32

#: Constraint and index names, identical on every dialect (SQLAlchemy "constraint naming
#: conventions"). Keep table and column names short: PostgreSQL cuts identifiers at 63
#: characters and MariaDB refuses names over 64.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: SQLite pragmas applied to every new connection: WAL lets readers run beside the one
#: writer, ``busy_timeout`` (ms) makes a second writer wait instead of failing at once, and
#: ``synchronous=NORMAL`` syncs the WAL at checkpoints instead of at every commit (in WAL mode
#: the database stays consistent; a power cut may lose the last commits, a process crash none;
#: https://www.sqlite.org/pragma.html#pragma_synchronous).
SQLITE_BUSY_TIMEOUT_MS = 5000


class Base(DeclarativeBase):
    """Declarative base of every ORM model (platform and modules share one metadata)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC instant on every dialect.

    PostgreSQL stores ``timestamptz``; SQLite and MariaDB have no zone, so the value is stored
    as naive UTC (MariaDB as ``DATETIME(6)`` to keep microseconds) and comes back with
    ``tzinfo=UTC``. Binding a naive datetime raises :class:`ValueError`: callers must say
    what zone they mean (use :func:`utcnow`).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime bound to a UTCDateTime column")
        value = value.astimezone(UTC)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def utcnow() -> datetime:
    """Return the current instant as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


def create_engine(url: str, *, foreign_keys: bool = True) -> AsyncEngine:
    """Create an async engine for ``url`` with the settings each dialect needs.

    SQLite: creates the database file's directory (mode 0700) and the file itself (mode 0600,
    so a data directory shared with a worker never exposes it), and sets WAL, a busy timeout
    and ``foreign_keys`` (on unless ``foreign_keys=False``, which migrations use so that
    batch table rebuilds work). Server databases: connections are pinged before use.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(parsed.database, os.O_CREAT | os.O_WRONLY, 0o600))
        engine = _create_async_engine(url)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
            cursor.close()

        return engine
    return _create_async_engine(url, pool_pre_ping=True, pool_recycle=3600)


class Database:
    """The controller's engine and session factory (``app.state.db``).

    Args:
        url: SQLAlchemy async URL (``Settings.database_url``).
    """

    def __init__(self, url: str) -> None:
        self.engine: AsyncEngine = create_engine(url)
        self.sessionmaker: async_sessionmaker[AsyncSession] = async_sessionmaker(
            self.engine, expire_on_commit=False
        )

    async def dispose(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()


def get_database(conn: HTTPConnection) -> Database:
    """Return ``app.state.db`` for a request or WebSocket.

    Raises:
        InternalError: the app runs without a database (``bunker_proxy`` mode).
    """
    db: Database | None = getattr(conn.app.state, "db", None)
    if db is None:
        raise InternalError("This server runs without a database")
    return db


async def get_session(request: HTTPConnection) -> AsyncIterator[AsyncSession]:
    """FastAPI dependency: one :class:`AsyncSession` for the request.

    Nothing is committed for you: services call ``await session.commit()`` when their unit of
    work is complete; anything uncommitted is rolled back when the request ends.

    Raises:
        InternalError: the app runs without a database (``bunker_proxy`` mode).
    """
    async with get_database(request).sessionmaker() as session:
        yield session

"""ORM models of workers and their join tokens (SPEC §10.1-10.3)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, String
from sqlalchemy.orm import Mapped, mapped_column

from scaigrid.platform.db import Base, UTCDateTime, utcnow


class Worker(Base):
    """A registered worker host. ``credential_hash`` is the SHA-256 of its ``sbw_`` secret."""

    __tablename__ = "scaibunker_workers"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    tenant_id: Mapped[str | None] = mapped_column(String(32), index=True)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    drivers: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    capacity: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    free: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    image_cache: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    connection: Mapped[str] = mapped_column(String(16), default="offline")
    admin_state: Mapped[str] = mapped_column(String(16), default="active")
    daemon_version: Mapped[str] = mapped_column(String(32), default="")
    credential_hash: Mapped[str] = mapped_column(String(64), unique=True)
    last_heartbeat: Mapped[datetime | None] = mapped_column(UTCDateTime())
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WorkerJoinToken(Base):
    """A one-use ``sbj_`` secret that lets a new worker register (stored as SHA-256)."""

    __tablename__ = "scaibunker_worker_join_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    tenant_id: Mapped[str | None] = mapped_column(String(32))
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    created_by: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    worker_id: Mapped[str | None] = mapped_column(String(32))

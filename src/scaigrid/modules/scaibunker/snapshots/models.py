"""ORM model of snapshots (SPEC §6.1)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from scaigrid.platform.db import Base, UTCDateTime


class Snapshot(Base):
    """One snapshot. The row is deleted with its objects (``DELETE /snapshots/{id}``); it
    outlives its bunker and module disable."""

    __tablename__ = "scaibunker_snapshots"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(128))
    tenant_id: Mapped[str] = mapped_column(String(32), index=True)
    owner_user_id: Mapped[str] = mapped_column(String(32), index=True)
    bunker_id: Mapped[str] = mapped_column(String(32), index=True)
    image_id: Mapped[str] = mapped_column(String(32))
    image_digest: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))
    status_reason: Mapped[str | None] = mapped_column(Text)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    layer_bytes: Mapped[int | None] = mapped_column(BigInteger)
    entries: Mapped[int | None] = mapped_column(Integer)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

"""ORM model of images (SPEC §7.1)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from scaigrid.platform.db import Base, UTCDateTime, utcnow


class Image(Base):
    """A root filesystem bunkers boot from, built on a worker from its ``source``."""

    __tablename__ = "scaibunker_images"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), index=True)
    scope: Mapped[str] = mapped_column(String(16))
    tenant_id: Mapped[str | None] = mapped_column(String(32), index=True)
    partner_id: Mapped[str | None] = mapped_column(String(32))
    source: Mapped[dict[str, Any]] = mapped_column(JSON)
    digest: Mapped[str | None] = mapped_column(String(80))
    size_mib: Mapped[int] = mapped_column(Integer, default=2048)
    default_cpu_millicores: Mapped[int | None] = mapped_column(Integer)
    default_memory_mb: Mapped[int | None] = mapped_column(Integer)
    default_disk_mb: Mapped[int | None] = mapped_column(Integer)
    lazy_pull: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(16), index=True)
    status_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

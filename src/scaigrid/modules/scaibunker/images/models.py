"""ORM models of images (SPEC §7.1), their per-worker warm state (§7.6), scan findings (§7.7)
and availability groups (§7.6)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from scaigrid.platform.db import Base, UTCDateTime, utcnow


class Image(Base):
    """A root filesystem bunkers boot from, built on a worker from its ``source``.

    ``source_digest`` is the ``sha256:`` manifest digest an OCI source was pinned to at bake
    time; ``builtin`` marks the seeded platform catalogue (§7.5), baked only on request;
    ``scan`` is the latest scan object (§7.7).
    """

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
    source_digest: Mapped[str | None] = mapped_column(String(80))
    bake_worker_id: Mapped[str | None] = mapped_column(String(32))
    builtin: Mapped[bool] = mapped_column(Boolean, default=False)
    scan: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class ImageWorker(Base):
    """Warm state of one image on one worker: ``queued``, ``ready``, ``failed``, ``skipped``."""

    __tablename__ = "scaibunker_image_workers"

    image_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    worker_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ImageFinding(Base):
    """One vulnerability finding of an image's latest scan; ``seq`` orders them."""

    __tablename__ = "scaibunker_image_findings"

    image_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    vulnerability_id: Mapped[str] = mapped_column(String(256))
    pkg_name: Mapped[str | None] = mapped_column(String(512))
    installed_version: Mapped[str | None] = mapped_column(String(512))
    fixed_version: Mapped[str | None] = mapped_column(String(512))
    severity: Mapped[str] = mapped_column(String(16), index=True)
    title: Mapped[str | None] = mapped_column(Text)


class AvailabilityGroup(Base):
    """Workers that keep a set of images warm (SPEC §7.6)."""

    __tablename__ = "scaibunker_availability_groups"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), index=True)
    scope: Mapped[str] = mapped_column(String(16))
    tenant_id: Mapped[str | None] = mapped_column(String(32), index=True)
    worker_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    image_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

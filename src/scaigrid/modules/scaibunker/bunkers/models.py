"""ORM models of bunkers and their state history (SPEC §2.1, §2.4)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from scaigrid.platform.db import Base, UTCDateTime, utcnow


class Bunker(Base):
    """One bunker. Rows are never deleted: terminal bunkers stay readable (SPEC §2.3.4)."""

    __tablename__ = "scaibunker_bunkers"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(32), index=True)
    owner_user_id: Mapped[str] = mapped_column(String(32), index=True)
    name: Mapped[str | None] = mapped_column(String(128))
    image_name: Mapped[str] = mapped_column(String(63))
    image_id: Mapped[str] = mapped_column(String(32))
    snapshot_id: Mapped[str | None] = mapped_column(String(32))
    lifecycle_mode: Mapped[str] = mapped_column(String(16))
    network_profile: Mapped[str] = mapped_column(String(16))
    network_allowlist: Mapped[list[str] | None] = mapped_column(JSON)
    cpu_millicores: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    disk_mb: Mapped[int] = mapped_column(Integer)
    gpu_count: Mapped[int] = mapped_column(Integer, default=0)
    gpu_type: Mapped[str | None] = mapped_column(String(64))
    bandwidth_mbit: Mapped[int | None] = mapped_column(Integer)
    max_lifetime_s: Mapped[int | None] = mapped_column(Integer)
    idle_timeout_s: Mapped[int | None] = mapped_column(Integer)
    session_type: Mapped[str] = mapped_column(String(16), default="standalone")
    session_ref: Mapped[str | None] = mapped_column(String(255))
    label_set: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    env_vars: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    interfaces: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(String(16), index=True)
    status_reason: Mapped[str] = mapped_column(String(64))
    status_message: Mapped[str | None] = mapped_column(Text)
    status_changed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    worker_id: Mapped[str | None] = mapped_column(String(32), index=True)
    driver: Mapped[str | None] = mapped_column(String(16))
    isolation: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_activity_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    final_snapshot_id: Mapped[str | None] = mapped_column(String(32))
    #: Bytes the bunker sent out of its worker's uplink, summed over every worker it ran on
    #: (SPEC §1.9: the one measured accounting figure).
    egress_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    #: The worker's last reported cumulative egress counter for the bunker (bytes); a smaller
    #: report means the counter restarted (new worker or worker restart).
    egress_reported: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    history: Mapped[list[BunkerStatusEvent]] = relationship(
        back_populates="bunker", order_by="BunkerStatusEvent.id", lazy="raise"
    )


class BunkerStatusEvent(Base):
    """One stored state change ``{from, to, reason, at}`` of a bunker."""

    __tablename__ = "scaibunker_bunker_status_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    bunker_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("scaibunker_bunkers.id", ondelete="CASCADE"), index=True
    )
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(64))
    message: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    bunker: Mapped[Bunker] = relationship(back_populates="history")

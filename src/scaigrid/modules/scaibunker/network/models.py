"""ORM model of tenant bridges (SPEC §8.8)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from scaigrid.platform.db import Base, UTCDateTime, utcnow


class Bridge(Base):
    """One tenant-private L2 bridge on one worker. The row is deleted with the bridge.

    ``device`` is the Linux device name on the worker (generated from the id, see
    :func:`scaigrid.worker.net.l2.bridge_device`); ``name`` is the tenant-facing name, unique
    within the tenant.
    """

    __tablename__ = "scaibunker_bridges"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_scaibunker_bridges_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63))
    tenant_id: Mapped[str] = mapped_column(String(32), index=True)
    worker_id: Mapped[str] = mapped_column(String(32), index=True)
    vlan_id: Mapped[int | None] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(15))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

"""ORM model of bunker usage records (SPEC §1.9)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Double, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from scaigrid.platform.db import Base, UTCDateTime


class UsageRecord(Base):
    """Usage of one bunker over ``[period_start, period_end)``.

    Resource figures are allocation times seconds (floats, exact to the state-change instant);
    ``egress_bytes`` is measured. One record per (bunker, period start).
    """

    __tablename__ = "scaibunker_usage_records"
    __table_args__ = (UniqueConstraint("bunker_id", "period_start"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    bunker_id: Mapped[str] = mapped_column(String(32), index=True)
    tenant_id: Mapped[str] = mapped_column(String(32), index=True)
    user_id: Mapped[str] = mapped_column(String(32), index=True)
    period_start: Mapped[datetime] = mapped_column(UTCDateTime())
    period_end: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    cpu_millicore_seconds: Mapped[float] = mapped_column(Double())
    memory_mb_seconds: Mapped[float] = mapped_column(Double())
    disk_mb_seconds: Mapped[float] = mapped_column(Double())
    gpu_seconds: Mapped[float] = mapped_column(Double())
    egress_bytes: Mapped[int] = mapped_column(BigInteger())
    lifecycle_mode: Mapped[str] = mapped_column(String(16))
    network_profile: Mapped[str] = mapped_column(String(16))

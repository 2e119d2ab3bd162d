"""ORM models of quota profiles, assignments and admission bookkeeping (SPEC §9)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from scaigrid.platform.db import Base, UTCDateTime, utcnow

#: Id of the seeded ``platform-default`` profile (SPEC §9.1), the default profile.
DEFAULT_PROFILE_ID = "00000000-0000-4000-8000-000000000001"


class QuotaProfile(Base):
    """A set of caps; ``tenant_id`` null = platform profile. Units: millicores, MiB, GPUs."""

    __tablename__ = "scaibunker_quota_profiles"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str | None] = mapped_column(String(32), index=True)
    name: Mapped[str] = mapped_column(String(128))
    description: Mapped[str | None] = mapped_column(Text)
    max_concurrent_bunkers: Mapped[int] = mapped_column(Integer)
    max_persistent_bunkers: Mapped[int] = mapped_column(Integer)
    max_cpu_millicores: Mapped[int] = mapped_column(Integer)
    max_memory_mb: Mapped[int] = mapped_column(Integer)
    max_disk_mb: Mapped[int] = mapped_column(Integer)
    max_gpu_count: Mapped[int] = mapped_column(Integer)
    per_bunker_max_cpu: Mapped[int | None] = mapped_column(Integer)
    per_bunker_max_memory: Mapped[int | None] = mapped_column(Integer)
    per_bunker_max_disk: Mapped[int | None] = mapped_column(Integer)
    per_bunker_max_gpu: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class QuotaAssignment(Base):
    """Binds a profile to a user (``individual``) or group (``shared``/``per_user``)."""

    __tablename__ = "scaibunker_quota_assignments"
    __table_args__ = (UniqueConstraint("target_kind", "target_id"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    profile_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("scaibunker_quota_profiles.id", ondelete="CASCADE"), index=True
    )
    tenant_id: Mapped[str] = mapped_column(String(32), index=True)
    target_kind: Mapped[str] = mapped_column(String(8))
    target_id: Mapped[str] = mapped_column(String(36))
    mode: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class QuotaBucketLock(Base):
    """One row per (profile, bucket): admission locks it (``SELECT … FOR UPDATE``)."""

    __tablename__ = "scaibunker_quota_bucket_locks"

    profile_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    bucket: Mapped[str] = mapped_column(String(48), primary_key=True)


class QuotaContribution(Base):
    """A (profile, bucket) a bunker was admitted into; counts while the bunker is live."""

    __tablename__ = "scaibunker_quota_contributions"

    bunker_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("scaibunker_bunkers.id", ondelete="CASCADE"), primary_key=True
    )
    profile_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    bucket: Mapped[str] = mapped_column(String(48), primary_key=True)

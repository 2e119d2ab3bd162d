"""scaibunker: quota profiles, assignments, bucket locks and contributions; seed platform-default

Revision ID: scaibunker_0002_quotas
Revises: scaibunker_0001
Create Date: 2026-11-29 21:35:00
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from scaigrid.platform.db import UTCDateTime

revision: str = "scaibunker_0002_quotas"
down_revision: str | Sequence[str] | None = "scaibunker_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT_PROFILE_ID = "00000000-0000-4000-8000-000000000001"


def upgrade() -> None:
    profiles = op.create_table(
        "scaibunker_quota_profiles",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=True),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("max_concurrent_bunkers", sa.Integer(), nullable=False),
        sa.Column("max_persistent_bunkers", sa.Integer(), nullable=False),
        sa.Column("max_cpu_millicores", sa.Integer(), nullable=False),
        sa.Column("max_memory_mb", sa.Integer(), nullable=False),
        sa.Column("max_disk_mb", sa.Integer(), nullable=False),
        sa.Column("max_gpu_count", sa.Integer(), nullable=False),
        sa.Column("per_bunker_max_cpu", sa.Integer(), nullable=True),
        sa.Column("per_bunker_max_memory", sa.Integer(), nullable=True),
        sa.Column("per_bunker_max_disk", sa.Integer(), nullable=True),
        sa.Column("per_bunker_max_gpu", sa.Integer(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "name"),
    )
    op.create_index(
        op.f("ix_scaibunker_quota_profiles_tenant_id"),
        "scaibunker_quota_profiles",
        ["tenant_id"],
        unique=False,
    )
    op.create_table(
        "scaibunker_quota_assignments",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("profile_id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("target_kind", sa.String(length=8), nullable=False),
        sa.Column("target_id", sa.String(length=36), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["profile_id"], ["scaibunker_quota_profiles.id"], ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("target_kind", "target_id"),
    )
    op.create_index(
        op.f("ix_scaibunker_quota_assignments_profile_id"),
        "scaibunker_quota_assignments",
        ["profile_id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_scaibunker_quota_assignments_tenant_id"),
        "scaibunker_quota_assignments",
        ["tenant_id"],
        unique=False,
    )
    op.create_table(
        "scaibunker_quota_bucket_locks",
        sa.Column("profile_id", sa.String(length=36), nullable=False),
        sa.Column("bucket", sa.String(length=48), nullable=False),
        sa.PrimaryKeyConstraint("profile_id", "bucket"),
    )
    op.create_table(
        "scaibunker_quota_contributions",
        sa.Column("bunker_id", sa.String(length=32), nullable=False),
        sa.Column("profile_id", sa.String(length=36), nullable=False),
        sa.Column("bucket", sa.String(length=48), nullable=False),
        sa.ForeignKeyConstraint(["bunker_id"], ["scaibunker_bunkers.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("bunker_id", "profile_id", "bucket"),
    )
    now = datetime.now(UTC)
    op.bulk_insert(
        profiles,
        [
            {
                "id": DEFAULT_PROFILE_ID,
                "tenant_id": None,
                "name": "platform-default",
                "description": None,
                "max_concurrent_bunkers": 5,
                "max_persistent_bunkers": 1,
                "max_cpu_millicores": 4000,
                "max_memory_mb": 4096,
                "max_disk_mb": 8192,
                "max_gpu_count": 1,
                "per_bunker_max_cpu": None,
                "per_bunker_max_memory": None,
                "per_bunker_max_disk": None,
                "per_bunker_max_gpu": None,
                "created_at": now,
                "updated_at": now,
            }
        ],
    )


def downgrade() -> None:
    op.drop_table("scaibunker_quota_contributions")
    op.drop_table("scaibunker_quota_bucket_locks")
    op.drop_table("scaibunker_quota_assignments")
    op.drop_table("scaibunker_quota_profiles")

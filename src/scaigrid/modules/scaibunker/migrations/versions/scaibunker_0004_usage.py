"""scaibunker: usage records (accounting)

Revision ID: scaibunker_0004_usage
Revises: scaibunker_0003_images
Create Date: 2026-11-29 22:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from scaigrid.platform.db import UTCDateTime

revision: str = "scaibunker_0004_usage"
down_revision: str | Sequence[str] | None = "scaibunker_0003_images"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "scaibunker_usage_records",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("bunker_id", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.String(length=32), nullable=False),
        sa.Column("period_start", UTCDateTime(), nullable=False),
        sa.Column("period_end", UTCDateTime(), nullable=False),
        sa.Column("cpu_millicore_seconds", sa.Double(), nullable=False),
        sa.Column("memory_mb_seconds", sa.Double(), nullable=False),
        sa.Column("disk_mb_seconds", sa.Double(), nullable=False),
        sa.Column("gpu_seconds", sa.Double(), nullable=False),
        sa.Column("egress_bytes", sa.BigInteger(), nullable=False),
        sa.Column("lifecycle_mode", sa.String(length=16), nullable=False),
        sa.Column("network_profile", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("bunker_id", "period_start"),
    )
    for column in ("bunker_id", "tenant_id", "user_id", "period_end"):
        op.create_index(
            op.f(f"ix_scaibunker_usage_records_{column}"),
            "scaibunker_usage_records",
            [column],
            unique=False,
        )


def downgrade() -> None:
    op.drop_table("scaibunker_usage_records")

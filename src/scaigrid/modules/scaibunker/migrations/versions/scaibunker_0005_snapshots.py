"""scaibunker: snapshots

Revision ID: scaibunker_0005_snapshots
Revises: scaibunker_0004_usage
Create Date: 2026-11-29 21:15:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from scaigrid.platform.db import UTCDateTime

revision: str = "scaibunker_0005_snapshots"
down_revision: str | Sequence[str] | None = "scaibunker_0004_usage"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "scaibunker_snapshots",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=True),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("owner_user_id", sa.String(length=32), nullable=False),
        sa.Column("bunker_id", sa.String(length=32), nullable=False),
        sa.Column("image_id", sa.String(length=32), nullable=False),
        sa.Column("image_digest", sa.String(length=128), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("layer_bytes", sa.BigInteger(), nullable=True),
        sa.Column("entries", sa.Integer(), nullable=True),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("ready_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    for column in ("tenant_id", "owner_user_id", "bunker_id"):
        op.create_index(
            op.f(f"ix_scaibunker_snapshots_{column}"),
            "scaibunker_snapshots",
            [column],
            unique=False,
        )


def downgrade() -> None:
    op.drop_table("scaibunker_snapshots")

"""scaibunker: tenant bridges

Revision ID: scaibunker_0007_bridges
Revises: scaibunker_0006_egress_bytes
Create Date: 2026-11-29 23:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from scaigrid.platform.db import UTCDateTime

revision: str = "scaibunker_0007_bridges"
down_revision: str | Sequence[str] | None = "scaibunker_0006_egress_bytes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "scaibunker_bridges",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("worker_id", sa.String(length=32), nullable=False),
        sa.Column("vlan_id", sa.Integer(), nullable=True),
        sa.Column("device", sa.String(length=15), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "name", name="uq_scaibunker_bridges_name"),
    )
    for column in ("tenant_id", "worker_id"):
        op.create_index(
            op.f(f"ix_scaibunker_bridges_{column}"), "scaibunker_bridges", [column], unique=False
        )


def downgrade() -> None:
    op.drop_table("scaibunker_bridges")

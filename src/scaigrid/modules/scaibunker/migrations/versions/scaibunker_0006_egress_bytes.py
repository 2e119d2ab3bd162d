"""scaibunker: measured egress bytes per bunker

Revision ID: scaibunker_0006_egress_bytes
Revises: scaibunker_0005_snapshots
Create Date: 2026-11-29 23:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "scaibunker_0006_egress_bytes"
down_revision: str | Sequence[str] | None = "scaibunker_0005_snapshots"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("scaibunker_bunkers") as batch:
        batch.add_column(
            sa.Column("egress_bytes", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("egress_reported", sa.BigInteger(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("scaibunker_bunkers") as batch:
        batch.drop_column("egress_reported")
        batch.drop_column("egress_bytes")

"""Platform: per-scope module enablement and configuration (module_scopes).

Revision ID: platform_0004_modules
Revises: platform_0003_iam
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from scaigrid.platform.db import UTCDateTime

revision: str = "platform_0004_modules"
down_revision: str | Sequence[str] | None = "platform_0003_iam"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "module_scopes",
        sa.Column("module", sa.String(length=64), nullable=False),
        sa.Column("scope_type", sa.String(length=16), nullable=False),
        sa.Column("scope_id", sa.String(length=32), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("module", "scope_type", "scope_id", name=op.f("pk_module_scopes")),
    )


def downgrade() -> None:
    op.drop_table("module_scopes")

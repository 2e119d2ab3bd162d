"""scaibunker: OCI digest pinning, built-ins, scans, per-worker warm state, availability groups

Revision ID: scaibunker_0003_images
Revises: scaibunker_0002_quotas
Create Date: 2026-11-29 21:05:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from scaigrid.platform.db import UTCDateTime

revision: str = "scaibunker_0003_images"
down_revision: str | Sequence[str] | None = "scaibunker_0002_quotas"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("scaibunker_images") as batch_op:
        batch_op.add_column(sa.Column("source_digest", sa.String(length=80), nullable=True))
        batch_op.add_column(sa.Column("bake_worker_id", sa.String(length=32), nullable=True))
        batch_op.add_column(
            sa.Column("builtin", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("scan", sa.JSON(), nullable=True))
    op.create_table(
        "scaibunker_image_workers",
        sa.Column("image_id", sa.String(length=32), nullable=False),
        sa.Column("worker_id", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("image_id", "worker_id", name=op.f("pk_scaibunker_image_workers")),
    )
    op.create_table(
        "scaibunker_image_findings",
        sa.Column("image_id", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("vulnerability_id", sa.String(length=256), nullable=False),
        sa.Column("pkg_name", sa.String(length=512), nullable=True),
        sa.Column("installed_version", sa.String(length=512), nullable=True),
        sa.Column("fixed_version", sa.String(length=512), nullable=True),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("title", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("image_id", "seq", name=op.f("pk_scaibunker_image_findings")),
    )
    with op.batch_alter_table("scaibunker_image_findings") as batch_op:
        batch_op.create_index(
            batch_op.f("ix_scaibunker_image_findings_severity"), ["severity"], unique=False
        )
    op.create_table(
        "scaibunker_availability_groups",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=True),
        sa.Column("worker_ids", sa.JSON(), nullable=False),
        sa.Column("image_ids", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scaibunker_availability_groups")),
    )
    with op.batch_alter_table("scaibunker_availability_groups") as batch_op:
        batch_op.create_index(
            batch_op.f("ix_scaibunker_availability_groups_name"), ["name"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_scaibunker_availability_groups_tenant_id"), ["tenant_id"], unique=False
        )


def downgrade() -> None:
    op.drop_table("scaibunker_availability_groups")
    op.drop_table("scaibunker_image_findings")
    op.drop_table("scaibunker_image_workers")
    with op.batch_alter_table("scaibunker_images") as batch_op:
        batch_op.drop_column("scan")
        batch_op.drop_column("builtin")
        batch_op.drop_column("bake_worker_id")
        batch_op.drop_column("source_digest")

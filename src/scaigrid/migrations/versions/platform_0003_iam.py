"""Platform: direct grants, custom roles, nested groups and role mappings.

Revision ID: platform_0003_iam
Revises: platform_0002_audit
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from scaigrid.platform.db import UTCDateTime

revision: str = "platform_0003_iam"
down_revision: str | Sequence[str] | None = "platform_0002_audit"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.String(length=32)


def _fk(table: str, column: str, target: str, cascade: bool = True) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column],
        [f"{target}.id"],
        name=op.f(f"fk_{table}_{column}_{target}"),
        ondelete="CASCADE" if cascade else None,
    )


def upgrade() -> None:
    op.create_table(
        "user_permissions",
        sa.Column("user_id", _ID, nullable=False),
        sa.Column("permission", sa.String(length=100), nullable=False),
        _fk("user_permissions", "user_id", "users"),
        sa.PrimaryKeyConstraint("user_id", "permission", name=op.f("pk_user_permissions")),
    )
    op.create_table(
        "custom_roles",
        sa.Column("id", _ID, nullable=False),
        sa.Column("tenant_id", _ID, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("core_permissions", sa.JSON(), nullable=False),
        sa.Column("module_permissions", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        _fk("custom_roles", "tenant_id", "tenants", cascade=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_custom_roles")),
        sa.UniqueConstraint("tenant_id", "name", name=op.f("uq_custom_roles_tenant_id_name")),
    )
    op.create_index(op.f("ix_custom_roles_tenant_id"), "custom_roles", ["tenant_id"])
    op.create_table(
        "user_roles",
        sa.Column("user_id", _ID, nullable=False),
        sa.Column("role_id", _ID, nullable=False),
        _fk("user_roles", "user_id", "users"),
        _fk("user_roles", "role_id", "custom_roles"),
        sa.PrimaryKeyConstraint("user_id", "role_id", name=op.f("pk_user_roles")),
    )
    op.create_table(
        "groups",
        sa.Column("id", _ID, nullable=False),
        sa.Column("tenant_id", _ID, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("parent_id", _ID, nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        _fk("groups", "tenant_id", "tenants", cascade=False),
        _fk("groups", "parent_id", "groups", cascade=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_groups")),
        sa.UniqueConstraint("tenant_id", "name", name=op.f("uq_groups_tenant_id_name")),
    )
    op.create_index(op.f("ix_groups_tenant_id"), "groups", ["tenant_id"])
    op.create_table(
        "group_members",
        sa.Column("group_id", _ID, nullable=False),
        sa.Column("user_id", _ID, nullable=False),
        _fk("group_members", "group_id", "groups"),
        _fk("group_members", "user_id", "users"),
        sa.PrimaryKeyConstraint("group_id", "user_id", name=op.f("pk_group_members")),
    )
    op.create_table(
        "role_mappings",
        sa.Column("id", _ID, nullable=False),
        sa.Column("tenant_id", _ID, nullable=False),
        sa.Column("group_id", _ID, nullable=False),
        sa.Column("role", _ID, nullable=False),
        sa.Column("auto_revoke", sa.Boolean(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        _fk("role_mappings", "tenant_id", "tenants", cascade=False),
        _fk("role_mappings", "group_id", "groups"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_role_mappings")),
        sa.UniqueConstraint("group_id", "role", name=op.f("uq_role_mappings_group_id_role")),
    )
    op.create_index(op.f("ix_role_mappings_tenant_id"), "role_mappings", ["tenant_id"])


def downgrade() -> None:
    op.drop_table("role_mappings")
    op.drop_table("group_members")
    op.drop_table("groups")
    op.drop_table("user_roles")
    op.drop_table("custom_roles")
    op.drop_table("user_permissions")

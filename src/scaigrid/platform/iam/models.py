"""ORM models of grants beyond built-in roles (SPEC §1.11): direct module permissions,
tenant custom roles, nested groups and group → role mappings."""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from scaigrid.ids import new_id
from scaigrid.platform.db import ID_LENGTH, Base, UTCDateTime, utcnow

#: Longest permission key.
PERMISSION_LENGTH = 100


class UserPermission(Base):
    """One module permission key granted directly to a user."""

    __tablename__ = "user_permissions"

    user_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    permission: Mapped[str] = mapped_column(String(PERMISSION_LENGTH), primary_key=True)


class CustomRole(Base):
    """A tenant-scoped, additive role. Id ``rol_…``. ``core_permissions`` and
    ``module_permissions`` are lists of keys."""

    __tablename__ = "custom_roles"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[str] = mapped_column(
        String(ID_LENGTH), primary_key=True, default=partial(new_id, "rol")
    )
    tenant_id: Mapped[str] = mapped_column(String(ID_LENGTH), ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    core_permissions: Mapped[list[Any]] = mapped_column(JSON)
    module_permissions: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class UserRole(Base):
    """A custom role assigned to a user."""

    __tablename__ = "user_roles"

    user_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    role_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("custom_roles.id", ondelete="CASCADE"), primary_key=True
    )


class Group(Base):
    """A group in a tenant. Id ``grp_…``. A member of a group is also a member of its
    ``parent_id`` group, transitively."""

    __tablename__ = "groups"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[str] = mapped_column(
        String(ID_LENGTH), primary_key=True, default=partial(new_id, "grp")
    )
    tenant_id: Mapped[str] = mapped_column(String(ID_LENGTH), ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    parent_id: Mapped[str | None] = mapped_column(
        String(ID_LENGTH), ForeignKey("groups.id"), default=None
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class GroupMember(Base):
    """A user directly in a group."""

    __tablename__ = "group_members"

    group_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )


class RoleMapping(Base):
    """Members of ``group_id`` (and of its descendants) get ``role``: a tenant built-in role
    name or a custom role id. Id ``rmp_…``. With ``auto_revoke`` the grant ends as soon as
    the membership does (always the case here: grants are resolved on each authentication)."""

    __tablename__ = "role_mappings"
    __table_args__ = (UniqueConstraint("group_id", "role"),)

    id: Mapped[str] = mapped_column(
        String(ID_LENGTH), primary_key=True, default=partial(new_id, "rmp")
    )
    tenant_id: Mapped[str] = mapped_column(String(ID_LENGTH), ForeignKey("tenants.id"), index=True)
    group_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("groups.id", ondelete="CASCADE")
    )
    role: Mapped[str] = mapped_column(String(ID_LENGTH))
    auto_revoke: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

"""ORM models of the tenancy hierarchy: Partner → Tenant → User (SPEC §1.3)."""

from __future__ import annotations

from datetime import datetime
from functools import partial

from sqlalchemy import CheckConstraint, ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from scaigrid.ids import new_id
from scaigrid.platform.db import ID_LENGTH, Base, UTCDateTime, utcnow
from scaigrid.platform.permissions import Role

#: Longest email address (RFC 5321 path limit).
EMAIL_LENGTH = 320
NAME_LENGTH = 200
SLUG_LENGTH = 63


class Partner(Base):
    """A partner: owns tenants. Id ``ptn_…``."""

    __tablename__ = "partners"

    id: Mapped[str] = mapped_column(
        String(ID_LENGTH), primary_key=True, default=partial(new_id, "ptn")
    )
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Tenant(Base):
    """A tenant under a partner; ``slug`` is unique platform-wide. Id ``ten_…``."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(
        String(ID_LENGTH), primary_key=True, default=partial(new_id, "ten")
    )
    partner_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("partners.id"), index=True
    )
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    slug: Mapped[str] = mapped_column(String(SLUG_LENGTH), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class User(Base):
    """A user in one tenant with one built-in role; email is unique within the tenant.

    Id ``usr_…``. ``role`` is a :class:`~scaigrid.platform.permissions.Role` value.
    """

    __tablename__ = "users"
    __table_args__ = (
        UniqueConstraint("tenant_id", "email"),
        CheckConstraint(
            "role IN (" + ", ".join(f"'{role.value}'" for role in Role) + ")", name="role"
        ),
    )

    id: Mapped[str] = mapped_column(
        String(ID_LENGTH), primary_key=True, default=partial(new_id, "usr")
    )
    tenant_id: Mapped[str] = mapped_column(String(ID_LENGTH), ForeignKey("tenants.id"))
    email: Mapped[str] = mapped_column(String(EMAIL_LENGTH))
    display_name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    role: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

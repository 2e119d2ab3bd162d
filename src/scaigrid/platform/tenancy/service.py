"""Partners, tenants and users: creation and lookup (SPEC §1.3).

Functions flush but never commit: the caller owns the unit of work.
"""

from __future__ import annotations

import re

import structlog
from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.platform.permissions import Role
from scaigrid.platform.tenancy.models import EMAIL_LENGTH, Partner, Tenant, User

log = structlog.get_logger(__name__)

#: Lowercase letters, digits and inner hyphens, 1 to 63 characters (a DNS label).
SLUG_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+")


async def _flush_unique(session: AsyncSession, conflict: str) -> None:
    try:
        await session.flush()
    except IntegrityError as exc:
        raise errors.SlugConflict(conflict) from exc


async def create_partner(session: AsyncSession, name: str) -> Partner:
    """Create a partner named ``name``."""
    partner = Partner(name=name)
    session.add(partner)
    await session.flush()
    log.info("tenancy.partner_created", partner_id=partner.id)
    return partner


async def default_partner(session: AsyncSession) -> Partner:
    """Return the oldest partner (the one created by bootstrap).

    Raises:
        NotFound: there is no partner yet.
    """
    partner = await session.scalar(select(Partner).order_by(Partner.created_at, Partner.id))
    if partner is None:
        raise errors.NotFound("No partner exists yet")
    return partner


async def create_tenant(session: AsyncSession, partner_id: str, name: str, slug: str) -> Tenant:
    """Create a tenant under ``partner_id`` with a platform-unique ``slug``.

    Raises:
        ValidationFailed: ``slug`` is not a DNS label (lowercase, digits, hyphens, ≤ 63).
        NotFound: no partner ``partner_id``.
        SlugConflict: the slug is taken.
    """
    if not SLUG_RE.fullmatch(slug):
        raise errors.ValidationFailed(
            "Invalid tenant slug",
            details=[{"field": "slug", "message": "lowercase letters, digits and hyphens"}],
        )
    if await session.get(Partner, partner_id) is None:
        raise errors.NotFound(f"No partner {partner_id}")
    if await session.scalar(select(Tenant.id).where(Tenant.slug == slug)) is not None:
        raise errors.SlugConflict(f"Tenant slug {slug!r} is taken")
    tenant = Tenant(partner_id=partner_id, name=name, slug=slug)
    session.add(tenant)
    await _flush_unique(session, f"Tenant slug {slug!r} is taken")
    log.info("tenancy.tenant_created", tenant_id=tenant.id, partner_id=partner_id)
    return tenant


def slugify(name: str) -> str:
    """Derive a tenant slug from a display name (``"Acme Labs"`` → ``"acme-labs"``).

    Raises:
        ValidationFailed: nothing usable is left of the name.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:63].rstrip("-")
    if not slug:
        raise errors.ValidationFailed(f"Cannot derive a slug from {name!r}: give one")
    return slug


async def get_tenant(session: AsyncSession, ref: str) -> Tenant:
    """Return the tenant whose id (``ten_…``) or slug is ``ref``.

    Raises:
        NotFound: no such tenant.
    """
    tenant = await session.scalar(select(Tenant).where(or_(Tenant.id == ref, Tenant.slug == ref)))
    if tenant is None:
        raise errors.NotFound(f"No tenant {ref!r}")
    return tenant


async def create_user(
    session: AsyncSession,
    tenant_id: str,
    email: str,
    role: Role | str,
    display_name: str | None = None,
) -> User:
    """Create a user in ``tenant_id``; the email is stored lowercased.

    Raises:
        ValidationFailed: bad email or unknown role.
        SlugConflict: the email already exists in the tenant.
    """
    email = email.strip().lower()
    if len(email) > EMAIL_LENGTH or not _EMAIL_RE.fullmatch(email):
        raise errors.ValidationFailed(
            "Invalid email", details=[{"field": "email", "message": "not an email address"}]
        )
    if role not in {r.value for r in Role}:
        raise errors.ValidationFailed(
            "Unknown role",
            details=[{"field": "role", "message": f"one of {', '.join(r.value for r in Role)}"}],
        )
    existing = select(User.id).where(User.tenant_id == tenant_id, User.email == email)
    if await session.scalar(existing) is not None:
        raise errors.SlugConflict(f"User {email} already exists in this tenant")
    user = User(
        tenant_id=tenant_id,
        email=email,
        role=Role(role).value,
        display_name=display_name or email.split("@", 1)[0],
    )
    session.add(user)
    await _flush_unique(session, f"User {email} already exists in this tenant")
    log.info("tenancy.user_created", user_id=user.id, tenant_id=tenant_id, role=user.role)
    return user


async def find_user_by_email(
    session: AsyncSession, email: str, tenant_ref: str | None = None
) -> User:
    """Return the user with ``email`` (in tenant ``tenant_ref``, an id or slug, when given).

    Raises:
        NotFound: no such user (or no such tenant).
        ValidationFailed: the email exists in several tenants and no tenant was given.
    """
    query = select(User).where(User.email == email.strip().lower())
    if tenant_ref is not None:
        query = query.where(User.tenant_id == (await get_tenant(session, tenant_ref)).id)
    users = list((await session.scalars(query.limit(2))).all())
    if not users:
        raise errors.NotFound(f"No user {email}")
    if len(users) > 1:
        raise errors.ValidationFailed(f"{email} exists in several tenants: name the tenant")
    return users[0]


async def count_users(session: AsyncSession, role: Role) -> int:
    """Return how many users hold ``role``."""
    return int(await session.scalar(select(func.count()).where(User.role == role.value)) or 0)

"""Partners, tenants and users under ``/v1`` (SPEC §1.3).

Reach: ``super_admin`` everything; ``partner_admin`` its partner and that partner's tenants
and users; ``tenant_admin`` its own tenant's users. Anything outside the caller's visibility
is 404, never 403.
"""

from __future__ import annotations

from typing import Annotated, Any, Protocol, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.platform.auth import CurrentPrincipal, Principal
from scaigrid.platform.auth.models import ApiKey
from scaigrid.platform.db import get_session
from scaigrid.platform.envelope import ok, ok_list
from scaigrid.platform.iam import service as iam
from scaigrid.platform.iam.models import GroupMember, UserPermission, UserRole
from scaigrid.platform.pagination import Limit, id_cursor, page
from scaigrid.platform.permissions import Role
from scaigrid.platform.tenancy import service as tenancy
from scaigrid.platform.tenancy.models import NAME_LENGTH, Partner, Tenant, User

router = APIRouter(prefix="/v1", tags=["tenancy"])
Session = Annotated[AsyncSession, Depends(get_session)]


class PartnerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=NAME_LENGTH)


class TenantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=NAME_LENGTH)
    slug: str | None = Field(default=None, max_length=63)
    partner_id: str | None = Field(default=None, max_length=32)


class TenantPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=NAME_LENGTH)


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: str = Field(min_length=3, max_length=320)
    role: str = Role.TENANT_USER.value
    display_name: str | None = Field(default=None, max_length=NAME_LENGTH)
    tenant_id: str | None = Field(default=None, max_length=32)


class UserPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str | None = None
    display_name: str | None = Field(default=None, min_length=1, max_length=NAME_LENGTH)


def _partner_out(p: Partner) -> dict[str, object]:
    return {"id": p.id, "name": p.name, "created_at": p.created_at}


def _tenant_out(t: Tenant) -> dict[str, object]:
    return {
        "id": t.id,
        "partner_id": t.partner_id,
        "name": t.name,
        "slug": t.slug,
        "created_at": t.created_at,
    }


def user_out(u: User) -> dict[str, object]:
    """Public shape of a user."""
    return {
        "id": u.id,
        "tenant_id": u.tenant_id,
        "email": u.email,
        "display_name": u.display_name,
        "role": u.role,
        "created_at": u.created_at,
    }


def _platform_only(principal: Principal) -> None:
    if not principal.is_super_admin:
        raise errors.AuthzPermissionDenied("Only a super_admin manages partners")


async def _visible_partner(session: AsyncSession, principal: Principal, partner_id: str) -> Partner:
    partner = await session.get(Partner, partner_id)
    if partner is None or not (principal.is_super_admin or partner.id == principal.partner_id):
        raise errors.NotFound(f"No partner {partner_id}")
    return partner


@router.post("/partners", status_code=201)
async def create_partner(
    body: PartnerIn, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """Create a partner (``super_admin`` only; 403 otherwise)."""
    _platform_only(principal)
    partner = await tenancy.create_partner(session, body.name)
    await session.commit()
    return ok(_partner_out(partner), 201)


@router.get("/partners")
async def list_partners(
    principal: CurrentPrincipal,
    session: Session,
    limit: Limit = 100,
    cursor: Annotated[str | None, id_cursor("ptn")] = None,
) -> JSONResponse:
    """Partners within reach: all for ``super_admin``, otherwise the caller's own."""
    query = select(Partner)
    if not principal.is_super_admin:
        query = query.where(Partner.id == principal.partner_id)
    rows, nxt = await page(session, query, Partner.id, limit, cursor)
    return ok_list([_partner_out(p) for p in rows], nxt)


@router.get("/partners/{partner_id}")
async def get_partner(
    partner_id: str, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """One partner within reach (404 otherwise)."""
    return ok(_partner_out(await _visible_partner(session, principal, partner_id)))


@router.patch("/partners/{partner_id}")
async def update_partner(
    partner_id: str, body: PartnerIn, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """Rename a partner (``super_admin`` only)."""
    partner = await _visible_partner(session, principal, partner_id)
    _platform_only(principal)
    partner.name = body.name
    await session.commit()
    return ok(_partner_out(partner))


@router.delete("/partners/{partner_id}")
async def delete_partner(
    partner_id: str, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """Delete a partner without tenants (``super_admin`` only; 409 ``RESOURCE_IN_USE``)."""
    partner = await _visible_partner(session, principal, partner_id)
    _platform_only(principal)
    if await session.scalar(select(func.count()).where(Tenant.partner_id == partner.id)):
        raise errors.ResourceInUse("The partner still has tenants")
    await session.delete(partner)
    await session.commit()
    return ok({"id": partner_id, "deleted": True})


async def visible_tenant(session: AsyncSession, principal: Principal, tenant_id: str) -> Tenant:
    """The tenant ``tenant_id`` if ``principal`` may read it.

    Raises:
        NotFound: unknown or outside the caller's reach (404).
    """
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None or not iam.can_read_tenant(principal, tenant):
        raise errors.NotFound(f"No tenant {tenant_id}")
    return tenant


async def administered_tenant(
    session: AsyncSession, principal: Principal, tenant_id: str
) -> Tenant:
    """The tenant ``tenant_id`` if ``principal`` administers it.

    Raises:
        NotFound: unknown or invisible (404).
        AuthzPermissionDenied: visible but not administered by the caller (403).
    """
    tenant = await visible_tenant(session, principal, tenant_id)
    if not iam.can_admin_tenant(principal, tenant):
        raise errors.AuthzPermissionDenied("You do not administer this tenant")
    return tenant


class TenantOwned(Protocol):
    """A row that belongs to one tenant (custom roles, groups, webhooks, ...)."""

    id: Any
    tenant_id: Any


R = TypeVar("R", bound=TenantOwned)


async def administered_row(
    session: AsyncSession, principal: Principal, model: type[R], row_id: str, label: str
) -> R:
    """The ``model`` row ``row_id`` if ``principal`` administers its tenant.

    Args:
        label: what the row is, for the message (``"custom role"``).

    Raises:
        NotFound: unknown, or of a tenant the caller does not administer (404 either way,
            so ids of other tenants' rows are not confirmed).
    """
    row = await session.get(model, row_id)
    if row is None:
        raise errors.NotFound(f"No {label} {row_id}")
    try:
        await administered_tenant(session, principal, row.tenant_id)
    except errors.ScaiGridError as exc:
        raise errors.NotFound(f"No {label} {row_id}") from exc
    return row


async def administered_page(
    session: AsyncSession,
    principal: Principal,
    model: type[R],
    tenant_id: str | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[R], str | None]:
    """One page (newest first, SPEC §1.4) of the ``model`` rows of ``tenant_id`` (default:
    the caller's tenant), which the caller must administer.

    Raises:
        NotFound: unknown or invisible tenant (404).
        AuthzPermissionDenied: a visible tenant the caller does not administer (403).
    """
    tenant = await administered_tenant(session, principal, tenant_id or principal.tenant_id)
    table: Any = model
    query = select(table).where(table.tenant_id == tenant.id)
    return await page(session, query, table.id, limit, cursor)


@router.post("/tenants", status_code=201)
async def create_tenant(
    body: TenantIn, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """Create a tenant under ``partner_id`` (default: the caller's partner). ``super_admin``
    anywhere, ``partner_admin`` under its own partner; 403 for everyone else."""
    if principal.role not in (Role.SUPER_ADMIN, Role.PARTNER_ADMIN):
        raise errors.AuthzPermissionDenied(
            "Only partner and platform administrators create tenants"
        )
    partner = await _visible_partner(session, principal, body.partner_id or principal.partner_id)
    tenant = await tenancy.create_tenant(
        session, partner.id, body.name, body.slug or tenancy.slugify(body.name)
    )
    await session.commit()
    return ok(_tenant_out(tenant), 201)


@router.get("/tenants")
async def list_tenants(
    principal: CurrentPrincipal,
    session: Session,
    limit: Limit = 100,
    cursor: Annotated[str | None, id_cursor("ten")] = None,
) -> JSONResponse:
    """Tenants within reach: all (``super_admin``), the partner's (partner roles), or the
    caller's own."""
    query = select(Tenant)
    if principal.role in (Role.PARTNER_ADMIN, Role.PARTNER_VIEWER):
        query = query.where(Tenant.partner_id == principal.partner_id)
    elif not principal.is_super_admin:
        query = query.where(Tenant.id == principal.tenant_id)
    rows, nxt = await page(session, query, Tenant.id, limit, cursor)
    return ok_list([_tenant_out(t) for t in rows], nxt)


@router.get("/tenants/{tenant_id}")
async def get_tenant(tenant_id: str, principal: CurrentPrincipal, session: Session) -> JSONResponse:
    """One tenant within reach (404 otherwise)."""
    return ok(_tenant_out(await visible_tenant(session, principal, tenant_id)))


@router.patch("/tenants/{tenant_id}")
async def update_tenant(
    tenant_id: str, body: TenantPatch, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """Rename a tenant the caller administers."""
    tenant = await administered_tenant(session, principal, tenant_id)
    tenant.name = body.name
    await session.commit()
    return ok(_tenant_out(tenant))


@router.delete("/tenants/{tenant_id}")
async def delete_tenant(
    tenant_id: str, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """Delete an empty tenant (partner or platform administrators; 409 while it has users)."""
    tenant = await administered_tenant(session, principal, tenant_id)
    if principal.role is Role.TENANT_ADMIN:
        raise errors.AuthzPermissionDenied("A tenant admin cannot delete its tenant")
    if await session.scalar(select(func.count()).where(User.tenant_id == tenant.id)):
        raise errors.ResourceInUse("The tenant still has users")
    await session.delete(tenant)
    await session.commit()
    return ok({"id": tenant_id, "deleted": True})


async def visible_user(session: AsyncSession, principal: Principal, user_id: str) -> User:
    """The user ``user_id`` if ``principal`` is that user or reads its tenant's users.

    Raises:
        NotFound: unknown or invisible (404).
    """
    user = await session.get(User, user_id)
    if user is not None and user.id == principal.user_id:
        return user
    tenant = None if user is None else await session.get(Tenant, user.tenant_id)
    readers = tenant is not None and (
        iam.can_admin_tenant(principal, tenant)
        or (principal.role is Role.PARTNER_VIEWER and tenant.partner_id == principal.partner_id)
    )
    if user is None or not readers:
        raise errors.NotFound(f"No user {user_id}")
    return user


async def administered_user(session: AsyncSession, principal: Principal, user_id: str) -> User:
    """The user ``user_id`` if ``principal`` administers its tenant.

    Raises:
        NotFound: unknown or invisible (404).
        AuthzPermissionDenied: visible but not administered (403).
    """
    user = await visible_user(session, principal, user_id)
    tenant = await session.get(Tenant, user.tenant_id)
    if tenant is None or not iam.can_admin_tenant(principal, tenant):
        raise errors.AuthzPermissionDenied("You do not administer this user's tenant")
    return user


@router.post("/users", status_code=201)
async def create_user(body: UserIn, principal: CurrentPrincipal, session: Session) -> JSONResponse:
    """Create a user in ``tenant_id`` (default: the caller's tenant) with a role the caller
    may assign (403 otherwise)."""
    tenant = await administered_tenant(session, principal, body.tenant_id or principal.tenant_id)
    role = iam.check_role_assignable(principal, body.role)
    user = await tenancy.create_user(session, tenant.id, body.email, role, body.display_name)
    await session.commit()
    return ok(user_out(user), 201)


@router.get("/users")
async def list_users(
    request: Request,
    principal: CurrentPrincipal,
    session: Session,
    tenant_id: str | None = None,
    limit: Limit = 100,
    cursor: Annotated[str | None, id_cursor("usr")] = None,
) -> JSONResponse:
    """Users of ``tenant_id`` (default: the caller's tenant); non-administrators see only
    themselves."""
    tenant = await visible_tenant(session, principal, tenant_id or principal.tenant_id)
    query = select(User).where(User.tenant_id == tenant.id)
    readers = iam.can_admin_tenant(principal, tenant) or principal.role is Role.PARTNER_VIEWER
    if not readers:
        query = query.where(User.id == principal.user_id)
    rows, nxt = await page(session, query, User.id, limit, cursor)
    return ok_list([user_out(u) for u in rows], nxt)


@router.get("/users/{user_id}")
async def get_user(user_id: str, principal: CurrentPrincipal, session: Session) -> JSONResponse:
    """One user within reach, with ``permissions`` (every key it holds)."""
    user = await visible_user(session, principal, user_id)
    keys = sorted(await iam.effective_permissions(session, user))
    return ok({**user_out(user), "permissions": keys})


@router.patch("/users/{user_id}")
async def update_user(
    request: Request, user_id: str, body: UserPatch, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """Change a user's ``display_name`` or ``role`` (a role the caller may assign)."""
    user = await administered_user(session, principal, user_id)
    if body.role is not None:
        user.role = iam.check_role_assignable(principal, body.role).value
    if body.display_name is not None:
        user.display_name = body.display_name
    await session.commit()
    request.app.state.principal_cache.clear()
    return ok(user_out(user))


@router.delete("/users/{user_id}")
async def delete_user(
    request: Request, user_id: str, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """Delete a user, its API keys and grants (409 ``RESOURCE_IN_USE`` while it owns
    resources such as bunkers)."""
    user = await administered_user(session, principal, user_id)
    if user.id == principal.user_id:
        raise errors.AuthzPermissionDenied("You cannot delete yourself")
    iam.check_role_assignable(principal, user.role)
    for table in (ApiKey, UserPermission, UserRole, GroupMember):
        await session.execute(delete(table).where(table.user_id == user.id))
    await session.delete(user)
    try:
        await session.commit()
    except IntegrityError as exc:
        raise errors.ResourceInUse("The user still owns resources") from exc
    request.app.state.principal_cache.clear()
    return ok({"id": user_id, "deleted": True})

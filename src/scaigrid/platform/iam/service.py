"""Who may do what to whom (SPEC §1.3, §1.11).

* Reach: :func:`can_admin_tenant` / :func:`can_read_tenant` — ``super_admin`` reaches every
  tenant, partner roles the tenants of their partner, ``tenant_admin`` its own tenant.
* Effective permissions: :func:`effective_permissions` — the built-in role's keys plus direct
  grants, custom roles, and roles mapped to any group the user is in (directly or through a
  child group, transitively).
* Grants: nobody can grant a key they do not hold (:func:`check_grantable`).

Functions flush but never commit.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.platform.auth.principal import Principal
from scaigrid.platform.iam.models import (
    CustomRole,
    Group,
    GroupMember,
    RoleMapping,
    UserPermission,
    UserRole,
)
from scaigrid.platform.permissions import (
    SCAIBUNKER_PERMISSIONS,
    Role,
    permissions_for_role,
)
from scaigrid.platform.tenancy.models import Tenant, User

#: Built-in roles a group mapping may name (tenant roles only: mappings live in a tenant).
MAPPABLE_ROLES = frozenset({Role.TENANT_ADMIN, Role.TENANT_USER, Role.TENANT_VIEWER})
MODULE_PERMISSIONS = frozenset(SCAIBUNKER_PERMISSIONS)

#: Roles each administrator may give a user (and so create users with).
_ASSIGNABLE: dict[Role, frozenset[Role]] = {
    Role.SUPER_ADMIN: frozenset(Role),
    Role.PARTNER_ADMIN: frozenset(Role) - {Role.SUPER_ADMIN},
    Role.TENANT_ADMIN: frozenset({Role.TENANT_ADMIN, Role.TENANT_USER, Role.TENANT_VIEWER}),
}


def can_admin_tenant(principal: Principal, tenant: Tenant) -> bool:
    """True when ``principal`` administers ``tenant`` (users, keys, grants, groups)."""
    if principal.is_super_admin:
        return True
    if principal.role is Role.PARTNER_ADMIN:
        return tenant.partner_id == principal.partner_id
    return principal.role is Role.TENANT_ADMIN and tenant.id == principal.tenant_id


def can_read_tenant(principal: Principal, tenant: Tenant) -> bool:
    """True when ``principal`` may read ``tenant`` and its users: its administrators, the
    partner viewer of its partner, and its own users (their tenant record only)."""
    if can_admin_tenant(principal, tenant) or tenant.id == principal.tenant_id:
        return True
    return principal.role is Role.PARTNER_VIEWER and tenant.partner_id == principal.partner_id


def check_role_assignable(principal: Principal, role: str) -> Role:
    """Return ``role`` when ``principal`` may give it to a user.

    Raises:
        ValidationFailed: not a built-in role (422).
        AuthzPermissionDenied: the role is wider than the caller may give (403).
    """
    try:
        wanted = Role(role)
    except ValueError as exc:
        raise errors.ValidationFailed(
            "Unknown role",
            details=[{"field": "role", "message": f"one of {', '.join(r.value for r in Role)}"}],
        ) from exc
    if wanted not in _ASSIGNABLE.get(principal.role, frozenset()):
        raise errors.AuthzPermissionDenied(
            f"A {principal.role.value} cannot assign the role {wanted.value}",
            details={"role": wanted.value},
        )
    return wanted


def check_grantable(principal: Principal, keys: Iterable[str]) -> None:
    """Refuse to grant a key the granter does not hold.

    Raises:
        AuthzPermissionDenied: ``details = {"permission": <first key not held>}`` (403).
    """
    for key in sorted(set(keys)):
        if not principal.has(key):
            raise errors.AuthzPermissionDenied(
                f"You cannot grant {key}: you do not hold it", details={"permission": key}
            )


def validate_keys(keys: Iterable[str], allowed: frozenset[str], field: str) -> list[str]:
    """Return ``keys`` sorted and de-duplicated.

    Raises:
        ValidationFailed: a key is not in ``allowed`` (422, the first one named).
    """
    given = list(keys)
    for index, key in enumerate(given):
        if key not in allowed:
            raise errors.ValidationFailed(
                "Unknown permission key",
                details=[{"field": f"{field}[{index}]", "message": f"{key!r} is not a key here"}],
            )
    return sorted(set(given))


async def group_closure(session: AsyncSession, user_id: str) -> set[str]:
    """Ids of every group ``user_id`` is in: its direct groups and all their ancestors."""
    found = set(
        await session.scalars(select(GroupMember.group_id).where(GroupMember.user_id == user_id))
    )
    frontier = set(found)
    while frontier:
        parents = set(
            await session.scalars(
                select(Group.parent_id).where(Group.id.in_(frontier), Group.parent_id.is_not(None))
            )
        )
        frontier = {p for p in parents if p is not None} - found
        found |= frontier
    return found


async def effective_permissions(session: AsyncSession, user: User) -> frozenset[str]:
    """Every key ``user`` holds (see the module docstring)."""
    keys = set(permissions_for_role(user.role))
    keys |= set(
        await session.scalars(
            select(UserPermission.permission).where(UserPermission.user_id == user.id)
        )
    )
    role_ids = set(
        await session.scalars(select(UserRole.role_id).where(UserRole.user_id == user.id))
    )
    groups = await group_closure(session, user.id)
    if groups:
        for mapped in await session.scalars(
            select(RoleMapping.role).where(RoleMapping.group_id.in_(groups))
        ):
            if mapped in {r.value for r in MAPPABLE_ROLES}:
                keys |= permissions_for_role(mapped)
            else:
                role_ids.add(mapped)
    if role_ids:
        for role in await session.scalars(
            select(CustomRole).where(
                CustomRole.id.in_(role_ids), CustomRole.tenant_id == user.tenant_id
            )
        ):
            keys |= set(role.core_permissions) | set(role.module_permissions)
    return frozenset(keys)


async def set_direct_permissions(
    session: AsyncSession, principal: Principal, user: User, keys: list[str]
) -> list[str]:
    """Replace ``user``'s direct module permissions with ``keys``; return them sorted.

    Raises:
        ValidationFailed: a key is not a module permission key (422).
        AuthzPermissionDenied: a key being added is not held by ``principal`` (403).
    """
    wanted = validate_keys(keys, MODULE_PERMISSIONS, "permissions")
    current = set(
        await session.scalars(
            select(UserPermission.permission).where(UserPermission.user_id == user.id)
        )
    )
    check_grantable(principal, set(wanted) - current)
    await session.execute(delete(UserPermission).where(UserPermission.user_id == user.id))
    session.add_all(UserPermission(user_id=user.id, permission=key) for key in wanted)
    await session.flush()
    return wanted


async def direct_permissions(session: AsyncSession, user_id: str) -> list[str]:
    """``user_id``'s direct module permissions, sorted."""
    return sorted(
        await session.scalars(
            select(UserPermission.permission).where(UserPermission.user_id == user_id)
        )
    )


async def custom_role_in(session: AsyncSession, tenant_id: str, role_id: str) -> CustomRole:
    """The custom role ``role_id`` of ``tenant_id``.

    Raises:
        NotFound: no such role in that tenant (404).
    """
    role = await session.get(CustomRole, role_id)
    if role is None or role.tenant_id != tenant_id:
        raise errors.NotFound(f"No custom role {role_id}")
    return role


def role_keys(role: CustomRole) -> set[str]:
    """Every key a custom role grants."""
    return set(role.core_permissions) | set(role.module_permissions)

"""Grants under ``/v1`` (SPEC §1.11): direct module permissions, custom roles and their
assignment, nested groups and group → role mappings.

All of it is managed by administrators of the tenant concerned (``tenant_admin`` for its
tenant, ``partner_admin`` for its partner's, ``super_admin`` anywhere), and nobody grants a
key they do not hold (403 ``AUTHZ_PERMISSION_DENIED`` naming the key). Every change drops
the principal cache so new grants apply to the next request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.platform.auth import CurrentPrincipal, Principal
from scaigrid.platform.db import get_session
from scaigrid.platform.envelope import ok, ok_list
from scaigrid.platform.iam import service as iam
from scaigrid.platform.iam.models import CustomRole, Group, GroupMember, RoleMapping, UserRole
from scaigrid.platform.modules.service import is_enabled
from scaigrid.platform.pagination import Limit, id_cursor
from scaigrid.platform.permissions import CORE_PERMISSIONS, permissions_for_role
from scaigrid.platform.tenancy.models import User
from scaigrid.platform.tenancy.router import (
    administered_page,
    administered_row,
    administered_tenant,
    administered_user,
)

router = APIRouter(prefix="/v1", tags=["iam"])
Session = Annotated[AsyncSession, Depends(get_session)]
_Keys = Annotated[list[Annotated[str, Field(max_length=100)]], Field(max_length=64)]
_Ids = Annotated[list[Annotated[str, Field(max_length=32)]], Field(max_length=1000)]


class PermissionsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    permissions: _Keys


class CustomRoleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    core_permissions: _Keys = Field(default_factory=list)
    module_permissions: _Keys = Field(default_factory=list)
    tenant_id: str | None = Field(default=None, max_length=32)


class RoleIdsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role_ids: _Ids


class GroupIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    parent_id: str | None = Field(default=None, max_length=32)
    tenant_id: str | None = Field(default=None, max_length=32)


class MembersIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_ids: _Ids


class RoleMappingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    group_id: str = Field(max_length=32)
    role: str = Field(max_length=32)
    auto_revoke: bool = True


def _changed(request: Request) -> None:
    request.app.state.principal_cache.clear()


def _role_out(role: CustomRole) -> dict[str, object]:
    return {
        "id": role.id,
        "tenant_id": role.tenant_id,
        "name": role.name,
        "core_permissions": role.core_permissions,
        "module_permissions": role.module_permissions,
        "created_at": role.created_at,
    }


def _group_out(group: Group, members: list[str]) -> dict[str, object]:
    return {
        "id": group.id,
        "tenant_id": group.tenant_id,
        "name": group.name,
        "parent_id": group.parent_id,
        "member_ids": members,
        "created_at": group.created_at,
    }


def _mapping_out(m: RoleMapping) -> dict[str, object]:
    return {
        "id": m.id,
        "tenant_id": m.tenant_id,
        "group_id": m.group_id,
        "role": m.role,
        "auto_revoke": m.auto_revoke,
        "created_at": m.created_at,
    }


@router.get("/users/{user_id}/module-permissions")
async def get_module_permissions(
    user_id: str, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """The user's direct module permissions: ``{"permissions": [...]}``."""
    user = await administered_user(session, principal, user_id)
    return ok({"user_id": user.id, "permissions": await iam.direct_permissions(session, user.id)})


@router.put("/users/{user_id}/module-permissions")
async def put_module_permissions(
    request: Request,
    user_id: str,
    body: PermissionsIn,
    principal: CurrentPrincipal,
    session: Session,
) -> JSONResponse:
    """Replace the user's direct module permissions (``scaibunker:*`` keys only, 422 for
    others); every added key must be held by the caller (403)."""
    user = await administered_user(session, principal, user_id)
    keys = await iam.set_direct_permissions(session, principal, user, body.permissions)
    await session.commit()
    _changed(request)
    return ok({"user_id": user.id, "permissions": keys})


@router.post("/iam/custom-roles", status_code=201)
async def create_custom_role(
    body: CustomRoleIn, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """Create a custom role in ``tenant_id`` (default: the caller's). ``module_permissions``
    may only name keys of modules enabled for the tenant (422 otherwise)."""
    tenant = await administered_tenant(session, principal, body.tenant_id or principal.tenant_id)
    core = iam.validate_keys(body.core_permissions, CORE_PERMISSIONS, "core_permissions")
    module = iam.validate_keys(
        body.module_permissions, iam.MODULE_PERMISSIONS, "module_permissions"
    )
    iam.check_grantable(principal, [*core, *module])
    for index, key in enumerate(module):
        name = key.split(":", 1)[0]
        if not await is_enabled(session, name, tenant.id, tenant.partner_id):
            raise errors.ValidationFailed(
                f"The {name} module is not enabled for this tenant",
                details=[{"field": f"module_permissions[{index}]", "message": "module disabled"}],
            )
    if await session.scalar(
        select(CustomRole.id).where(CustomRole.tenant_id == tenant.id, CustomRole.name == body.name)
    ):
        raise errors.SlugConflict(f"A custom role named {body.name!r} exists")
    role = CustomRole(
        tenant_id=tenant.id, name=body.name, core_permissions=core, module_permissions=module
    )
    session.add(role)
    await session.commit()
    return ok(_role_out(role), 201)


@router.get("/iam/custom-roles")
async def list_custom_roles(
    principal: CurrentPrincipal,
    session: Session,
    tenant_id: str | None = None,
    limit: Limit = 100,
    cursor: Annotated[str | None, id_cursor("rol")] = None,
) -> JSONResponse:
    """Custom roles of ``tenant_id`` (default: the caller's)."""
    rows, nxt = await administered_page(session, principal, CustomRole, tenant_id, limit, cursor)
    return ok_list([_role_out(r) for r in rows], nxt)


async def _role(session: AsyncSession, principal: Principal, role_id: str) -> CustomRole:
    return await administered_row(session, principal, CustomRole, role_id, "custom role")


@router.get("/iam/custom-roles/{role_id}")
async def get_custom_role(
    role_id: str, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """One custom role of a tenant the caller administers (404 otherwise)."""
    return ok(_role_out(await _role(session, principal, role_id)))


@router.delete("/iam/custom-roles/{role_id}")
async def delete_custom_role(
    request: Request, role_id: str, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """Delete a custom role; its holders lose its keys at once."""
    role = await _role(session, principal, role_id)
    await session.execute(delete(UserRole).where(UserRole.role_id == role.id))
    await session.execute(delete(RoleMapping).where(RoleMapping.role == role.id))
    await session.delete(role)
    await session.commit()
    _changed(request)
    return ok({"id": role_id, "deleted": True})


@router.put("/users/{user_id}/custom-roles")
async def put_user_custom_roles(
    request: Request, user_id: str, body: RoleIdsIn, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """Replace the user's custom roles (roles of the user's tenant; the caller must hold
    every key of each added role)."""
    user = await administered_user(session, principal, user_id)
    current = set(
        await session.scalars(select(UserRole.role_id).where(UserRole.user_id == user.id))
    )
    wanted = sorted(set(body.role_ids))
    for role_id in wanted:
        role = await iam.custom_role_in(session, user.tenant_id, role_id)
        if role_id not in current:
            iam.check_grantable(principal, iam.role_keys(role))
    await session.execute(delete(UserRole).where(UserRole.user_id == user.id))
    session.add_all(UserRole(user_id=user.id, role_id=r) for r in wanted)
    await session.commit()
    _changed(request)
    return ok({"user_id": user.id, "role_ids": wanted})


async def _group(session: AsyncSession, principal: Principal, group_id: str) -> Group:
    return await administered_row(session, principal, Group, group_id, "group")


async def _members(session: AsyncSession, group_id: str) -> list[str]:
    query = select(GroupMember.user_id).where(GroupMember.group_id == group_id)
    return sorted(await session.scalars(query))


@router.post("/groups", status_code=201)
async def create_group(
    body: GroupIn, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """Create a group in ``tenant_id`` (default: the caller's), optionally nested under
    ``parent_id`` (a group of the same tenant): members of this group are members of the
    parent too."""
    tenant = await administered_tenant(session, principal, body.tenant_id or principal.tenant_id)
    if body.parent_id is not None:
        parent = await session.get(Group, body.parent_id)
        if parent is None or parent.tenant_id != tenant.id:
            raise errors.NotFound(f"No group {body.parent_id}")
    if await session.scalar(
        select(Group.id).where(Group.tenant_id == tenant.id, Group.name == body.name)
    ):
        raise errors.SlugConflict(f"A group named {body.name!r} exists")
    group = Group(tenant_id=tenant.id, name=body.name, parent_id=body.parent_id)
    session.add(group)
    await session.commit()
    return ok(_group_out(group, []), 201)


@router.get("/groups")
async def list_groups(
    principal: CurrentPrincipal,
    session: Session,
    tenant_id: str | None = None,
    limit: Limit = 100,
    cursor: Annotated[str | None, id_cursor("grp")] = None,
) -> JSONResponse:
    """Groups of ``tenant_id`` (default: the caller's) with their direct members."""
    rows, nxt = await administered_page(session, principal, Group, tenant_id, limit, cursor)
    return ok_list([_group_out(g, await _members(session, g.id)) for g in rows], nxt)


@router.get("/groups/{group_id}")
async def get_group(group_id: str, principal: CurrentPrincipal, session: Session) -> JSONResponse:
    """One group with its direct members."""
    group = await _group(session, principal, group_id)
    return ok(_group_out(group, await _members(session, group.id)))


@router.put("/groups/{group_id}/members")
async def put_group_members(
    request: Request, group_id: str, body: MembersIn, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """Replace the group's direct members (users of the group's tenant). Adding a user
    grants it the roles mapped to this group and its ancestors, so the caller must hold
    their keys."""
    group = await _group(session, principal, group_id)
    wanted = sorted(set(body.user_ids))
    for user_id in wanted:
        user = await session.get(User, user_id)
        if user is None or user.tenant_id != group.tenant_id:
            raise errors.NotFound(f"No user {user_id}")
    iam.check_grantable(principal, await _group_keys(session, group))
    await session.execute(delete(GroupMember).where(GroupMember.group_id == group.id))
    session.add_all(GroupMember(group_id=group.id, user_id=u) for u in wanted)
    await session.commit()
    _changed(request)
    return ok(_group_out(group, wanted))


async def _group_keys(session: AsyncSession, group: Group) -> set[str]:
    """Keys granted through ``group`` and its ancestors' role mappings."""
    ids, cursor = {group.id}, group.parent_id
    while cursor is not None and cursor not in ids:
        ids.add(cursor)
        cursor = await session.scalar(select(Group.parent_id).where(Group.id == cursor))
    keys: set[str] = set()
    for mapped in await session.scalars(
        select(RoleMapping.role).where(RoleMapping.group_id.in_(ids))
    ):
        keys |= await _mapped_keys(session, group.tenant_id, mapped)
    return keys


async def _mapped_keys(session: AsyncSession, tenant_id: str, role: str) -> set[str]:
    if role in {r.value for r in iam.MAPPABLE_ROLES}:
        return set(permissions_for_role(role))
    return iam.role_keys(await iam.custom_role_in(session, tenant_id, role))


@router.delete("/groups/{group_id}")
async def delete_group(
    request: Request, group_id: str, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """Delete a group without child groups (409 ``RESOURCE_IN_USE`` otherwise)."""
    group = await _group(session, principal, group_id)
    if await session.scalar(select(Group.id).where(Group.parent_id == group.id).limit(1)):
        raise errors.ResourceInUse("The group has child groups")
    await session.execute(delete(RoleMapping).where(RoleMapping.group_id == group.id))
    await session.execute(delete(GroupMember).where(GroupMember.group_id == group.id))
    await session.delete(group)
    await session.commit()
    _changed(request)
    return ok({"id": group_id, "deleted": True})


@router.post("/role-mappings", status_code=201)
async def create_role_mapping(
    request: Request, body: RoleMappingIn, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """Map a group to a role: ``tenant_admin``, ``tenant_user``, ``tenant_viewer`` or a
    custom role id of the group's tenant (422 for other roles; 403 when the caller lacks one
    of the role's keys)."""
    group = await _group(session, principal, body.group_id)
    if body.role not in {r.value for r in iam.MAPPABLE_ROLES} and not body.role.startswith("rol_"):
        raise errors.ValidationFailed(
            "Groups map to tenant roles or custom roles",
            details=[
                {"field": "role", "message": "tenant_admin, tenant_user, tenant_viewer or rol_…"}
            ],
        )
    iam.check_grantable(principal, await _mapped_keys(session, group.tenant_id, body.role))
    if await session.scalar(
        select(RoleMapping.id).where(
            RoleMapping.group_id == group.id, RoleMapping.role == body.role
        )
    ):
        raise errors.SlugConflict("This group is already mapped to this role")
    mapping = RoleMapping(
        tenant_id=group.tenant_id, group_id=group.id, role=body.role, auto_revoke=body.auto_revoke
    )
    session.add(mapping)
    await session.commit()
    _changed(request)
    return ok(_mapping_out(mapping), 201)


@router.get("/role-mappings")
async def list_role_mappings(
    principal: CurrentPrincipal,
    session: Session,
    tenant_id: str | None = None,
    limit: Limit = 100,
    cursor: Annotated[str | None, id_cursor("rmp")] = None,
) -> JSONResponse:
    """Role mappings of ``tenant_id`` (default: the caller's)."""
    rows, nxt = await administered_page(session, principal, RoleMapping, tenant_id, limit, cursor)
    return ok_list([_mapping_out(m) for m in rows], nxt)


@router.delete("/role-mappings/{mapping_id}")
async def delete_role_mapping(
    request: Request, mapping_id: str, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """Remove a mapping; the group's members lose the role at once."""
    mapping = await session.get(RoleMapping, mapping_id)
    if mapping is None:
        raise errors.NotFound(f"No role mapping {mapping_id}")
    await _group(session, principal, mapping.group_id)
    await session.delete(mapping)
    await session.commit()
    _changed(request)
    return ok({"id": mapping_id, "deleted": True})

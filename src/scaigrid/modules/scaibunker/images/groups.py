"""Availability groups: workers that keep a set of images warm (SPEC §7.6)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.ids import new_id
from scaigrid.modules.scaibunker.bunkers.schemas import iso
from scaigrid.modules.scaibunker.images import service
from scaigrid.modules.scaibunker.images.models import AvailabilityGroup, Image
from scaigrid.modules.scaibunker.images.schemas import GroupPatch, GroupRequest
from scaigrid.modules.scaibunker.state import ModuleState
from scaigrid.modules.scaibunker.workers.models import Worker
from scaigrid.platform.auth import Principal
from scaigrid.platform.db import utcnow


def group_to_dict(group: AvailabilityGroup) -> dict[str, Any]:
    """Render a group (SPEC §7.6)."""
    return {
        "id": group.id,
        "name": group.name,
        "scope": group.scope,
        "tenant_id": group.tenant_id,
        "worker_ids": list(group.worker_ids),
        "image_ids": list(group.image_ids),
        "created_at": iso(group.created_at),
        "updated_at": iso(group.updated_at),
    }


def is_visible(principal: Principal, group: AvailabilityGroup) -> bool:
    """Platform groups are visible to all; tenant groups to their tenant (and super admins)."""
    return (
        group.scope == "platform"
        or group.tenant_id == principal.tenant_id
        or principal.is_super_admin
    )


def require_admin(principal: Principal, scope: str) -> None:
    """``scaibunker:admin:tenant`` for tenant groups, ``scaibunker:admin:platform`` else.

    Raises:
        errors.AuthzPermissionDenied: the caller lacks the key.
    """
    key = "scaibunker:admin:platform" if scope == "platform" else "scaibunker:admin:tenant"
    if not principal.has(key):
        raise errors.AuthzPermissionDenied(f"{scope} availability groups need {key}")


async def visible_group(
    session: AsyncSession, principal: Principal, group_id: str
) -> AvailabilityGroup:
    """The group ``group_id`` if the caller may see it.

    Raises:
        errors.AvailabilityGroupNotFound: unknown or invisible.
    """
    group = await session.get(AvailabilityGroup, group_id)
    if group is None or not is_visible(principal, group):
        raise errors.AvailabilityGroupNotFound(f"availability group {group_id} not found")
    return group


def _invalid(field: str, message: str) -> errors.ScaiGridError:
    return errors.ValidationFailed(message, details=[{"field": field, "message": message}])


async def _check_members(
    session: AsyncSession,
    principal: Principal,
    scope: str,
    tenant_id: str | None,
    worker_ids: list[str],
    image_ids: list[str],
) -> None:
    for worker_id in worker_ids:
        worker = await session.get(Worker, worker_id)
        usable = worker is not None and worker.deleted_at is None
        if usable and worker is not None and scope == "tenant":
            usable = worker.tenant_id is None or worker.tenant_id == tenant_id
        if usable and worker is not None and scope == "platform":
            usable = worker.tenant_id is None
        if not usable:
            raise _invalid("worker_ids", f"worker {worker_id} cannot be in this group")
    for image_id in image_ids:
        image = await session.get(Image, image_id)
        ok = image is not None and image.status != "deactivated"
        if ok and image is not None:
            ok = (
                image.scope == "platform"
                if scope == "platform"
                else service.is_visible(principal, image)
            )
        if not ok:
            raise _invalid("image_ids", f"image {image_id} cannot be in this group")


async def _ensure_unique(session: AsyncSession, group: AvailabilityGroup) -> None:
    query = select(AvailabilityGroup.id).where(
        AvailabilityGroup.name == group.name,
        AvailabilityGroup.scope == group.scope,
        AvailabilityGroup.id != group.id,
    )
    if group.scope == "tenant":
        query = query.where(AvailabilityGroup.tenant_id == group.tenant_id)
    if (await session.scalars(query)).first() is not None:
        raise errors.SlugConflict(f"an availability group named {group.name!r} exists")


async def _warm_group(state: ModuleState, group: AvailabilityGroup) -> None:
    """Warm every ready image of ``group`` on every worker of it (others wait for their bake)."""
    async with state.db.sessionmaker() as session:
        ready = [
            image_id
            for image_id in group.image_ids
            if (image := await session.get(Image, image_id)) is not None and image.status == "ready"
        ]
    for image_id in ready:
        await service.warm_image(state, image_id, list(group.worker_ids))


async def create_group(
    state: ModuleState, session: AsyncSession, principal: Principal, body: GroupRequest
) -> AvailabilityGroup:
    """Create a group and start warming its images on its workers.

    Raises:
        errors.AuthzPermissionDenied: missing the scope's admin key.
        errors.ValidationFailed: a worker or image the group may not hold.
        errors.SlugConflict: the name is taken in the scope.
    """
    require_admin(principal, body.scope)
    tenant_id = principal.tenant_id if body.scope == "tenant" else None
    worker_ids = list(dict.fromkeys(body.worker_ids))
    image_ids = list(dict.fromkeys(body.image_ids))
    await _check_members(session, principal, body.scope, tenant_id, worker_ids, image_ids)
    now = utcnow()
    group = AvailabilityGroup(
        id=new_id("avg"),
        name=body.name,
        scope=body.scope,
        tenant_id=tenant_id,
        worker_ids=worker_ids,
        image_ids=image_ids,
        created_at=now,
        updated_at=now,
    )
    await _ensure_unique(session, group)
    session.add(group)
    await session.commit()
    await _warm_group(state, group)
    return group


async def update_group(
    state: ModuleState,
    session: AsyncSession,
    principal: Principal,
    group_id: str,
    body: GroupPatch,
) -> AvailabilityGroup:
    """Apply a PATCH (arrays replace); new worker/image pairs start warming.

    Raises:
        errors.AvailabilityGroupNotFound, errors.AuthzPermissionDenied,
        errors.ValidationFailed, errors.SlugConflict.
    """
    group = await visible_group(session, principal, group_id)
    require_admin(principal, group.scope)
    worker_ids = list(dict.fromkeys(body.worker_ids)) if body.worker_ids is not None else None
    image_ids = list(dict.fromkeys(body.image_ids)) if body.image_ids is not None else None
    await _check_members(
        session, principal, group.scope, group.tenant_id, worker_ids or [], image_ids or []
    )
    if body.name is not None:
        group.name = body.name
        await _ensure_unique(session, group)
    if worker_ids is not None:
        group.worker_ids = worker_ids
    if image_ids is not None:
        group.image_ids = image_ids
    group.updated_at = utcnow()
    await session.commit()
    await _warm_group(state, group)
    return group

"""Image and availability-group routes (SPEC §7.10)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.modules.scaibunker.bunkers.schemas import iso
from scaigrid.modules.scaibunker.images import groups, service
from scaigrid.modules.scaibunker.images.models import (
    AvailabilityGroup,
    Image,
    ImageFinding,
    ImageWorker,
)
from scaigrid.modules.scaibunker.images.schemas import (
    GroupPatch,
    GroupRequest,
    ImageStatus,
    RegisterImageRequest,
    WarmRequest,
)
from scaigrid.modules.scaibunker.state import ModuleState, get_state
from scaigrid.platform.auth import Principal, require
from scaigrid.platform.db import get_session
from scaigrid.platform.envelope import ok, ok_list
from scaigrid.platform.pagination import Limit, id_cursor

router = APIRouter(tags=["images"])

StateDep = Annotated[ModuleState, Depends(get_state)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
ReaderDep = Annotated[Principal, Depends(require("scaibunker:create"))]
ManagerDep = Annotated[Principal, Depends(require("scaibunker:images:manage"))]
Severity = Literal["critical", "high", "medium", "low", "unknown"]


async def _visible_image(session: AsyncSession, principal: Principal, image_id: str) -> Image:
    image = await session.get(Image, image_id)
    if image is None or not service.is_visible(principal, image):
        raise errors.ImageNotFound(f"image {image_id} not found")
    return image


def _managed(principal: Principal, image: Image) -> None:
    if not service.may_manage(principal, image):
        raise errors.AuthzPermissionDenied("this image belongs to another scope")


async def _render(session: AsyncSession, image: Image) -> dict[str, Any]:
    warm = (await service.warm_summary(session, [image.id]))[image.id]
    return service.image_to_dict(image, warm)


@router.post("/images", status_code=201)
async def register_image(
    body: RegisterImageRequest, principal: ManagerDep, state: StateDep, session: SessionDep
) -> JSONResponse:
    """Register an image; it bakes on a worker and becomes ``ready``."""
    image = await service.register_image(state, session, principal, body)
    return ok(await _render(session, image), status_code=201)


@router.get("/images")
async def list_images(
    principal: ReaderDep,
    session: SessionDep,
    limit: Limit = 100,
    cursor: Annotated[str | None, id_cursor("img")] = None,
    name: str | None = None,
    status: ImageStatus | None = None,
    scope: Literal["tenant", "partner", "platform"] | None = None,
) -> JSONResponse:
    """List the images visible to the caller, newest first."""
    query = select(Image).order_by(Image.id.desc())
    if name:
        query = query.where(Image.name == name)
    if status:
        query = query.where(Image.status == status)
    if scope:
        query = query.where(Image.scope == scope)
    if cursor:
        query = query.where(Image.id < cursor)
    page: list[Image] = []
    async for image in await session.stream_scalars(query):
        if service.is_visible(principal, image):
            page.append(image)
            if len(page) > limit:
                break
    next_cursor = page[limit - 1].id if len(page) > limit else None
    warm = await service.warm_summary(session, [i.id for i in page[:limit]])
    return ok_list([service.image_to_dict(i, warm[i.id]) for i in page[:limit]], next_cursor)


@router.get("/images/{image_id}")
async def get_image(image_id: str, principal: ReaderDep, session: SessionDep) -> JSONResponse:
    """Read one image with its warm summary and scan object."""
    return ok(await _render(session, await _visible_image(session, principal, image_id)))


@router.post("/images/{image_id}/deactivate")
async def deactivate_image(
    image_id: str, principal: ManagerDep, state: StateDep, session: SessionDep
) -> JSONResponse:
    """Deactivate an image for good: new bunkers can no longer name it.

    Workers then drop their copies, except where bunkers still run on it.
    """
    image = await _visible_image(session, principal, image_id)
    _managed(principal, image)
    image.status = "deactivated"
    await session.commit()
    state.spawn(service.evict_image(state, image.id), name=f"evict-{image.id}")
    return ok(await _render(session, image))


@router.post("/images/{image_id}/warm")
async def warm_image(
    image_id: str,
    principal: ManagerDep,
    state: StateDep,
    session: SessionDep,
    body: WarmRequest | None = None,
) -> JSONResponse:
    """Warm a ready image on workers (default: its groups); re-queues failed and skipped.

    On a built-in image that is still ``pending`` (super admin only) this starts its bake.
    """
    image = await _visible_image(session, principal, image_id)
    _managed(principal, image)
    if image.builtin and image.status == "pending" and principal.is_super_admin:
        state.spawn(service.bake_image(state, image.id), name=f"bake-{image.id}")
        return ok((await service.warm_summary(session, [image.id]))[image.id])
    if image.status != "ready":
        raise errors.ImageNotReady(f"image {image.name} is {image.status}")
    body = body or WarmRequest()
    targets: list[str] | None = None
    if body.worker_ids is not None or body.availability_group_ids is not None:
        targets = list(body.worker_ids or [])
        for group_id in body.availability_group_ids or []:
            group = await groups.visible_group(session, principal, group_id)
            targets += [w for w in group.worker_ids if w not in targets]
    summary = await service.warm_image(state, image.id, targets)
    return ok(summary)


@router.get("/images/{image_id}/warm")
async def get_warm(image_id: str, principal: ManagerDep, session: SessionDep) -> JSONResponse:
    """Per-worker warm state of an image."""
    image = await _visible_image(session, principal, image_id)
    rows = (
        await session.scalars(
            select(ImageWorker)
            .where(ImageWorker.image_id == image.id)
            .order_by(ImageWorker.worker_id)
        )
    ).all()
    return ok(
        {
            "warm": (await service.warm_summary(session, [image.id]))[image.id],
            "workers": [
                {
                    "worker_id": row.worker_id,
                    "state": row.state,
                    "updated_at": iso(row.updated_at),
                    "error": row.error,
                }
                for row in rows
            ],
        }
    )


@router.post("/images/{image_id}/scan")
async def scan_image(
    image_id: str, principal: ManagerDep, state: StateDep, session: SessionDep
) -> JSONResponse:
    """Queue a scan of a ready image; answers the scan object in ``pending``."""
    image = await _visible_image(session, principal, image_id)
    _managed(principal, image)
    if image.status != "ready":
        raise errors.ImageNotReady(f"image {image.name} is {image.status}")
    scan = dict(image.scan or {})
    scan.update({"status": "pending", "scanner": "trivy"})
    image.scan = scan
    await session.commit()
    state.spawn(service.scan_image(state, image.id), name=f"scan-{image.id}")
    return ok(scan)


@router.get("/images/{image_id}/scan")
async def list_findings(
    image_id: str,
    principal: ReaderDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[int | None, Query(ge=0)] = None,
    severity: Severity | None = None,
) -> JSONResponse:
    """Findings of the image's latest scan, in report order (cursor: the next ``seq``)."""
    image = await _visible_image(session, principal, image_id)
    query = (
        select(ImageFinding)
        .where(ImageFinding.image_id == image.id)
        .order_by(ImageFinding.seq)
        .limit(limit + 1)
    )
    if severity:
        query = query.where(ImageFinding.severity == severity)
    if cursor is not None:
        query = query.where(ImageFinding.seq >= cursor)
    rows = list((await session.scalars(query)).all())
    next_cursor = str(rows[limit].seq) if len(rows) > limit else None
    return ok_list([service.finding_to_dict(f) for f in rows[:limit]], next_cursor)


# -- availability groups ------------------------------------------------------------------


@router.get("/availability-groups")
async def list_groups(
    principal: ReaderDep,
    session: SessionDep,
    limit: Limit = 100,
    cursor: Annotated[str | None, id_cursor("avg")] = None,
    scope: Literal["tenant", "platform"] | None = None,
) -> JSONResponse:
    """The caller's tenant groups and the platform groups, newest first."""
    query = select(AvailabilityGroup).order_by(AvailabilityGroup.id.desc())
    if scope:
        query = query.where(AvailabilityGroup.scope == scope)
    if cursor:
        query = query.where(AvailabilityGroup.id < cursor)
    page = [g for g in (await session.scalars(query)).all() if groups.is_visible(principal, g)][
        : limit + 1
    ]
    next_cursor = page[limit - 1].id if len(page) > limit else None
    return ok_list([groups.group_to_dict(g) for g in page[:limit]], next_cursor)


@router.post("/availability-groups", status_code=201)
async def create_group(
    body: GroupRequest, principal: ReaderDep, state: StateDep, session: SessionDep
) -> JSONResponse:
    """Create a group; its workers start warming its images."""
    group = await groups.create_group(state, session, principal, body)
    return ok(groups.group_to_dict(group), status_code=201)


@router.get("/availability-groups/{group_id}")
async def get_group(group_id: str, principal: ReaderDep, session: SessionDep) -> JSONResponse:
    """Read one group."""
    return ok(groups.group_to_dict(await groups.visible_group(session, principal, group_id)))


@router.patch("/availability-groups/{group_id}")
async def patch_group(
    group_id: str, body: GroupPatch, principal: ReaderDep, state: StateDep, session: SessionDep
) -> JSONResponse:
    """Rename a group or replace its workers or images; new pairs start warming."""
    group = await groups.update_group(state, session, principal, group_id, body)
    return ok(groups.group_to_dict(group))


@router.delete("/availability-groups/{group_id}")
async def delete_group(group_id: str, principal: ReaderDep, session: SessionDep) -> JSONResponse:
    """Delete a group (nothing is evicted at once, SPEC §7.6)."""
    group = await groups.visible_group(session, principal, group_id)
    groups.require_admin(principal, group.scope)
    await session.delete(group)
    await session.commit()
    return ok({"id": group_id, "deleted": True})

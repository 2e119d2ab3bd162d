"""Image routes (SPEC §7.10, the walking skeleton's subset)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.modules.scaibunker.images import service
from scaigrid.modules.scaibunker.images.models import Image
from scaigrid.modules.scaibunker.images.schemas import RegisterImageRequest
from scaigrid.modules.scaibunker.state import ModuleState, get_state
from scaigrid.platform.auth import Principal, require
from scaigrid.platform.db import get_session
from scaigrid.platform.envelope import ok, ok_list

router = APIRouter(tags=["images"])

StateDep = Annotated[ModuleState, Depends(get_state)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
ReaderDep = Annotated[Principal, Depends(require("scaibunker:create"))]
ManagerDep = Annotated[Principal, Depends(require("scaibunker:images:manage"))]


@router.post("/images", status_code=201)
async def register_image(
    body: RegisterImageRequest, principal: ManagerDep, state: StateDep, session: SessionDep
) -> JSONResponse:
    """Register an image; it bakes on a worker and becomes ``ready``."""
    image = await service.register_image(state, session, principal, body)
    return ok(service.image_to_dict(image), status_code=201)


@router.get("/images")
async def list_images(
    principal: ReaderDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
    name: str | None = None,
    status: str | None = None,
) -> JSONResponse:
    """List the images visible to the caller, newest first."""
    query = select(Image).order_by(Image.id.desc())
    if name:
        query = query.where(Image.name == name)
    if status:
        query = query.where(Image.status == status)
    if cursor:
        query = query.where(Image.id < cursor)
    page: list[Image] = []
    async for image in await session.stream_scalars(query):
        if service.is_visible(principal, image):
            page.append(image)
            if len(page) > limit:
                break
    next_cursor = page[limit - 1].id if len(page) > limit else None
    return ok_list([service.image_to_dict(i) for i in page[:limit]], next_cursor)


@router.get("/images/{image_id}")
async def get_image(image_id: str, principal: ReaderDep, session: SessionDep) -> JSONResponse:
    """Read one image."""
    image = await session.get(Image, image_id)
    if image is None or not service.is_visible(principal, image):
        raise errors.ImageNotFound(f"image {image_id} not found")
    return ok(service.image_to_dict(image))


@router.post("/images/{image_id}/deactivate")
async def deactivate_image(
    image_id: str, principal: ManagerDep, session: SessionDep
) -> JSONResponse:
    """Deactivate an image for good: new bunkers can no longer name it."""
    image = await session.get(Image, image_id)
    if image is None or not service.is_visible(principal, image):
        raise errors.ImageNotFound(f"image {image_id} not found")
    if not service.may_manage(principal, image):
        raise errors.AuthzPermissionDenied("this image belongs to another scope")
    image.status = "deactivated"
    await session.commit()
    return ok(service.image_to_dict(image))

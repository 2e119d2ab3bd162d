"""Image registration, name resolution and baking on workers (SPEC §7.3, §7.4)."""

from __future__ import annotations

from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.ids import is_id, new_id
from scaigrid.modules.scaibunker.bunkers.schemas import iso
from scaigrid.modules.scaibunker.images.models import Image
from scaigrid.modules.scaibunker.images.schemas import RegisterImageRequest
from scaigrid.modules.scaibunker.state import ModuleState
from scaigrid.platform.auth import Principal
from scaigrid.platform.db import utcnow
from scaigrid.protocol.link import TaskKind

log = structlog.get_logger(__name__)

BAKE_TIMEOUT_S = 1800.0


def image_to_dict(image: Image) -> dict[str, Any]:
    """Render an image as its API object (SPEC §7.1)."""
    return {
        "id": image.id,
        "name": image.name,
        "scope": image.scope,
        "tenant_id": image.tenant_id,
        "partner_id": image.partner_id,
        "source": image.source,
        "digest": image.digest,
        "size_mib": image.size_mib,
        "default_cpu_millicores": image.default_cpu_millicores,
        "default_memory_mb": image.default_memory_mb,
        "default_disk_mb": image.default_disk_mb,
        "lazy_pull": image.lazy_pull,
        "status": image.status,
        "status_reason": image.status_reason,
        "scan": None,
        "warm": {"queued": 0, "ready": 0, "failed": 0, "skipped": 0},
        "created_at": iso(image.created_at),
    }


def is_visible(principal: Principal, image: Image) -> bool:
    """True when ``principal`` may see ``image`` (its tenant, its partner, or platform)."""
    if image.scope == "platform":
        return True
    if image.scope == "partner":
        return image.partner_id == principal.partner_id or principal.is_super_admin
    return image.tenant_id == principal.tenant_id or principal.is_super_admin


def may_manage(principal: Principal, image: Image) -> bool:
    """True when ``principal`` may deactivate or re-bake ``image`` (SPEC §7.3)."""
    if principal.is_super_admin:
        return True
    if image.scope == "tenant":
        return image.tenant_id == principal.tenant_id
    if image.scope == "partner":
        return principal.role == "partner_admin" and image.partner_id == principal.partner_id
    return False


async def resolve_image(session: AsyncSession, principal: Principal, ref: str) -> Image:
    """Find the image a bunker names: an ``img_`` id, or a name (tenant → partner → platform).

    Deactivated images are skipped.

    Raises:
        errors.ImageNotFound: no visible image matches.
    """
    if is_id(ref, "img"):
        image = await session.get(Image, ref)
        if image is None or image.status == "deactivated" or not is_visible(principal, image):
            raise errors.ImageNotFound(f"image {ref} not found")
        return image
    rows = (
        await session.scalars(select(Image).where(Image.name == ref, Image.status != "deactivated"))
    ).all()
    order = {"tenant": 0, "partner": 1, "platform": 2}
    candidates = sorted(
        (image for image in rows if is_visible(principal, image)),
        key=lambda image: (order[image.scope], image.tenant_id != principal.tenant_id),
    )
    if not candidates:
        raise errors.ImageNotFound(f"image {ref!r} not found")
    return candidates[0]


async def register_image(
    state: ModuleState, session: AsyncSession, principal: Principal, request: RegisterImageRequest
) -> Image:
    """Create an image record in ``pending`` and queue its bake on a connected worker.

    Raises:
        errors.AuthzPermissionDenied: ``platform`` or ``partner`` scope without the right role.
        errors.SlugConflict: the name is taken in that scope.
    """
    if request.scope == "platform" and not principal.is_super_admin:
        raise errors.AuthzPermissionDenied("platform images need super_admin")
    if request.scope == "partner" and principal.role not in ("super_admin", "partner_admin"):
        raise errors.AuthzPermissionDenied("partner images need partner_admin")
    image = Image(
        id=new_id("img"),
        name=request.name,
        scope=request.scope,
        tenant_id=principal.tenant_id if request.scope == "tenant" else None,
        partner_id=principal.partner_id if request.scope != "platform" else None,
        source=request.source.model_dump(),
        size_mib=request.size_mib,
        default_cpu_millicores=request.default_cpu_millicores,
        default_memory_mb=request.default_memory_mb,
        default_disk_mb=request.default_disk_mb,
        lazy_pull=request.lazy_pull,
        status="pending",
        created_at=utcnow(),
    )
    await ensure_unique_name(session, image)
    session.add(image)
    await session.commit()
    state.spawn(bake_image(state, image.id), name=f"bake-{image.id}")
    return image


async def ensure_unique_name(session: AsyncSession, image: Image) -> None:
    """Raise :class:`errors.SlugConflict` if ``image.name`` is taken in its scope."""
    query = select(Image.id).where(
        Image.name == image.name,
        Image.scope == image.scope,
        Image.status != "deactivated",
    )
    if image.scope == "tenant":
        query = query.where(Image.tenant_id == image.tenant_id)
    elif image.scope == "partner":
        query = query.where(Image.partner_id == image.partner_id)
    if (await session.scalars(query)).first() is not None:
        raise errors.SlugConflict(f"an image named {image.name!r} exists in this scope")


async def bake_image(state: ModuleState, image_id: str) -> None:
    """Bake ``image_id`` on the first connected worker; set ``ready`` or ``failed``.

    With no worker connected the image stays ``pending`` and is baked when one registers.
    """
    worker_ids = state.hub.connected_ids()
    if not worker_ids:
        return
    connection = state.hub.require(worker_ids[0])
    async with state.db.sessionmaker() as session:
        image = await session.get(Image, image_id)
        if image is None or image.status not in ("pending", "failed"):
            return
        image.status = "baking"
        image.status_reason = None
        await session.commit()
        payload = {"id": image.id, "name": image.name, "source": image.source}
    try:
        result = await connection.call(
            TaskKind.IMAGE_BAKE, {"image": payload}, timeout_s=BAKE_TIMEOUT_S
        )
    except errors.ScaiGridError as exc:
        log.warning("image_bake_failed", image_id=image_id, code=exc.code, reason=exc.message)
        async with state.db.sessionmaker() as session:
            image = await session.get(Image, image_id)
            if image is not None:
                image.status = "failed"
                image.status_reason = exc.message
                await session.commit()
        return
    async with state.db.sessionmaker() as session:
        image = await session.get(Image, image_id)
        if image is not None:
            image.status = "ready"
            image.digest = result.get("digest")
            await session.commit()
    log.info("image_ready", image_id=image_id)


async def bake_pending_images(state: ModuleState) -> None:
    """Queue a bake for every image still ``pending`` (called when a worker registers)."""
    async with state.db.sessionmaker() as session:
        pending = (await session.scalars(select(Image.id).where(Image.status == "pending"))).all()
    for image_id in pending:
        state.spawn(bake_image(state, image_id), name=f"bake-{image_id}")

"""Restoring bunkers from snapshots, the controller side (SPEC §6.4).

:func:`restore_source` checks visibility (``SNAPSHOT_NOT_FOUND`` for another tenant's id,
never 403) and readiness (``SNAPSHOT_NOT_READY``), :func:`check_fits` the size (``disk_mb``
must hold ``layer_bytes``), and :func:`worker_params` gives the ``snapshot`` parameter of
``bunker.create`` with a ``GET`` capability for the layer key.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.modules.scaibunker.bunkers.schemas import CreateBunkerRequest
from scaigrid.modules.scaibunker.images.models import Image
from scaigrid.modules.scaibunker.images.service import resolve_image
from scaigrid.modules.scaibunker.snapshots.common import (
    SnapshotNotFound,
    SnapshotNotReady,
    capability,
    get_visible_snapshot,
    layer_key,
    storage_of,
)
from scaigrid.modules.scaibunker.snapshots.models import Snapshot
from scaigrid.modules.scaibunker.state import ModuleState
from scaigrid.platform.auth import Principal


async def restore_source(session: AsyncSession, principal: Principal, snapshot_id: str) -> Snapshot:
    """The snapshot a ``POST /bunkers`` with ``snapshot_id`` restores from.

    Raises:
        SnapshotNotFound: unknown or invisible.
        SnapshotNotReady: not ``ready``.
    """
    snapshot = await get_visible_snapshot(session, principal, snapshot_id)
    if snapshot.status != "ready":
        raise SnapshotNotReady(f"snapshot {snapshot_id} is {snapshot.status}")
    return snapshot


def check_fits(snapshot: Snapshot, disk_mb: int) -> None:
    """Refuse a ``disk_mb`` smaller than the snapshot's layer (SPEC §6.4).

    Raises:
        errors.ValidationFailed: ``disk_mb`` < ``layer_bytes`` in MiB (rounded up).
    """
    needed = math.ceil((snapshot.layer_bytes or 0) / (1024 * 1024))
    if disk_mb < needed:
        raise errors.ValidationFailed(
            f"disk_mb {disk_mb} is smaller than the snapshot's layer ({needed} MiB)",
            details=[{"field": "disk_mb", "message": f"must be at least {needed}"}],
        )


async def worker_params(state: ModuleState, snapshot_id: str) -> dict[str, Any]:
    """The ``snapshot`` parameter of ``bunker.create``: key, digest, proxy URL, capability.

    Raises:
        SnapshotNotFound: the record is gone.
    """
    async with state.db.sessionmaker() as session:
        snapshot = await session.get(Snapshot, snapshot_id)
    if snapshot is None or snapshot.sha256 is None:
        raise SnapshotNotFound(f"snapshot {snapshot_id} not found")
    key = layer_key(snapshot)
    return {
        "snapshot_id": snapshot.id,
        "key": key,
        "sha256": snapshot.sha256,
        "storage_url": state.storage_url,
        **capability(storage_of(state), "GET", key),
    }


async def snapshot_image(
    session: AsyncSession, principal: Principal, snapshot: Snapshot, requested: str | None
) -> Image:
    """The image a restore uses: the manifest's; a requested ``image`` must resolve to it.

    Raises:
        errors.ImageNotFound: the image record is gone, or ``requested`` is unknown.
        errors.ValidationFailed: ``requested`` resolves to another image.
    """
    image = await session.get(Image, snapshot.image_id)
    if image is None:
        raise errors.ImageNotFound(f"image {snapshot.image_id} of the snapshot no longer exists")
    if requested is not None:
        resolved = await resolve_image(session, principal, requested)
        if resolved.id != image.id:
            raise errors.ValidationFailed(
                "image differs from the snapshot's image",
                details=[{"field": "image", "message": f"the snapshot needs {image.name}"}],
            )
    return image


def sized(
    snapshot: Snapshot, request: CreateBunkerRequest, defaults: tuple[int, int, int]
) -> tuple[int, int, int]:
    """``(cpu_millicores, memory_mb, disk_mb)``: the request's values, else the manifest's
    ``params``, else ``defaults`` (SPEC §6.4 precedence)."""
    params = (snapshot.manifest or {}).get("params") or {}

    def pick(given: int | None, name: str, fallback: int) -> int:
        recorded = params.get(name)
        if given:
            return given
        return recorded if isinstance(recorded, int) and recorded > 0 else fallback

    return (
        pick(request.cpu_millicores, "cpu_millicores", defaults[0]),
        pick(request.memory_mb, "memory_mb", defaults[1]),
        pick(request.disk_mb, "disk_mb", defaults[2]),
    )


async def latest_ready(session: AsyncSession, bunker_id: str) -> Snapshot | None:
    """The newest ``ready`` snapshot taken of ``bunker_id`` (persistent re-placement, SPEC
    §10.6), or None."""
    query = (
        select(Snapshot)
        .where(Snapshot.bunker_id == bunker_id, Snapshot.status == "ready")
        .order_by(Snapshot.id.desc())
        .limit(1)
    )
    return (await session.scalars(query)).first()

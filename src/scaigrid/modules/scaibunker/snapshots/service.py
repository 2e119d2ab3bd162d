"""Taking, listing, deleting and restoring snapshots (SPEC §6.3-§6.5) on the controller.

Taking: the record is created ``pending`` and returned; a background job sends
``bunker.snapshot`` to the bunker's worker with one capability per object (``PUT`` on the
layer key, ``PUT`` on the manifest key, default lifetime 900 s), moves the record to
``uploading`` when the worker reports it and to ``ready`` (``size_bytes``, ``sha256``) or
``failed`` (``status_reason``) with the result. Snapshots of one bunker run one at a time, in
request order. A failed snapshot's objects are removed.

Restoring is in :mod:`.restore`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.ids import new_id
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.bunkers.service import get_visible
from scaigrid.modules.scaibunker.images.models import Image
from scaigrid.modules.scaibunker.snapshots.common import (
    capability,
    get_visible_snapshot,
    layer_key,
    manifest_key,
    storage_of,
)
from scaigrid.modules.scaibunker.snapshots.models import Snapshot
from scaigrid.modules.scaibunker.state import ModuleState
from scaigrid.modules.scaibunker.storage.service import StorageService
from scaigrid.platform.auth import Principal
from scaigrid.platform.db import utcnow
from scaigrid.protocol.link import TaskKind

log = structlog.get_logger(__name__)

SNAPSHOT_TIMEOUT_S: Final = 3600.0
LIVE: Final = ("pending", "uploading")
_locks: dict[str, asyncio.Lock] = {}
_jobs: dict[str, asyncio.Task[Any]] = {}
#: Longest a ``DELETE /bunkers/{id}?snapshot=true`` waits for its final snapshot, seconds.
FINAL_SNAPSHOT_WAIT_S: Final = 600.0


def _manifest(bunker: Bunker, image: Image | None) -> dict[str, Any]:
    return {
        "image_id": bunker.image_id,
        "image_digest": image.digest if image is not None else None,
        "env_vars": dict(bunker.env_vars or {}),
        "params": {
            "image": bunker.image_name,
            "name": bunker.name,
            "cpu_millicores": bunker.cpu_millicores,
            "memory_mb": bunker.memory_mb,
            "disk_mb": bunker.disk_mb,
            "lifecycle_mode": bunker.lifecycle_mode,
            "network_profile": bunker.network_profile,
            "network_allowlist": bunker.network_allowlist,
            "label_set": dict(bunker.label_set or {}),
        },
    }


async def take_snapshot(
    state: ModuleState,
    session: AsyncSession,
    principal: Principal,
    bunker_id: str,
    name: str | None,
) -> Snapshot:
    """``POST /bunkers/{id}/snapshot``: create the ``pending`` record and start the job.

    Raises:
        errors.BunkerNotFound: unknown or invisible bunker.
        errors.BunkerNotRunning: the bunker is neither ``running`` nor ``paused``.
    """
    bunker = await get_visible(session, principal, bunker_id)
    if bunker.status not in ("running", "paused"):
        raise errors.BunkerNotRunning(f"bunker {bunker_id} is {bunker.status}")
    storage_of(state)
    image = await session.get(Image, bunker.image_id)
    snapshot = Snapshot(
        id=new_id("snp"),
        name=name,
        tenant_id=bunker.tenant_id,
        owner_user_id=bunker.owner_user_id,
        bunker_id=bunker.id,
        image_id=bunker.image_id,
        image_digest=image.digest if image is not None else None,
        status="pending",
        manifest=_manifest(bunker, image),
        created_at=utcnow(),
    )
    session.add(snapshot)
    await session.commit()
    lock = _locks.setdefault(bunker_id, asyncio.Lock())
    _jobs[snapshot.id] = state.spawn(
        _run(state, snapshot.id, bunker.worker_id, lock), name=f"snapshot-{snapshot.id}"
    )
    log.info("snapshot_requested", snapshot_id=snapshot.id, bunker_id=bunker_id)
    return snapshot


async def final_snapshot(
    state: ModuleState, session: AsyncSession, principal: Principal, bunker_id: str
) -> Snapshot:
    """``DELETE /bunkers/{id}?snapshot=true``, first half: take a snapshot, wait until it is
    ``ready`` and record it as the bunker's ``final_snapshot_id``. The caller terminates.

    Raises:
        errors.BunkerNotFound, errors.BunkerNotRunning: as :func:`take_snapshot`.
        errors.ObjectStoreUnavailable: the snapshot failed or did not finish in
            :data:`FINAL_SNAPSHOT_WAIT_S`; the bunker is left running, nothing is lost.
    """
    snapshot = await take_snapshot(state, session, principal, bunker_id, "final")
    job = _jobs.get(snapshot.id)
    if job is not None:
        await asyncio.wait({job}, timeout=FINAL_SNAPSHOT_WAIT_S)
    await session.refresh(snapshot)
    if snapshot.status != "ready":
        raise errors.ObjectStoreUnavailable(
            f"final snapshot {snapshot.id} is {snapshot.status}: {snapshot.status_reason}; "
            "the bunker was not terminated",
            retry_after=30,
        )
    bunker = await get_visible(session, principal, bunker_id)
    bunker.final_snapshot_id = snapshot.id
    await session.commit()
    return snapshot


async def _set(state: ModuleState, snapshot_id: str, **fields: Any) -> None:
    async with state.db.sessionmaker() as session:
        snapshot = await session.get(Snapshot, snapshot_id)
        if snapshot is None:
            return
        for key, value in fields.items():
            setattr(snapshot, key, value)
        await session.commit()


async def _remove_objects(storage: StorageService, snapshot: Snapshot) -> None:
    for key in (layer_key(snapshot), manifest_key(snapshot)):
        try:
            await storage.store.delete(key)
        except errors.ObjectNotFound:
            continue
        except errors.ScaiGridError as exc:
            log.warning("snapshot_object_delete_failed", key=key, code=exc.code)


async def _run(
    state: ModuleState, snapshot_id: str, worker_id: str | None, lock: asyncio.Lock
) -> None:
    try:
        await _run_locked(state, snapshot_id, worker_id, lock)
    finally:
        _jobs.pop(snapshot_id, None)


async def _run_locked(
    state: ModuleState, snapshot_id: str, worker_id: str | None, lock: asyncio.Lock
) -> None:
    async with lock:
        async with state.db.sessionmaker() as session:
            snapshot = await session.get(Snapshot, snapshot_id)
        if snapshot is None:
            return
        storage = storage_of(state)
        connection = state.hub.get(worker_id)
        if connection is None:
            await _set(state, snapshot_id, status="failed", status_reason="worker_unavailable")
            return
        params = {
            "snapshot_id": snapshot.id,
            "storage_url": state.storage_url,
            "layer": {
                "key": layer_key(snapshot),
                **capability(storage, "PUT", layer_key(snapshot)),
            },
            "manifest": {
                "key": manifest_key(snapshot),
                "body": snapshot.manifest,
                **capability(storage, "PUT", manifest_key(snapshot)),
            },
        }
        try:
            handle = await connection.start_task(
                TaskKind.BUNKER_SNAPSHOT, params, bunker_id=snapshot.bunker_id
            )
            while (progress := await handle.next_progress(SNAPSHOT_TIMEOUT_S)) is not None:
                if progress.get("stage") == "uploading":
                    await _set(state, snapshot_id, status="uploading")
            result = await handle.result(SNAPSHOT_TIMEOUT_S)
        except errors.ScaiGridError as exc:
            log.warning(
                "snapshot_failed", snapshot_id=snapshot_id, code=exc.code, reason=exc.message
            )
            await _set(
                state, snapshot_id, status="failed", status_reason=f"{exc.code}: {exc.message}"
            )
            await _remove_objects(storage, snapshot)
            return
        await _set(
            state,
            snapshot_id,
            status="ready",
            size_bytes=int(result["size_bytes"]),
            sha256=str(result["sha256"]),
            layer_bytes=int(result["layer_bytes"]),
            entries=int(result.get("entries") or 0),
            ready_at=utcnow(),
        )
        log.info("snapshot_ready", snapshot_id=snapshot_id, size_bytes=result["size_bytes"])


async def list_snapshots(
    session: AsyncSession,
    principal: Principal,
    *,
    limit: int,
    cursor: str | None,
    bunker_id: str | None,
    status: str | None,
) -> tuple[list[Snapshot], str | None]:
    """Visible snapshots newest first; return ``(page, next_cursor)`` (cursor = last id)."""
    query = select(Snapshot).order_by(Snapshot.id.desc())
    if not (principal.is_super_admin and principal.has("scaibunker:admin")):
        query = query.where(Snapshot.tenant_id == principal.tenant_id)
        if not (principal.has("scaibunker:admin") or principal.has("scaibunker:admin:tenant")):
            query = query.where(Snapshot.owner_user_id == principal.user_id)
    if bunker_id:
        query = query.where(Snapshot.bunker_id == bunker_id)
    if status:
        query = query.where(Snapshot.status == status)
    if cursor:
        query = query.where(Snapshot.id < cursor)
    rows = list((await session.scalars(query.limit(limit + 1))).all())
    page = rows[:limit]
    return page, page[-1].id if len(rows) > limit else None


async def delete_snapshot(
    state: ModuleState, session: AsyncSession, principal: Principal, snapshot_id: str
) -> None:
    """``DELETE /snapshots/{id}``: remove the objects, then the record.

    Raises:
        SnapshotNotFound: unknown or invisible.
        errors.ResourceInUse: still ``pending`` or ``uploading``.
    """
    snapshot = await get_visible_snapshot(session, principal, snapshot_id)
    if snapshot.status in LIVE:
        raise errors.ResourceInUse(f"snapshot {snapshot_id} is {snapshot.status}")
    await _remove_objects(storage_of(state), snapshot)
    await session.delete(snapshot)
    await session.commit()
    log.info("snapshot_deleted", snapshot_id=snapshot_id)

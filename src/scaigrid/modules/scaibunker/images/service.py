"""Image registration, name resolution, baking, warm-up and scanning on workers (SPEC §7).

Bake: one worker (``bake_worker_id`` or the first connected, active worker usable by the
image's scope) builds the image; the image becomes ``ready`` (with the pinned OCI
``source_digest``) or ``failed`` with the worker's reason. Then the baking worker scans it
(§7.7) and the image is warmed on the other workers of the availability groups in its scope
(§7.6). Per-worker warm state lives in :class:`ImageWorker` rows.

Baked artifacts (§7.4 step 5, §11.1): every ``image.bake`` (bake and warm) carries
``image.artifact`` (:func:`image_payload`): the key ``scaibunker/images/{image_id}/rootfs.tar.zst``,
the digest recorded so far and a storage grant, so a worker fetches the tree another worker
baked instead of building it again, and the first worker to build it publishes it. The image's
``digest`` is ``sha256:`` of that stored artifact.

Built-in images (§7.5) are seeded ``pending`` with :data:`BUILTIN_PENDING_REASON` and are not
baked automatically, so a controller without registry access never pulls in a loop; a super
admin bakes one with ``POST /images/{id}/warm``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

import structlog
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.ids import is_id, new_id
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.bunkers.schemas import iso
from scaigrid.modules.scaibunker.bunkers.states import TERMINAL
from scaigrid.modules.scaibunker.images.models import (
    AvailabilityGroup,
    Image,
    ImageFinding,
    ImageWorker,
)
from scaigrid.modules.scaibunker.images.schemas import OciSource, RegisterImageRequest
from scaigrid.modules.scaibunker.snapshots.models import Snapshot
from scaigrid.modules.scaibunker.state import ModuleState
from scaigrid.modules.scaibunker.workers.models import Worker
from scaigrid.platform.auth import Principal
from scaigrid.platform.db import utcnow
from scaigrid.platform.modules import service as module_scopes
from scaigrid.protocol.link import TaskKind

log = structlog.get_logger(__name__)

BAKE_TIMEOUT_S = 1800.0
SCAN_TIMEOUT_S = 900.0
EVICT_TIMEOUT_S = 300.0
#: Seconds between two rescans of every ``ready`` image (SPEC §7.7: daily).
RESCAN_INTERVAL_S = 86400.0
WARM_STATES = ("queued", "ready", "failed", "skipped")
SEVERITIES = ("critical", "high", "medium", "low", "unknown")

#: The platform catalogue (SPEC §7.5): name → OCI reference.
BUILTIN_IMAGES: dict[str, str] = {
    "python-3.12": "docker.io/library/python:3.12-slim",
    "python-3.12-ml": "docker.io/pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime",
    "nodejs-22": "docker.io/library/node:22-bookworm-slim",
    "ubuntu-24.04": "docker.io/library/ubuntu:24.04",
    "rust-latest": "docker.io/library/rust:latest",
    "minimal": "docker.io/library/alpine:latest",
}
BUILTIN_PENDING_REASON = (
    "built-in image not baked: it needs a worker that can reach its registry; "
    "a super admin starts the bake with POST /images/{id}/warm"
)


def artifact_key(image_id: str) -> str:
    """``scaibunker/images/{image_id}/rootfs.tar.zst``: the baked tree in the object store."""
    return f"scaibunker/images/{image_id}/rootfs.tar.zst"


def image_payload(state: ModuleState, image: Image) -> dict[str, Any]:
    """The ``image`` object of ``image.bake`` and ``bunker.create`` tasks: ``{id, name,
    source, size_mib, artifact?}``; ``artifact`` = ``{key, digest, source_digest, capability,
    expires_at, storage_url}`` (a ``GET``/``HEAD``/``PUT`` grant on the image's keys),
    left out when the module has no object storage."""
    payload: dict[str, Any] = {
        "id": image.id,
        "name": image.name,
        "source": image.source,
        "size_mib": image.size_mib,
    }
    if state.storage is not None:
        grant = state.storage.mint(["GET", "HEAD", "PUT"], prefix=f"scaibunker/images/{image.id}/")
        payload["artifact"] = {
            "key": artifact_key(image.id),
            "digest": image.digest,
            "source_digest": image.source_digest,
            **grant,
            "storage_url": state.storage_url,
        }
    return payload


def empty_warm() -> dict[str, int]:
    """``{queued, ready, failed, skipped}`` all zero."""
    return dict.fromkeys(WARM_STATES, 0)


async def warm_summary(
    session: AsyncSession, image_ids: Iterable[str]
) -> dict[str, dict[str, int]]:
    """Warm counts per image id (SPEC §7.6); images without rows get zeros."""
    ids = list(image_ids)
    summary = {image_id: empty_warm() for image_id in ids}
    if not ids:
        return summary
    rows = await session.execute(
        select(ImageWorker.image_id, ImageWorker.state, func.count())
        .where(ImageWorker.image_id.in_(ids))
        .group_by(ImageWorker.image_id, ImageWorker.state)
    )
    for image_id, state, count in rows:
        if state in WARM_STATES:
            summary[image_id][state] = int(count)
    return summary


def image_to_dict(image: Image, warm: dict[str, int] | None = None) -> dict[str, Any]:
    """Render an image as its API object (SPEC §7.1) with its ``warm`` counts."""
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
        "source_digest": image.source_digest,
        "builtin": image.builtin,
        "scan": image.scan,
        "warm": warm if warm is not None else empty_warm(),
        "created_at": iso(image.created_at),
    }


def is_visible(principal: Principal, image: Image) -> bool:
    """True when ``principal`` may see ``image`` (its tenant, its partner, or platform)."""
    if image.scope == "platform":
        return True
    if image.scope == "partner":
        return image.partner_id == principal.partner_id or principal.is_super_admin
    return image.tenant_id == principal.tenant_id or principal.is_super_admin


def _in_own_scopes(principal: Principal, image: Image) -> bool:
    """True when ``image`` is in the caller's tenant scope, partner scope, or platform scope."""
    if image.scope == "platform":
        return True
    if image.scope == "partner":
        return image.partner_id == principal.partner_id
    return image.tenant_id == principal.tenant_id


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
    # By name only the caller's own scopes count (SPEC §7.3), even for a super admin who may
    # see every image: another tenant's image must never stand in for a name.
    candidates = sorted(
        (image for image in rows if _in_own_scopes(principal, image)),
        key=lambda image: order[image.scope],
    )
    if not candidates:
        raise errors.ImageNotFound(f"image {ref!r} not found")
    return candidates[0]


async def register_image(
    state: ModuleState, session: AsyncSession, principal: Principal, request: RegisterImageRequest
) -> Image:
    """Create an image record in ``pending`` and queue its bake on a connected worker.

    The image joins every availability group in its scope (SPEC §7.6); their workers show
    as ``queued`` in its ``warm`` summary until the bake and warm-up finish.

    Raises:
        errors.AuthzPermissionDenied: ``platform`` or ``partner`` scope without the right role,
            or a ``tar`` source (a worker path) from anyone but a super admin.
        errors.SlugConflict: the name is taken in that scope.
        errors.WorkerNotFound: ``bake_worker_id`` names no worker usable by the image.
    """
    if request.source.kind == "tar" and not principal.is_super_admin:
        # A tar source is a path on a worker's disk (SPEC §7.2: air-gapped sites): naming
        # host paths is the platform operator's business, never a tenant's.
        raise errors.AuthzPermissionDenied(
            "tar image sources (a path on the worker) need super_admin",
            details={"field": "source.kind"},
        )
    if (
        isinstance(request.source, OciSource)
        and request.source.registry_is_internal()
        and not principal.is_super_admin
    ):
        # Else a tenant could make workers probe the platform's own network (and read the
        # answers from the bake failure).
        raise errors.AuthzPermissionDenied(
            "registries on this host or a private network need super_admin",
            details={"field": "source.ref"},
        )
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
        bake_worker_id=request.bake_worker_id,
    )
    await ensure_unique_name(session, image)
    if request.bake_worker_id is not None:
        worker = await session.get(Worker, request.bake_worker_id)
        if worker is None or worker.deleted_at is not None or not worker_usable(worker, image):
            raise errors.WorkerNotFound(f"worker {request.bake_worker_id} not found")
    session.add(image)
    now = utcnow()
    for group in await groups_in_scope(session, image):
        group.image_ids = [*group.image_ids, image.id]
        group.updated_at = now
        for worker_id in group.worker_ids:
            await _set_warm(session, image.id, worker_id, "queued")
    await session.commit()
    state.spawn(bake_image(state, image.id), name=f"bake-{image.id}")
    return image


def worker_usable(worker: Worker, image: Image) -> bool:
    """True when ``worker`` may hold ``image``: platform workers hold any image, a tenant's
    own worker only that tenant's images (SPEC §10.1)."""
    return worker.tenant_id is None or worker.tenant_id == image.tenant_id


async def groups_in_scope(session: AsyncSession, image: Image) -> list[AvailabilityGroup]:
    """Availability groups an image joins when registered (SPEC §7.6).

    A ``tenant`` image joins that tenant's groups, a ``platform`` image the platform groups;
    a ``partner`` image joins no group here (tenants add it to theirs).
    """
    if image.scope == "tenant":
        query = select(AvailabilityGroup).where(
            AvailabilityGroup.scope == "tenant", AvailabilityGroup.tenant_id == image.tenant_id
        )
    elif image.scope == "platform":
        query = select(AvailabilityGroup).where(AvailabilityGroup.scope == "platform")
    else:
        return []
    return list((await session.scalars(query)).all())


async def _set_warm(
    session: AsyncSession, image_id: str, worker_id: str, warm_state: str, error: str | None = None
) -> None:
    row = await session.get(ImageWorker, (image_id, worker_id))
    if row is None:
        session.add(
            ImageWorker(
                image_id=image_id,
                worker_id=worker_id,
                state=warm_state,
                error=error,
                updated_at=utcnow(),
            )
        )
    else:
        row.state, row.error, row.updated_at = warm_state, error, utcnow()


async def _record_warm(
    state: ModuleState, image_id: str, worker_id: str, warm_state: str, error: str | None = None
) -> None:
    async with state.db.sessionmaker() as session:
        await _set_warm(session, image_id, worker_id, warm_state, error)
        await session.commit()


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


async def _bake_worker(state: ModuleState, session: AsyncSession, image: Image) -> str | None:
    connected = state.hub.connected_ids()
    if image.bake_worker_id is not None:
        return image.bake_worker_id if image.bake_worker_id in connected else None
    if not connected:
        return None
    workers = (
        await session.scalars(
            select(Worker)
            .where(
                Worker.id.in_(connected),
                Worker.admin_state == "active",
                Worker.connection == "online",
                Worker.deleted_at.is_(None),
            )
            .order_by(Worker.id)
        )
    ).all()
    usable = [w.id for w in workers if worker_usable(w, image)]
    return usable[0] if usable else None


async def bake_image(state: ModuleState, image_id: str) -> None:
    """Bake ``image_id`` on one worker; set ``ready`` (then scan and warm) or ``failed``.

    With no usable worker connected the image stays ``pending`` and is baked when one
    registers. A built-in image whose bake fails goes back to ``pending`` with the reason.
    """
    async with state.db.sessionmaker() as session:
        image = await session.get(Image, image_id)
        if image is None or image.status not in ("pending", "failed"):
            return
        worker_id = await _bake_worker(state, session, image)
        if worker_id is None:
            return
        image.status = "baking"
        image.status_reason = None
        await _set_warm(session, image_id, worker_id, "queued")
        await session.commit()
        payload = image_payload(state, image)
        builtin = image.builtin
    log.info("image_bake_started", image_id=image_id, worker_id=worker_id)
    try:
        connection = state.hub.require(worker_id)
        result = await connection.call(
            TaskKind.IMAGE_BAKE, {"image": payload}, timeout_s=BAKE_TIMEOUT_S
        )
    except errors.ScaiGridError as exc:
        log.warning("image_bake_failed", image_id=image_id, code=exc.code, reason=exc.message)
        async with state.db.sessionmaker() as session:
            image = await session.get(Image, image_id)
            if image is not None:
                image.status = "pending" if builtin else "failed"
                image.status_reason = exc.message
                await _set_warm(session, image_id, worker_id, "failed", exc.message)
                await session.commit()
        return
    async with state.db.sessionmaker() as session:
        image = await session.get(Image, image_id)
        if image is None:
            return
        image.status = "ready"
        digest = result.get("digest")
        if isinstance(digest, str) or image.digest is None:
            image.digest = digest if isinstance(digest, str) else None
        source_digest = result.get("source_digest")
        image.source_digest = source_digest if isinstance(source_digest, str) else None
        image.scan = _scan_object("pending")
        await _set_warm(session, image_id, worker_id, "ready")
        await session.commit()
    log.info(
        "image_ready",
        image_id=image_id,
        worker_id=worker_id,
        bake_source=result.get("bake_source"),
        digest=result.get("digest"),
    )
    state.spawn(scan_image(state, image_id, worker_id), name=f"scan-{image_id}")
    state.spawn(warm_image(state, image_id), name=f"warm-{image_id}")


async def warm_targets(session: AsyncSession, image: Image) -> list[str]:
    """Workers that should keep ``image`` warm: members of the groups holding it."""
    groups = (await session.scalars(select(AvailabilityGroup))).all()
    targets: list[str] = []
    for group in groups:
        if image.id in group.image_ids:
            targets += [w for w in group.worker_ids if w not in targets]
    return targets


async def warm_image(
    state: ModuleState, image_id: str, worker_ids: list[str] | None = None
) -> dict[str, int]:
    """Warm ``image_id`` on ``worker_ids`` (default: :func:`warm_targets`); SPEC §7.6.

    Workers already ``ready`` are left alone; a worker that is offline, draining or not usable
    by the image is ``skipped``; the others are ``queued`` and bake in the background, ending
    ``ready`` or ``failed``.

    Returns:
        The image's warm summary right after queueing.
    """
    async with state.db.sessionmaker() as session:
        image = await session.get(Image, image_id)
        if image is None:
            return empty_warm()
        targets = worker_ids if worker_ids is not None else await warm_targets(session, image)
        connected = set(state.hub.connected_ids())
        queued: list[str] = []
        for worker_id in targets:
            row = await session.get(ImageWorker, (image_id, worker_id))
            if row is not None and row.state == "ready":
                continue
            worker = await session.get(Worker, worker_id)
            if (
                worker is None
                or worker.deleted_at is not None
                or worker.admin_state != "active"
                or worker.connection != "online"
                or worker_id not in connected
                or not worker_usable(worker, image)
            ):
                await _set_warm(session, image_id, worker_id, "skipped", "worker not eligible")
                continue
            await _set_warm(session, image_id, worker_id, "queued")
            queued.append(worker_id)
        await session.commit()
        payload = image_payload(state, image)
        summary = (await warm_summary(session, [image_id]))[image_id]
    for worker_id in queued:
        state.spawn(_warm_one(state, image_id, worker_id, payload), name=f"warm-{image_id}")
    return summary


async def _warm_one(
    state: ModuleState, image_id: str, worker_id: str, payload: dict[str, Any]
) -> None:
    try:
        result = await state.hub.require(worker_id).call(
            TaskKind.IMAGE_BAKE, {"image": payload, "warm": True}, timeout_s=BAKE_TIMEOUT_S
        )
    except errors.ScaiGridError as exc:
        if isinstance(exc.details, dict) and exc.details.get("cache_full") is True:
            # SPEC §7.6: a worker short of cache space is skipped, not failed.
            log.info("image_warm_skipped", image_id=image_id, worker_id=worker_id)
            await _record_warm(state, image_id, worker_id, "skipped", exc.message)
            return
        log.warning("image_warm_failed", image_id=image_id, worker_id=worker_id, reason=exc.message)
        await _record_warm(state, image_id, worker_id, "failed", exc.message)
        return
    await _record_warm(state, image_id, worker_id, "ready")
    log.info(
        "image_warm",
        image_id=image_id,
        worker_id=worker_id,
        bake_source=result.get("bake_source"),
    )


def _scan_object(
    status: str,
    *,
    version: str | None = None,
    counts: dict[str, int] | None = None,
    scanned_at: str | None = None,
) -> dict[str, Any]:
    return {
        "status": status,
        "scanner": "trivy",
        "scanner_version": version,
        "scanned_at": scanned_at,
        "counts": counts if counts is not None else dict.fromkeys(SEVERITIES, 0),
    }


async def _scan_worker(state: ModuleState, session: AsyncSession, image_id: str) -> str | None:
    connected = set(state.hub.connected_ids())
    rows = (
        await session.scalars(
            select(ImageWorker.worker_id).where(
                ImageWorker.image_id == image_id, ImageWorker.state == "ready"
            )
        )
    ).all()
    ready = [w for w in rows if w in connected]
    return ready[0] if ready else None


async def scan_image(state: ModuleState, image_id: str, worker_id: str | None = None) -> None:
    """Scan ``image_id`` on ``worker_id`` (default: a connected worker where it is ready).

    Stores the scan object on the image and replaces its findings (SPEC §7.7). The scan is
    ``failed`` when no worker holding the image is connected or the worker fails.
    """
    async with state.db.sessionmaker() as session:
        image = await session.get(Image, image_id)
        if image is None or image.status != "ready":
            return
        worker_id = worker_id or await _scan_worker(state, session, image_id)
        image.scan = _scan_object("scanning" if worker_id else "failed")
        await session.commit()
    if worker_id is None:
        log.warning("image_scan_failed", image_id=image_id, reason="no worker holds the image")
        return
    try:
        result = await state.hub.require(worker_id).call(
            TaskKind.IMAGE_SCAN, {"image_id": image_id}, timeout_s=SCAN_TIMEOUT_S
        )
    except errors.ScaiGridError as exc:
        log.warning("image_scan_failed", image_id=image_id, reason=exc.message)
        result = {"status": "failed"}
    await store_scan(state, image_id, result)


async def store_scan(state: ModuleState, image_id: str, result: dict[str, Any]) -> None:
    """Store an ``image.scan`` result: the scan object, and the findings of a ``done`` scan."""
    status = str(result.get("status"))
    if status not in ("done", "failed", "scanner_unavailable"):
        status = "failed"
    raw_counts = result.get("counts") if isinstance(result.get("counts"), dict) else {}
    assert isinstance(raw_counts, dict)
    counts = {key: int(raw_counts.get(key) or 0) for key in SEVERITIES}
    findings = result.get("findings") if status == "done" else None
    async with state.db.sessionmaker() as session:
        image = await session.get(Image, image_id)
        if image is None:
            return
        version = result.get("scanner_version")
        image.scan = _scan_object(
            status,
            version=version if isinstance(version, str) else None,
            counts=counts,
            scanned_at=iso(utcnow()),
        )
        if isinstance(findings, list):
            await session.execute(delete(ImageFinding).where(ImageFinding.image_id == image_id))
            for seq, finding in enumerate(f for f in findings if isinstance(f, dict)):
                severity = str(finding.get("severity") or "unknown")
                session.add(
                    ImageFinding(
                        image_id=image_id,
                        seq=seq,
                        vulnerability_id=str(finding.get("vulnerability_id") or "")[:256],
                        pkg_name=_text(finding.get("pkg_name"), 512),
                        installed_version=_text(finding.get("installed_version"), 512),
                        fixed_version=_text(finding.get("fixed_version"), 512),
                        severity=severity if severity in SEVERITIES else "unknown",
                        title=_text(finding.get("title"), 4096),
                    )
                )
        await session.commit()
    log.info("image_scan_stored", image_id=image_id, status=status, **counts)


async def check_scan_gate(session: AsyncSession, principal: Principal, image: Image) -> None:
    """Refuse a bunker from ``image`` when ``block_on_critical`` is on (SPEC §7.7).

    The setting is the tenant's module config, else its partner's, else off. The latest
    ``done`` scan's findings are the ones stored (a failed rescan keeps them), so the image
    is blocked when any stored finding is critical; an image never scanned is not blocked.

    Raises:
        errors.ImageScanBlocked: blocking is on and the image has critical findings.
    """
    tenant = await module_scopes.scope_config(
        session, "scaibunker", module_scopes.TENANT, principal.tenant_id
    )
    partner = await module_scopes.scope_config(
        session, "scaibunker", module_scopes.PARTNER, principal.partner_id
    )
    block = tenant.get("block_on_critical", partner.get("block_on_critical", False))
    if not block:
        return
    critical = (
        await session.scalars(
            select(ImageFinding.seq).where(
                ImageFinding.image_id == image.id, ImageFinding.severity == "critical"
            )
        )
    ).first()
    if critical is not None:
        raise errors.ImageScanBlocked(
            f"image {image.name} has critical vulnerabilities and block_on_critical is on",
            details={"image_id": image.id, "scan": image.scan},
        )


def _text(value: Any, limit: int) -> str | None:
    return None if value is None else str(value)[:limit]


def finding_to_dict(finding: ImageFinding) -> dict[str, Any]:
    """Render a finding (SPEC §7.7)."""
    return {
        "vulnerability_id": finding.vulnerability_id,
        "pkg_name": finding.pkg_name,
        "installed_version": finding.installed_version,
        "fixed_version": finding.fixed_version,
        "severity": finding.severity,
        "title": finding.title,
    }


async def rescan_loop(state: ModuleState, interval_s: float = RESCAN_INTERVAL_S) -> None:
    """Rescan every ``ready`` image once per ``interval_s`` seconds (SPEC §7.7), forever."""
    while True:
        await asyncio.sleep(interval_s)
        async with state.db.sessionmaker() as session:
            ready = (await session.scalars(select(Image.id).where(Image.status == "ready"))).all()
        for image_id in ready:
            await scan_image(state, image_id)


async def evict_image(state: ModuleState, image_id: str) -> dict[str, str]:
    """Ask every connected worker holding ``image_id`` to drop it (after deactivation).

    A worker refuses while a bunker's root still uses the image (``IMAGE_IN_USE``); that
    worker keeps its ``ready`` row with the refusal as ``error``, and running bunkers are
    unaffected (SPEC §7.4).

    Then the image's baked artifact is deleted from the object store unless a snapshot or a
    live bunker still references the image (:func:`drop_unused_artifact`).

    Returns:
        ``{worker_id: "evicted" | "in_use" | "failed"}`` for the workers asked.
    """
    async with state.db.sessionmaker() as session:
        holders = (
            await session.scalars(
                select(ImageWorker.worker_id).where(
                    ImageWorker.image_id == image_id, ImageWorker.state == "ready"
                )
            )
        ).all()
    connected = set(state.hub.connected_ids())
    outcome: dict[str, str] = {}
    for worker_id in holders:
        if worker_id not in connected:
            continue
        try:
            await state.hub.require(worker_id).call(
                TaskKind.IMAGE_EVICT, {"image_id": image_id}, timeout_s=EVICT_TIMEOUT_S
            )
        except errors.ScaiGridError as exc:
            outcome[worker_id] = "in_use" if exc.code == "IMAGE_IN_USE" else "failed"
            log.info(
                "image_evict_refused", image_id=image_id, worker_id=worker_id, reason=exc.message
            )
            await _record_warm(state, image_id, worker_id, "ready", exc.message)
            continue
        outcome[worker_id] = "evicted"
        async with state.db.sessionmaker() as session:
            await session.execute(
                delete(ImageWorker).where(
                    ImageWorker.image_id == image_id, ImageWorker.worker_id == worker_id
                )
            )
            await session.commit()
        log.info("image_evicted", image_id=image_id, worker_id=worker_id)
    await drop_unused_artifact(state, image_id)
    return outcome


async def drop_unused_artifact(state: ModuleState, image_id: str) -> bool:
    """Delete the baked artifact of a deactivated image unless something still needs it.

    SPEC §7.4: the stored rootfs is kept while any snapshot or non-terminal bunker references
    the image (a restore on another worker fetches it from there).

    Returns:
        True when the artifact objects were deleted (or there were none).
    """
    async with state.db.sessionmaker() as session:
        image = await session.get(Image, image_id)
        if image is None or image.status != "deactivated":
            return False
        snapshot = (
            await session.scalars(select(Snapshot.id).where(Snapshot.image_id == image_id))
        ).first()
        bunker = (
            await session.scalars(
                select(Bunker.id).where(
                    Bunker.image_id == image_id, Bunker.status.not_in(list(TERMINAL))
                )
            )
        ).first()
    if snapshot is not None or bunker is not None or state.storage is None:
        log.info("image_artifact_kept", image_id=image_id, snapshot=snapshot, bunker=bunker)
        return False
    store = state.storage.store
    try:
        keys = await store.list_keys(f"scaibunker/images/{image_id}/rootfs.")
        for key in keys:
            with contextlib.suppress(errors.ObjectNotFound):
                await store.delete(key)
    except errors.ObjectStoreUnavailable as exc:
        log.warning("image_artifact_delete_failed", image_id=image_id, reason=exc.message)
        return False
    log.info("image_artifact_deleted", image_id=image_id, keys=keys)
    return True


async def seed_builtin_images(state: ModuleState) -> None:
    """Register the platform catalogue (SPEC §7.5) once: missing names are added ``pending``."""
    async with state.db.sessionmaker() as session:
        existing = set(
            (
                await session.scalars(
                    select(Image.name).where(
                        Image.scope == "platform",
                        Image.name.in_(list(BUILTIN_IMAGES)),
                        Image.status != "deactivated",
                    )
                )
            ).all()
        )
        added = [name for name in BUILTIN_IMAGES if name not in existing]
        for name in added:
            session.add(
                Image(
                    id=new_id("img"),
                    name=name,
                    scope="platform",
                    source={"kind": "oci", "ref": BUILTIN_IMAGES[name]},
                    size_mib=4096 if name != "minimal" else 256,
                    lazy_pull=False,
                    status="pending",
                    status_reason=BUILTIN_PENDING_REASON,
                    builtin=True,
                    created_at=utcnow(),
                )
            )
        await session.commit()
    if added:
        log.info("builtin_images_seeded", names=added)


async def bake_pending_images(state: ModuleState) -> None:
    """Queue a bake for every image still ``pending`` (called when a worker registers).

    Built-in images are skipped: they bake only on request (see the module docstring).
    """
    async with state.db.sessionmaker() as session:
        pending = (
            await session.scalars(
                select(Image.id).where(Image.status == "pending", Image.builtin.is_(False))
            )
        ).all()
    for image_id in pending:
        state.spawn(bake_image(state, image_id), name=f"bake-{image_id}")

"""Bunker lifecycle: create, read, list, provision on a worker, terminate (SPEC §2)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from scaigrid import errors
from scaigrid.ids import new_id
from scaigrid.modules.scaibunker.accounting import service as accounting
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.bunkers.schemas import CreateBunkerRequest, iso
from scaigrid.modules.scaibunker.bunkers.states import (
    TERMINAL,
    bunker_lock,
    record_creation,
    transition,
)
from scaigrid.modules.scaibunker.config import (
    DEFAULT_CPU_MILLICORES,
    DEFAULT_DISK_MB,
    DEFAULT_MEMORY_MB,
)
from scaigrid.modules.scaibunker.images.models import Image
from scaigrid.modules.scaibunker.images.service import (
    check_scan_gate,
    image_payload,
    resolve_image,
)
from scaigrid.modules.scaibunker.network import admission, bridges
from scaigrid.modules.scaibunker.network.config import network_config
from scaigrid.modules.scaibunker.quotas import service as quotas
from scaigrid.modules.scaibunker.snapshots import restore as snapshot_restore
from scaigrid.modules.scaibunker.state import ModuleState
from scaigrid.modules.scaibunker.workers import scheduler
from scaigrid.platform.auth import Principal
from scaigrid.platform.db import utcnow
from scaigrid.protocol.link import TaskKind

log = structlog.get_logger(__name__)

PROVISIONING_TIMEOUT_S = 120.0
DESTROY_TIMEOUT_S = 30.0
PAUSE_TIMEOUT_S = 10.0
#: ``last_activity_at`` is written at most once per this many seconds (idle timers count in
#: whole seconds; this keeps a database write off most exec and files calls).
ACTIVITY_RESOLUTION_S = 1.0
MASK = "***"


def bunker_to_dict(bunker: Bunker, *, with_history: bool = False) -> dict[str, Any]:
    """Render a bunker as its API object (SPEC §2.1); env values are masked."""
    data: dict[str, Any] = {
        "id": bunker.id,
        "tenant_id": bunker.tenant_id,
        "owner_user_id": bunker.owner_user_id,
        "name": bunker.name,
        "image": bunker.image_name,
        "image_id": bunker.image_id,
        "snapshot_id": bunker.snapshot_id,
        "lifecycle_mode": bunker.lifecycle_mode,
        "network_profile": bunker.network_profile,
        "network_allowlist": bunker.network_allowlist,
        "cpu_millicores": bunker.cpu_millicores,
        "memory_mb": bunker.memory_mb,
        "disk_mb": bunker.disk_mb,
        "gpu_count": bunker.gpu_count,
        "gpu_type": bunker.gpu_type,
        "bandwidth_mbit": bunker.bandwidth_mbit,
        "max_lifetime_s": bunker.max_lifetime_s,
        "idle_timeout_s": bunker.idle_timeout_s,
        "session_type": bunker.session_type,
        "session_ref": bunker.session_ref,
        "label_set": bunker.label_set,
        "env_vars": dict.fromkeys(bunker.env_vars, MASK),
        "interfaces": bunker.interfaces,
        "status": bunker.status,
        "status_reason": bunker.status_reason,
        "status_message": bunker.status_message,
        "status_changed_at": iso(bunker.status_changed_at),
        "worker_id": bunker.worker_id,
        "driver": bunker.driver,
        "isolation": bunker.isolation,
        "created_at": iso(bunker.created_at),
        "started_at": iso(bunker.started_at),
        "last_activity_at": iso(bunker.last_activity_at),
        "expires_at": iso(bunker.expires_at),
        "ended_at": iso(bunker.ended_at),
        "final_snapshot_id": bunker.final_snapshot_id,
    }
    if with_history:
        data["status_history"] = [
            {"from": e.from_status, "to": e.to_status, "reason": e.reason, "at": iso(e.at)}
            for e in bunker.history
        ]
    return data


def _is_admin_for(principal: Principal, bunker: Bunker) -> bool:
    if principal.has("scaibunker:admin") and principal.is_super_admin:
        return True
    same_tenant = bunker.tenant_id == principal.tenant_id
    return same_tenant and (
        principal.has("scaibunker:admin") or principal.has("scaibunker:admin:tenant")
    )


async def get_visible(
    session: AsyncSession, principal: Principal, bunker_id: str, *, with_history: bool = False
) -> Bunker:
    """Load a bunker the caller owns or administers.

    Raises:
        errors.BunkerNotFound: unknown, or outside the caller's visibility (never 403).
    """
    query = select(Bunker).where(Bunker.id == bunker_id)
    if with_history:
        query = query.options(selectinload(Bunker.history))
    bunker = (await session.scalars(query)).first()
    if bunker is None or not (
        (bunker.owner_user_id == principal.user_id and bunker.tenant_id == principal.tenant_id)
        or _is_admin_for(principal, bunker)
    ):
        raise errors.BunkerNotFound(f"bunker {bunker_id} not found")
    return bunker


async def ensure_running(state: ModuleState, principal: Principal, bunker_id: str) -> Bunker:
    """Load a bunker the caller owns, ready for exec, files and shell (SPEC §1.11, §2.6).

    A bunker its idle timer paused (``status_reason: idle_timeout``) is resumed first and the
    call proceeds once it runs; ``last_activity_at`` is set to now (at most once a second).
    Uses its own session.

    Raises:
        errors.BunkerNotFound: unknown or not owned by the caller.
        errors.BunkerNotRunning: not ``running`` (and not idle-paused).
        errors.AgentUnavailable: the idle-paused bunker's worker did not resume it.
    """
    cached: Bunker | None = state.cached_running(bunker_id)
    if cached is not None:
        if cached.owner_user_id != principal.user_id or cached.tenant_id != principal.tenant_id:
            raise errors.BunkerNotFound(f"bunker {bunker_id} not found")
        return cached
    epoch = state.change_epoch
    async with state.db.sessionmaker() as session:
        bunker = await session.get(Bunker, bunker_id)
        if (
            bunker is None
            or bunker.owner_user_id != principal.user_id
            or bunker.tenant_id != principal.tenant_id
        ):
            raise errors.BunkerNotFound(f"bunker {bunker_id} not found")
        if bunker.status == "paused" and bunker.status_reason == "idle_timeout":
            await _resume(state, session, bunker, "activity")
        if bunker.status != "running":
            raise errors.BunkerNotRunning(
                f"bunker {bunker_id} is {bunker.status}", details={"status": bunker.status}
            )
        now = utcnow()
        last = bunker.last_activity_at
        if last is None or (now - last).total_seconds() >= ACTIVITY_RESOLUTION_S:
            bunker.last_activity_at = last = now
            await session.commit()
        # Until the next activity write is due, later calls take the row from memory.
        state.cache_running(bunker, epoch, ACTIVITY_RESOLUTION_S - (now - last).total_seconds())
        return bunker


async def _worker_call(state: ModuleState, bunker: Bunker, kind: str) -> None:
    connection = state.hub.get(bunker.worker_id)
    if connection is None:
        raise errors.AgentUnavailable(f"the worker of bunker {bunker.id} is not connected")
    await connection.call(kind, {}, bunker_id=bunker.id, timeout_s=PAUSE_TIMEOUT_S)


async def _pause(state: ModuleState, session: AsyncSession, bunker: Bunker, reason: str) -> None:
    await _worker_call(state, bunker, TaskKind.BUNKER_PAUSE)
    async with bunker_lock(bunker.id):
        await session.refresh(bunker, with_for_update=True)
        if bunker.status != "running":
            await session.commit()
            return
        transition(session, bunker, "paused", reason)
        await session.commit()
    state.bunker_changed(bunker.id)
    log.info("bunker_paused", bunker_id=bunker.id, reason=reason)


async def _resume(state: ModuleState, session: AsyncSession, bunker: Bunker, reason: str) -> None:
    await _worker_call(state, bunker, TaskKind.BUNKER_RESUME)
    async with bunker_lock(bunker.id):
        await session.refresh(bunker, with_for_update=True)
        if bunker.status != "paused":
            await session.commit()
            return
        transition(session, bunker, "running", reason)
        await session.commit()
    state.bunker_changed(bunker.id)
    log.info("bunker_resumed", bunker_id=bunker.id, reason=reason)


async def pause_for(state: ModuleState, bunker_id: str, reason: str) -> None:
    """Pause a ``running`` bunker for ``reason`` (the reaper's ``idle_timeout``); else no-op.

    Raises:
        errors.AgentUnavailable: the worker did not acknowledge within 10 s.
    """
    async with state.db.sessionmaker() as session:
        bunker = await session.get(Bunker, bunker_id)
        if bunker is not None and bunker.status == "running":
            await _pause(state, session, bunker, reason)


async def pause_bunker(
    state: ModuleState, session: AsyncSession, principal: Principal, bunker_id: str
) -> Bunker:
    """``POST /bunkers/{id}/pause``: freeze a running bunker; no-op when paused (SPEC §2.3.3).

    Raises:
        errors.BunkerNotFound: unknown or invisible bunker.
        errors.BunkerNotRunning: neither ``running`` nor ``paused``.
        errors.AgentUnavailable: the worker did not acknowledge within 10 s.
    """
    bunker = await get_visible(session, principal, bunker_id)
    if bunker.status == "paused":
        if bunker.status_reason == "idle_timeout":
            bunker.status_reason = "api_pause"
            await session.commit()
        return bunker
    if bunker.status != "running":
        raise errors.BunkerNotRunning(
            f"bunker {bunker_id} is {bunker.status}", details={"status": bunker.status}
        )
    await _pause(state, session, bunker, "api_pause")
    return bunker


async def resume_bunker(
    state: ModuleState, session: AsyncSession, principal: Principal, bunker_id: str
) -> Bunker:
    """``POST /bunkers/{id}/resume``: thaw a paused bunker; no-op when running (SPEC §2.3.3).

    Raises:
        errors.BunkerNotFound: unknown or invisible bunker.
        errors.BunkerNotRunning: neither ``running`` nor ``paused``.
        errors.AgentUnavailable: the worker did not acknowledge within 10 s.
    """
    bunker = await get_visible(session, principal, bunker_id)
    if bunker.status == "running":
        return bunker
    if bunker.status != "paused":
        raise errors.BunkerNotRunning(
            f"bunker {bunker_id} is {bunker.status}", details={"status": bunker.status}
        )
    await _resume(state, session, bunker, "api_resume")
    return bunker


async def list_bunkers(
    session: AsyncSession,
    principal: Principal,
    *,
    status: Sequence[str] | None,
    labels: dict[str, str],
    limit: int,
    cursor: str | None,
    lifecycle: str | None = None,
    session_type: str | None = None,
    session_ref: str | None = None,
) -> tuple[list[Bunker], str | None]:
    """List visible bunkers newest first; return ``(page, next_cursor)``.

    The cursor is the id of the last bunker of the previous page (ids are time-ordered ULIDs).
    """
    query = select(Bunker).order_by(Bunker.id.desc())
    if not (principal.is_super_admin and principal.has("scaibunker:admin")):
        query = query.where(Bunker.tenant_id == principal.tenant_id)
        if not (principal.has("scaibunker:admin") or principal.has("scaibunker:admin:tenant")):
            query = query.where(Bunker.owner_user_id == principal.user_id)
    if status:
        query = query.where(Bunker.status.in_(status))
    if cursor:
        query = query.where(Bunker.id < cursor)
    if lifecycle is not None:
        query = query.where(Bunker.lifecycle_mode == lifecycle)
    if session_type is not None:
        query = query.where(Bunker.session_type == session_type)
    if session_ref is not None:
        query = query.where(Bunker.session_ref == session_ref)
    page: list[Bunker] = []
    async for bunker in await session.stream_scalars(query):
        if all(bunker.label_set.get(k) == v for k, v in labels.items()):
            page.append(bunker)
            if len(page) > limit:
                break
    if len(page) > limit:
        return page[:limit], page[limit - 1].id
    return page, None


def _timers(state: ModuleState, request: CreateBunkerRequest) -> tuple[int | None, int | None]:
    defaults = state.config.lifecycle_defaults[request.lifecycle_mode]
    timers = []
    for asked, configured, field in (
        (request.max_lifetime_s, defaults.max_lifetime_s, "max_lifetime_s"),
        (request.idle_timeout_s, defaults.idle_timeout_s, "idle_timeout_s"),
    ):
        if asked is not None and configured is not None and asked > configured:
            raise errors.ValidationFailed(
                f"{field} may not exceed {configured} for {request.lifecycle_mode} bunkers",
                details=[{"field": field, "message": f"must be at most {configured}"}],
            )
        timers.append(asked if asked is not None else configured)
    return timers[0], timers[1]


async def create_bunker(
    state: ModuleState, session: AsyncSession, principal: Principal, request: CreateBunkerRequest
) -> Bunker:
    """Admit, place and persist a bunker in ``pending``, then provision it in the background.

    Raises:
        errors.ImageNotFound, errors.ImageNotReady: the image cannot be used.
        errors.ValidationFailed: snapshots, GPUs or interfaces (later issues), or timers.
        errors.AuthzPermissionDenied: lifecycle mode or network profile not allowed.
        errors.BunkerQuotaExceeded: a platform ceiling or quota profile cap (SPEC §9.4).
        errors.WorkerUnavailable, errors.NoSuitableWorker: no worker can take it.
    """
    snapshot = None
    if request.snapshot_id is not None:
        snapshot = await snapshot_restore.restore_source(session, principal, request.snapshot_id)
        image = await snapshot_restore.snapshot_image(session, principal, snapshot, request.image)
    else:
        assert request.image is not None
        image = await resolve_image(session, principal, request.image)
    # SPEC §6.4: a snapshot whose image has since been deactivated can still be restored
    # (its baked artifact is kept while snapshots reference it, SPEC §7.4).
    usable = ("ready", "deactivated") if snapshot is not None else ("ready",)
    if image.status not in usable:
        raise errors.ImageNotReady(
            f"image {image.name} is {image.status}",
            details={"status": image.status, "reason": image.status_reason},
        )
    await check_scan_gate(session, principal, image)
    if request.gpu_count:
        raise errors.WorkerUnavailable("no worker offers GPUs")
    admission.check_profile(principal, request.network_profile, request.interfaces)
    max_lifetime_s, idle_timeout_s = _timers(state, request)
    if request.lifecycle_mode == "session" and not principal.has("scaibunker:create:session"):
        raise errors.LifecycleModeDenied("session bunkers need scaibunker:create:session")
    if request.lifecycle_mode == "persistent" and not principal.has("scaibunker:create:persistent"):
        raise errors.LifecycleModeDenied("persistent bunkers need scaibunker:create:persistent")

    cpu = request.cpu_millicores or image.default_cpu_millicores or DEFAULT_CPU_MILLICORES
    memory = request.memory_mb or image.default_memory_mb or DEFAULT_MEMORY_MB
    disk = request.disk_mb or image.default_disk_mb or DEFAULT_DISK_MB
    if snapshot is not None:
        cpu, memory, disk = snapshot_restore.sized(snapshot, request, (cpu, memory, disk))
        snapshot_restore.check_fits(snapshot, disk)
    now = utcnow()
    ask = quotas.Ask(cpu, memory, disk, 0, request.lifecycle_mode == "persistent")
    async with state.placement_lock:
        pinned: str | None = None
        interfaces: list[dict[str, Any]] = []
        isolation: str | None = request.isolation
        if request.network_profile == "transit" and request.interfaces:
            pinned, interfaces = await bridges.resolve_interfaces(
                session, principal.tenant_id, request.interfaces
            )
            isolation = bridges.transit_isolation(request.isolation)
        contributions = await quotas.admit(
            session, principal.tenant_id, principal.user_id, ask, state.config.platform_max
        )
        placement = await scheduler.place(
            session,
            state.hub.connected_ids(),
            scheduler.Request(
                principal.tenant_id,
                cpu,
                memory,
                disk,
                isolation,
                image_id=image.id,
                worker_id=pinned,
                # Workers dropped a deactivated image; a restore fetches it on demand.
                lazy_pull=image.lazy_pull or image.status == "deactivated",
            ),
        )
        bunker = Bunker(
            id=new_id("bnk"),
            tenant_id=principal.tenant_id,
            owner_user_id=principal.user_id,
            name=request.name,
            image_name=image.name,
            image_id=image.id,
            snapshot_id=snapshot.id if snapshot is not None else None,
            lifecycle_mode=request.lifecycle_mode,
            network_profile=request.network_profile,
            network_allowlist=request.network_allowlist,
            cpu_millicores=cpu,
            memory_mb=memory,
            disk_mb=disk,
            gpu_count=0,
            bandwidth_mbit=request.bandwidth_mbit,
            max_lifetime_s=max_lifetime_s,
            idle_timeout_s=idle_timeout_s,
            session_type=request.session_type,
            session_ref=request.session_ref,
            label_set=request.label_set,
            env_vars=request.env_vars,
            interfaces=interfaces,
            status="pending",
            status_reason="created",
            status_changed_at=now,
            worker_id=placement.worker_id,
            driver=placement.driver,
            isolation=placement.isolation,
            created_at=now,
            expires_at=now + timedelta(seconds=max_lifetime_s) if max_lifetime_s else None,
        )
        session.add(bunker)
        await session.flush()
        quotas.record(session, bunker.id, contributions)
        record_creation(session, bunker)
        await session.commit()
    log.info("bunker_created", bunker_id=bunker.id, worker_id=bunker.worker_id, image=image.name)
    state.spawn(provision(state, bunker.id, image), name=f"provision-{bunker.id}")
    return bunker


async def set_state(
    state: ModuleState,
    bunker_id: str,
    to: str,
    reason: str,
    *,
    only_from: tuple[str, ...],
    message: str | None = None,
    fields: dict[str, Any] | None = None,
) -> bool:
    """Apply a transition in its own session if the bunker is in one of ``only_from``.

    Returns:
        True when the transition was applied.
    """
    async with bunker_lock(bunker_id), state.db.sessionmaker() as session:
        bunker = await session.get(Bunker, bunker_id, with_for_update=True)
        if bunker is None or bunker.status not in only_from:
            return False
        for key, value in (fields or {}).items():
            setattr(bunker, key, value)
        transition(session, bunker, to, reason, message=message)
        await session.commit()
    state.bunker_changed(bunker_id)
    return True


async def provision(state: ModuleState, bunker_id: str, image: Image) -> None:
    """Send ``bunker.create`` to the bunker's worker and follow it to ``running`` or ``failed``.

    While it runs the bunker is in :attr:`ModuleState.provisioning`, so the reaper's
    provisioning-timeout sweep (a backstop for boots nobody follows any more, e.g. after a
    controller restart) leaves it alone.
    """
    state.provisioning.add(bunker_id)
    try:
        await _follow_boot(state, bunker_id, image)
    finally:
        state.provisioning.discard(bunker_id)


async def _follow_boot(state: ModuleState, bunker_id: str, image: Image) -> None:
    async with state.db.sessionmaker() as session:
        bunker = await session.get(Bunker, bunker_id)
        if bunker is None:
            return
        worker_id = bunker.worker_id
        params = {
            "bunker": {
                "id": bunker.id,
                "cpu_millicores": bunker.cpu_millicores,
                "memory_mb": bunker.memory_mb,
                "disk_mb": bunker.disk_mb,
                "driver": bunker.driver,
                "env_vars": bunker.env_vars,
                "network_profile": bunker.network_profile,
                "network_allowlist": admission.worker_allowlist(
                    network_config(), bunker.network_profile, bunker.network_allowlist
                ),
                "bandwidth_mbit": bunker.bandwidth_mbit,
                "tenant_id": bunker.tenant_id,
                "interfaces": await bridges.worker_interfaces(session, bunker),
            },
            "image": image_payload(state, image),
            "network": admission.worker_network(network_config()),
        }
        snapshot_id = bunker.snapshot_id
    if snapshot_id is not None:
        try:
            params["snapshot"] = await snapshot_restore.worker_params(state, snapshot_id)
        except errors.ScaiGridError as exc:
            await set_state(
                state,
                bunker_id,
                "failed",
                "boot_failed",
                only_from=("pending",),
                message=exc.message,
            )
            return
    connection = state.hub.get(worker_id)
    if connection is None:
        await set_state(
            state,
            bunker_id,
            "failed",
            "boot_failed",
            only_from=("pending",),
            message="the worker disconnected before the bunker started",
        )
        return
    try:
        handle = await connection.start_task(TaskKind.BUNKER_CREATE, params, bunker_id=bunker_id)
        while (progress := await handle.next_progress(PROVISIONING_TIMEOUT_S)) is not None:
            if progress.get("stage"):
                await set_state(
                    state, bunker_id, "provisioning", "scheduled", only_from=("pending",)
                )
        result = await handle.result(PROVISIONING_TIMEOUT_S)
    except errors.ScaiGridError as exc:
        log.warning("bunker_boot_failed", bunker_id=bunker_id, code=exc.code, reason=exc.message)
        if not await set_state(
            state,
            bunker_id,
            "failed",
            "provisioning_timeout" if exc.code == "AGENT_UNAVAILABLE" else "boot_failed",
            only_from=("pending", "provisioning"),
            message=exc.message,
        ):
            await destroy_on_worker(state, worker_id, bunker_id)
        return
    await set_state(state, bunker_id, "provisioning", "scheduled", only_from=("pending",))
    booted = await set_state(
        state,
        bunker_id,
        "running",
        "booted",
        only_from=("provisioning",),
        fields={"driver": result.get("driver"), "isolation": result.get("isolation")},
    )
    if not booted:
        await destroy_on_worker(state, worker_id, bunker_id)
    else:
        log.info("bunker_running", bunker_id=bunker_id, boot_ms=result.get("boot_ms"))


async def destroy_on_worker(state: ModuleState, worker_id: str | None, bunker_id: str) -> bool:
    """Ask the worker to tear the bunker down; return False if it could not be reached.

    A worker that is unreachable now destroys the bunker when it reconnects (reconciliation).
    """
    connection = state.hub.get(worker_id)
    if connection is None:
        return False
    try:
        result = await connection.call(
            TaskKind.BUNKER_DESTROY, {}, bunker_id=bunker_id, timeout_s=DESTROY_TIMEOUT_S
        )
    except errors.ScaiGridError as exc:
        log.warning("bunker_destroy_failed", bunker_id=bunker_id, code=exc.code, reason=exc.message)
        return False
    sent = result.get("egress_bytes")
    if isinstance(sent, int) and not isinstance(sent, bool) and sent >= 0:
        async with state.db.sessionmaker() as session:
            bunker = await session.get(Bunker, bunker_id, with_for_update=True)
            if bunker is not None and bunker.worker_id == worker_id:
                accounting.apply_egress_report(bunker, sent)
                await session.commit()
    return True


async def terminate_bunker(
    state: ModuleState, session: AsyncSession, principal: Principal, bunker_id: str
) -> Bunker:
    """``DELETE /bunkers/{id}``: stop the bunker and end in ``terminated`` (idempotent).

    Raises:
        errors.BunkerNotFound: unknown or invisible bunker.
    """
    bunker = await get_visible(session, principal, bunker_id)
    async with bunker_lock(bunker_id):
        await session.refresh(bunker, with_for_update=True)
        if bunker.status in TERMINAL or bunker.status == "stopping":
            await session.commit()
            return bunker
        transition(session, bunker, "stopping", "api_terminate")
        await session.commit()
    state.bunker_changed(bunker_id)
    await destroy_on_worker(state, bunker.worker_id, bunker_id)
    await set_state(state, bunker_id, "terminated", "api_terminate", only_from=("stopping",))
    await session.refresh(bunker)
    return bunker


async def end_tenant_bunkers(state: ModuleState, tenant_id: str, reason: str) -> list[str]:
    """Stop every non-terminal bunker of ``tenant_id`` and end it in ``terminated`` with
    ``reason`` (e.g. ``module_disabled``); return the ids ended."""
    async with state.db.sessionmaker() as session:
        live = await session.scalars(
            select(Bunker).where(Bunker.tenant_id == tenant_id, Bunker.status.not_in(TERMINAL))
        )
        bunkers = [(b.id, b.worker_id) for b in live]
    ended: list[str] = []
    for bunker_id, worker_id in bunkers:
        live_states = ("pending", "provisioning", "running", "paused")
        await set_state(state, bunker_id, "stopping", reason, only_from=live_states)
        await destroy_on_worker(state, worker_id, bunker_id)
        if await set_state(state, bunker_id, "terminated", reason, only_from=("stopping",)):
            ended.append(bunker_id)
    log.info("tenant_bunkers_ended", tenant_id=tenant_id, reason=reason, count=len(ended))
    return ended


async def fail_bunker(state: ModuleState, bunker_id: str, reason: str, message: str) -> None:
    """Move a live bunker to ``failed`` (worker events such as ``vm_exited``)."""
    await set_state(
        state,
        bunker_id,
        "failed",
        reason,
        only_from=("pending", "provisioning", "running", "paused"),
        message=message,
    )

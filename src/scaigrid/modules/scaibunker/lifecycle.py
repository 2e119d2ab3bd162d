"""Background enforcement of bunker timers and worker loss (SPEC §2.5, §10.5, §10.6).

Two loops run in every controller process that owns the module state:

- the **reaper** (every :attr:`ModuleConfig.reaper_interval_s`) expires bunkers past
  ``expires_at`` (``stopping`` → ``expired``, reason ``max_lifetime``), terminates idle
  ephemeral bunkers (reason ``idle_timeout``, ending ``expired``) and pauses idle session and
  persistent bunkers (``paused``, reason ``idle_timeout``; the next exec/files/shell call
  resumes them, see :func:`~scaigrid.modules.scaibunker.bunkers.service.ensure_running`);
- the **heartbeat monitor** (every :attr:`ModuleConfig.monitor_interval_s`) treats a worker
  without a heartbeat for :attr:`ModuleConfig.worker_lost_after_s` as lost: its non-persistent
  bunkers become ``failed`` (``worker_lost``; their quota is released because quota usage is
  the sum over non-terminal bunkers), its persistent bunkers go back to ``pending`` and are
  booted fresh from their image on another worker (retried each pass; ``reschedule_failed``
  after :attr:`ModuleConfig.reschedule_give_up_s`), and the worker is marked ``offline``.

Leadership: with Redis one controller process leads (a renewed lock key); without Redis the
embedded default runs one controller process, which is the leader. Every transition is also
guarded by the bunker's current state, so a pass that overlaps a leader change finds nothing
left to do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

import structlog
from sqlalchemy import select

from scaigrid import errors
from scaigrid.modules.scaibunker.accounting import service as accounting
from scaigrid.modules.scaibunker.bunkers import service as bunker_service
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.bunkers.states import TERMINAL, bunker_lock, transition
from scaigrid.modules.scaibunker.images.models import Image
from scaigrid.modules.scaibunker.leadership import Leadership
from scaigrid.modules.scaibunker.snapshots import restore as snapshot_restore
from scaigrid.modules.scaibunker.state import ModuleState
from scaigrid.modules.scaibunker.workers import scheduler
from scaigrid.modules.scaibunker.workers.models import Worker
from scaigrid.platform.db import utcnow

log = structlog.get_logger(__name__)


async def _stop_and_end(state: ModuleState, bunker_id: str, reason: str) -> None:
    """``stopping`` (``reason``) → destroy on the worker → ``expired``."""
    async with bunker_lock(bunker_id), state.db.sessionmaker() as session:
        bunker = await session.get(Bunker, bunker_id, with_for_update=True)
        if bunker is None or bunker.status in TERMINAL or bunker.status == "stopping":
            return
        transition(session, bunker, "stopping", reason)
        await session.commit()
        worker_id = bunker.worker_id
    state.bunker_changed(bunker_id)
    await bunker_service.destroy_on_worker(state, worker_id, bunker_id)
    await bunker_service.set_state(state, bunker_id, "expired", reason, only_from=("stopping",))
    log.info("bunker_reaped", bunker_id=bunker_id, reason=reason)


def _idle_since(bunker: Bunker) -> datetime:
    marks = [bunker.status_changed_at]
    if bunker.last_activity_at is not None:
        marks.append(bunker.last_activity_at)
    return max(marks)


async def reap_once(state: ModuleState) -> None:
    """One reaper pass: lifetime expiry, then idle handling of running bunkers."""
    now = utcnow()
    async with state.db.sessionmaker() as session:
        expired = (
            await session.scalars(
                select(Bunker.id).where(
                    Bunker.status.in_(("pending", "provisioning", "running", "paused")),
                    Bunker.expires_at.is_not(None),
                    Bunker.expires_at <= now,
                )
            )
        ).all()
        idle_candidates = (
            await session.scalars(
                select(Bunker).where(Bunker.status == "running", Bunker.idle_timeout_s.is_not(None))
            )
        ).all()
        idle = [
            (b.id, b.lifecycle_mode)
            for b in idle_candidates
            if b.id not in expired
            and b.idle_timeout_s is not None
            and _idle_since(b) + timedelta(seconds=b.idle_timeout_s) <= now
        ]
    for bunker_id in expired:
        await _stop_and_end(state, bunker_id, "max_lifetime")
    for bunker_id, mode in idle:
        if mode == "ephemeral":
            await _stop_and_end(state, bunker_id, "idle_timeout")
            continue
        try:
            await bunker_service.pause_for(state, bunker_id, "idle_timeout")
        except errors.ScaiGridError as exc:
            log.warning("bunker_idle_pause_failed", bunker_id=bunker_id, code=exc.code)


async def _replace_persistent(state: ModuleState, bunker_id: str) -> None:
    """Place a ``pending`` persistent bunker that has no worker and boot it from its latest
    ``ready`` snapshot (or the snapshot it was created from), else from its image."""
    async with bunker_lock(bunker_id), state.db.sessionmaker() as session:
        bunker = await session.get(Bunker, bunker_id, with_for_update=True)
        if bunker is None or bunker.status != "pending" or bunker.worker_id is not None:
            return
        if utcnow() - bunker.status_changed_at > timedelta(
            seconds=state.config.reschedule_give_up_s
        ):
            transition(session, bunker, "failed", "reschedule_failed")
            await session.commit()
            state.bunker_changed(bunker_id)
            return
        image = await session.get(Image, bunker.image_id)
        if image is None:
            return
        async with state.placement_lock:
            try:
                placement = await scheduler.place(
                    session,
                    state.hub.connected_ids(),
                    scheduler.Request(
                        bunker.tenant_id,
                        bunker.cpu_millicores,
                        bunker.memory_mb,
                        bunker.disk_mb,
                        bunker.isolation,
                    ),
                )
            except (errors.WorkerUnavailable, errors.NoSuitableWorker) as exc:
                log.info("bunker_reschedule_waiting", bunker_id=bunker_id, code=exc.code)
                return
            bunker.worker_id = placement.worker_id
            bunker.driver = placement.driver
            bunker.egress_reported = 0
            latest = await snapshot_restore.latest_ready(session, bunker_id)
            if latest is not None:
                bunker.snapshot_id = latest.id
            bunker.status_reason = (
                "rescheduled_from_snapshot" if bunker.snapshot_id else "rescheduled_from_image"
            )
            await session.commit()
    log.info("bunker_rescheduled", bunker_id=bunker_id, worker_id=placement.worker_id)
    state.spawn(bunker_service.provision(state, bunker_id, image), name=f"provision-{bunker_id}")


async def monitor_workers_once(state: ModuleState) -> list[str]:
    """One heartbeat-monitor pass; return the ids of the workers found lost in it."""
    cutoff = utcnow() - timedelta(seconds=state.config.worker_lost_after_s)
    async with state.db.sessionmaker() as session:
        live_bunker_workers = select(Bunker.worker_id).where(
            Bunker.status.not_in(TERMINAL), Bunker.worker_id.is_not(None)
        )
        lost = (
            await session.scalars(
                select(Worker).where(
                    Worker.deleted_at.is_(None),
                    (Worker.connection != "offline") | Worker.id.in_(live_bunker_workers),
                    (Worker.last_heartbeat.is_(None) & (Worker.registered_at < cutoff))
                    | (Worker.last_heartbeat < cutoff),
                )
            )
        ).all()
        lost_ids = [w.id for w in lost]
        for worker in lost:
            worker.connection = "offline"
        await session.commit()
        bunker_ids = (
            (
                await session.scalars(
                    select(Bunker.id).where(
                        Bunker.worker_id.in_(lost_ids), Bunker.status.not_in(TERMINAL)
                    )
                )
            ).all()
            if lost_ids
            else []
        )
    for bunker_id in bunker_ids:
        await _fail_out(state, bunker_id, lost_ids)
    async with state.db.sessionmaker() as session:
        orphans = (
            await session.scalars(
                select(Bunker.id).where(
                    Bunker.status == "pending",
                    Bunker.worker_id.is_(None),
                    Bunker.lifecycle_mode == "persistent",
                )
            )
        ).all()
    for worker_id in lost_ids:
        log.warning("worker_lost", worker_id=worker_id, bunkers=len(bunker_ids))
    for bunker_id in orphans:
        await _replace_persistent(state, bunker_id)
    return lost_ids


async def _fail_out(state: ModuleState, bunker_id: str, lost_ids: list[str]) -> None:
    """Apply worker loss to one bunker (SPEC §10.6), re-checked under its lock."""
    async with bunker_lock(bunker_id), state.db.sessionmaker() as session:
        bunker = await session.get(Bunker, bunker_id, with_for_update=True)
        if bunker is None or bunker.status in TERMINAL or bunker.worker_id not in lost_ids:
            return
        if bunker.status == "stopping":
            ends_expired = bunker.status_reason in ("idle_timeout", "max_lifetime")
            transition(
                session, bunker, "expired" if ends_expired else "terminated", bunker.status_reason
            )
        elif bunker.lifecycle_mode == "persistent":
            if bunker.status != "pending":
                transition(session, bunker, "pending", "worker_lost")
            bunker.worker_id = None
        else:
            transition(session, bunker, "failed", "worker_lost")
        await session.commit()
    state.bunker_changed(bunker_id)


async def _loop(
    name: str,
    interval_s: float,
    state: ModuleState,
    leadership: Leadership,
    once: Callable[[ModuleState], Awaitable[object]],
) -> None:
    while True:
        try:
            if await leadership.claim():
                await once(state)
        except Exception as exc:
            log.error("lifecycle_pass_failed", loop=name, exc_info=exc)
        await asyncio.sleep(interval_s)


async def _record_usage(state: ModuleState) -> None:
    await accounting.record_usage_once(state.db)


async def _run(state: ModuleState, leadership: Leadership) -> None:
    config = state.config
    try:
        await asyncio.gather(
            _loop("reaper", config.reaper_interval_s, state, leadership, reap_once),
            _loop(
                "worker_monitor",
                config.monitor_interval_s,
                state,
                leadership,
                monitor_workers_once,
            ),
            _loop("usage", config.usage_interval_s, state, leadership, _record_usage),
        )
    finally:
        await leadership.close()


def start(state: ModuleState) -> None:
    """Start the reaper, the heartbeat monitor and usage recording in the background.

    They act only while this process leads (see :mod:`~scaigrid.modules.scaibunker.leadership`).
    """
    settings = state.settings
    leadership = Leadership(settings.redis_url, f"{settings.redis_prefix}scaibunker:leader")
    state.spawn(_run(state, leadership), name="lifecycle")

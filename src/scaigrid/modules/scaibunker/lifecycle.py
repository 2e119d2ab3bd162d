"""Background enforcement of bunker timers and worker loss (SPEC §2.5, §10.5, §10.6).

Two loops run in every controller process that owns the module state:

- the **reaper** (every :attr:`ModuleConfig.reaper_interval_s`) expires bunkers past
  ``expires_at`` (``stopping`` → ``expired``, reason ``max_lifetime``), terminates idle
  ephemeral bunkers (reason ``idle_timeout``, ending ``expired``) and pauses idle session and
  persistent bunkers (``paused``, reason ``idle_timeout``; the next exec/files/shell call
  resumes them, see :func:`~scaigrid.modules.scaibunker.bunkers.service.ensure_running`);
- the **heartbeat monitor** (every :attr:`ModuleConfig.monitor_interval_s`) marks a worker
  without a heartbeat for :attr:`ModuleConfig.worker_stale_after_s` ``stale`` (the scheduler
  and fan-out skip it until its next heartbeat) and treats one silent for
  :attr:`ModuleConfig.worker_lost_after_s` as lost: its non-persistent bunkers become
  ``failed`` (``worker_lost``; their quota is released because quota usage is the sum over
  non-terminal bunkers), its persistent bunkers go back to ``pending``, and the worker is
  marked ``offline``;
- **re-placement** (every :attr:`ModuleConfig.replace_interval_s`) boots each such persistent
  bunker on another worker, from its latest snapshot or else its image (``reschedule_failed``
  after :attr:`ModuleConfig.reschedule_give_up_s`);
- the reaper also fails boots that no controller process follows any more (``pending`` or
  ``provisioning`` past the provisioning timeout, e.g. after a restart) and, before idling a
  bunker, asks its agent whether an exec kept it busy (SPEC §2.6);
- **usage** records (every :attr:`ModuleConfig.usage_interval_s`).

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
from sqlalchemy import select, update

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
from scaigrid.protocol.link import TaskKind

log = structlog.get_logger(__name__)

#: Deadline of the ``process.list`` call the reaper makes before idling a bunker (seconds).
ACTIVITY_QUERY_TIMEOUT_S = 10.0
PROVISIONING_TIMEOUT_S = bunker_service.PROVISIONING_TIMEOUT_S
#: Slack past the provisioning timeout before the sweep fails a boot nobody follows (seconds).
PROVISIONING_GRACE_S = 10.0


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


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


async def _exec_activity(state: ModuleState, bunker: Bunker) -> tuple[bool, datetime | None]:
    """Ask the bunker's agent about its execs (SPEC §2.6: an exec is activity from its start
    until it ends, foreground or background): ``(one is still running, latest end time)``.

    An unreachable worker or agent counts as no activity: the idle handling then proceeds as
    it would for a bunker nobody uses.
    """
    connection = state.hub.get(bunker.worker_id)
    if connection is None:
        return False, None
    try:
        result = await connection.call(
            TaskKind.PROCESS_LIST, {}, bunker_id=bunker.id, timeout_s=ACTIVITY_QUERY_TIMEOUT_S
        )
    except errors.ScaiGridError as exc:
        log.info("bunker_activity_unknown", bunker_id=bunker.id, code=exc.code)
        return False, None
    entries = result.get("entries", [])
    records = [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    running = any(e.get("status") == "running" for e in records)
    ends = [t for t in (_parse_time(e.get("ended_at")) for e in records) if t is not None]
    return running, max(ends, default=None)


async def _still_idle(state: ModuleState, bunker: Bunker, now: datetime) -> bool:
    """Whether ``bunker`` (past its idle deadline by the database) has really been idle for
    ``idle_timeout_s``; if an exec kept it busy, ``last_activity_at`` is moved up instead."""
    running, last_end = await _exec_activity(state, bunker)
    if not running and (last_end is None or last_end <= _idle_since(bunker)):
        return True
    active_at = now if running else last_end
    assert bunker.idle_timeout_s is not None and active_at is not None
    async with state.db.sessionmaker() as session:
        await session.execute(
            update(Bunker)
            .where(Bunker.id == bunker.id)
            .where((Bunker.last_activity_at.is_(None)) | (Bunker.last_activity_at < active_at))
            .values(last_activity_at=active_at)
        )
        await session.commit()
    return not running and active_at + timedelta(seconds=bunker.idle_timeout_s) <= now


async def _fail_stuck_boots(state: ModuleState, now: datetime) -> None:
    """Fail bunkers left in ``pending``/``provisioning`` that no process follows any more
    (SPEC §2.4 ``provisioning_timeout``; e.g. the controller restarted mid-boot) and tell
    their worker to destroy them."""
    cutoff = now - timedelta(seconds=PROVISIONING_TIMEOUT_S + PROVISIONING_GRACE_S)
    async with state.db.sessionmaker() as session:
        stuck = (
            await session.execute(
                select(Bunker.id, Bunker.worker_id).where(
                    Bunker.status.in_(("pending", "provisioning")),
                    Bunker.worker_id.is_not(None),
                    Bunker.status_changed_at <= cutoff,
                )
            )
        ).all()
    for bunker_id, worker_id in stuck:
        if bunker_id in state.provisioning:
            continue
        failed = await bunker_service.set_state(
            state,
            bunker_id,
            "failed",
            "provisioning_timeout",
            only_from=("pending", "provisioning"),
            message=f"not running {PROVISIONING_TIMEOUT_S:.0f} s after it was placed",
        )
        if failed:
            log.warning("bunker_provisioning_timeout", bunker_id=bunker_id, worker_id=worker_id)
            await bunker_service.destroy_on_worker(state, worker_id, bunker_id)


async def reap_once(state: ModuleState) -> None:
    """One reaper pass: lifetime expiry, boots nobody follows, then idle handling of running
    bunkers (after asking the agent whether an exec kept them busy)."""
    now = utcnow()
    await _fail_stuck_boots(state, now)
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
        due = [
            b
            for b in idle_candidates
            if b.id not in expired
            and b.idle_timeout_s is not None
            and _idle_since(b) + timedelta(seconds=b.idle_timeout_s) <= now
        ]
    for bunker_id in expired:
        await _stop_and_end(state, bunker_id, "max_lifetime")
    idle = [(b.id, b.lifecycle_mode) for b in due if await _still_idle(state, b, now)]
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
    """One heartbeat-monitor pass: mark silent workers ``stale``, fail out the bunkers of
    lost ones; return the ids of the workers found lost in it."""
    now = utcnow()
    cutoff = now - timedelta(seconds=state.config.worker_lost_after_s)
    async with state.db.sessionmaker() as session:
        stale_cutoff = now - timedelta(seconds=state.config.worker_stale_after_s)
        await session.execute(
            update(Worker)
            .where(
                Worker.connection == "online",
                Worker.last_heartbeat.is_not(None),
                Worker.last_heartbeat < stale_cutoff,
            )
            .values(connection="stale")
        )
        await session.commit()
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
        await apply_worker_loss(state, bunker_id, lost_ids)
    for worker_id in lost_ids:
        log.warning("worker_lost", worker_id=worker_id, bunkers=len(bunker_ids))
    return lost_ids


async def replace_once(state: ModuleState) -> None:
    """One re-placement pass: boot every persistent bunker waiting without a worker on a
    worker that has room (SPEC §10.6; every 15 s)."""
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
    for bunker_id in orphans:
        await _replace_persistent(state, bunker_id)


async def apply_worker_loss(state: ModuleState, bunker_id: str, lost_ids: list[str]) -> None:
    """Apply worker loss to one bunker (SPEC §10.6), re-checked under its lock: nothing if it
    is terminal or no longer placed on one of ``lost_ids``; a ``stopping`` bunker ends
    (``expired``/``terminated``), a persistent one waits ``pending`` for re-placement, any
    other ``failed`` with reason ``worker_lost``."""
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
            _loop("replace", config.replace_interval_s, state, leadership, replace_once),
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

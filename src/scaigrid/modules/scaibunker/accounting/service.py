"""Usage accounting of bunkers (SPEC §1.9).

Every :attr:`ModuleConfig.usage_interval_s` seconds one :class:`UsageRecord` is written per
bunker that is live, or that ended after its last record (the final record covers the
remainder), and a ``scaibunker.usage`` event is emitted through the platform's event outbox
in the same transaction. Figures come from the stored status history, not from the ticker:
the seconds a bunker spent ``running`` (CPU) and ``running`` or ``paused`` (memory, disk,
GPU) inside the period are measured between the exact instants of its state changes, so
consecutive records partition its life and a bunker alive 90 s is billed 90 s whatever the
ticks were. ``egress_bytes`` is measured: the worker reports each bunker's cumulative
uplink byte counter (nftables) in its heartbeat and in the result of ``bunker.destroy``, the
controller sums it on the bunker (:func:`apply_egress_report`), and each record carries what
was sent since the bunker's previous record.

Records are unique per (bunker, period start), so two controller processes writing the same
period store it once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import structlog
from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError

from scaigrid.modules.scaibunker.accounting.models import UsageRecord
from scaigrid.modules.scaibunker.bunkers.models import Bunker, BunkerStatusEvent
from scaigrid.platform.db import Database, utcnow
from scaigrid.platform.events.service import emit

log = structlog.get_logger(__name__)

USAGE_EVENT = "scaibunker.usage"
#: Shortest period written for a live bunker, in seconds.
MIN_PERIOD_S = 1.0


def apply_egress_report(bunker: Bunker, reported: int) -> None:
    """Add a worker's cumulative egress counter (bytes) to ``bunker.egress_bytes``.

    Counters only grow while the bunker stays attached on one worker; a report smaller than
    the previous one means a fresh counter (re-placement on another worker, or the worker
    restarted), whose whole value is new traffic.
    """
    previous = bunker.egress_reported
    bunker.egress_bytes += reported - previous if reported >= previous else reported
    bunker.egress_reported = reported


@dataclass(frozen=True)
class StateSeconds:
    """Seconds spent ``running`` and ``paused`` inside one period."""

    running: float
    paused: float


def seconds_in_states(
    history: Sequence[tuple[datetime, str]], start: datetime, end: datetime
) -> StateSeconds:
    """Measure time in ``running`` and ``paused`` within ``[start, end)``.

    Args:
        history: ``(at, to_status)`` of every state change, oldest first.
        start, end: the period (aware datetimes).
    """
    running = paused = 0.0
    for index, (at, status) in enumerate(history):
        until = history[index + 1][0] if index + 1 < len(history) else end
        lo, hi = max(at, start), min(until, end)
        if hi <= lo:
            continue
        seconds = (hi - lo).total_seconds()
        if status == "running":
            running += seconds
        elif status == "paused":
            paused += seconds
    return StateSeconds(running, paused)


def usage_payload(record: UsageRecord) -> dict[str, Any]:
    """The ``scaibunker.usage`` event payload: the record's SPEC §1.9 fields."""
    return {
        "bunker_id": record.bunker_id,
        "tenant_id": record.tenant_id,
        "user_id": record.user_id,
        "period_start": record.period_start.isoformat(),
        "period_end": record.period_end.isoformat(),
        "cpu_millicore_seconds": record.cpu_millicore_seconds,
        "memory_mb_seconds": record.memory_mb_seconds,
        "disk_mb_seconds": record.disk_mb_seconds,
        "gpu_seconds": record.gpu_seconds,
        "egress_bytes": record.egress_bytes,
        "lifecycle_mode": record.lifecycle_mode,
        "network_profile": record.network_profile,
    }


async def record_usage_once(db: Database, now: datetime | None = None) -> int:
    """Write the due usage records; return how many were written."""
    now = now or utcnow()
    last_end = (
        select(
            UsageRecord.bunker_id,
            func.max(UsageRecord.period_end).label("billed"),
            func.sum(UsageRecord.egress_bytes).label("egress_billed"),
        )
        .group_by(UsageRecord.bunker_id)
        .subquery()
    )
    written = 0
    async with db.sessionmaker() as session:
        rows = (
            await session.execute(
                select(Bunker, last_end.c.billed, last_end.c.egress_billed)
                .outerjoin(last_end, last_end.c.bunker_id == Bunker.id)
                .where(
                    or_(
                        Bunker.ended_at.is_(None),
                        last_end.c.billed.is_(None),
                        Bunker.ended_at > last_end.c.billed,
                    )
                )
            )
        ).all()
        for bunker, billed, egress_billed in rows:
            start = billed or bunker.created_at
            end = min(now, bunker.ended_at) if bunker.ended_at is not None else now
            final = bunker.ended_at is not None and bunker.ended_at <= now
            length = (end - start).total_seconds()
            if length <= 0 or (not final and length < MIN_PERIOD_S):
                continue
            events = (
                await session.execute(
                    select(BunkerStatusEvent.at, BunkerStatusEvent.to_status)
                    .where(BunkerStatusEvent.bunker_id == bunker.id)
                    .order_by(BunkerStatusEvent.at, BunkerStatusEvent.id)
                )
            ).all()
            spent = seconds_in_states([(at, status) for at, status in events], start, end)
            held = spent.running + spent.paused
            record = UsageRecord(
                bunker_id=bunker.id,
                tenant_id=bunker.tenant_id,
                user_id=bunker.owner_user_id,
                period_start=start,
                period_end=end,
                cpu_millicore_seconds=bunker.cpu_millicores * spent.running,
                memory_mb_seconds=bunker.memory_mb * held,
                disk_mb_seconds=bunker.disk_mb * held,
                gpu_seconds=bunker.gpu_count * held,
                egress_bytes=max(0, bunker.egress_bytes - int(egress_billed or 0)),
                lifecycle_mode=bunker.lifecycle_mode,
                network_profile=bunker.network_profile,
            )
            try:
                async with session.begin_nested():
                    session.add(record)
                    emit(
                        session, USAGE_EVENT, bunker.tenant_id, usage_payload(record), "scaibunker"
                    )
            except IntegrityError:
                continue
            written += 1
            log.info(
                "usage_recorded",
                bunker_id=bunker.id,
                period_start=start.isoformat(),
                period_end=end.isoformat(),
                cpu_millicore_seconds=record.cpu_millicore_seconds,
            )
        await session.commit()
    return written


@dataclass
class UsageRow:
    """One aggregate row of ``GET /v1/accounting/usage``."""

    tenant_id: str
    user_id: str
    bunker_id: str
    day: date
    cpu_millicore_seconds: float = 0.0
    memory_mb_seconds: float = 0.0
    disk_mb_seconds: float = 0.0
    gpu_seconds: float = 0.0
    egress_bytes: int = 0
    records: int = 0


def aggregate(records: Sequence[UsageRecord]) -> list[UsageRow]:
    """Sum records by (tenant, user, bunker, UTC day of ``period_start``); newest day first."""
    rows: dict[tuple[str, str, str, date], UsageRow] = {}
    for record in records:
        key = (record.tenant_id, record.user_id, record.bunker_id, record.period_start.date())
        row = rows.setdefault(key, UsageRow(*key))
        row.cpu_millicore_seconds += record.cpu_millicore_seconds
        row.memory_mb_seconds += record.memory_mb_seconds
        row.disk_mb_seconds += record.disk_mb_seconds
        row.gpu_seconds += record.gpu_seconds
        row.egress_bytes += record.egress_bytes
        row.records += 1
    return sorted(rows.values(), key=lambda r: (r.day, r.bunker_id), reverse=True)

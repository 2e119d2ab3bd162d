"""Appending to, reading and verifying the hash-chained audit log (SPEC §1.7).

The chain: record ``n`` stores ``prev_hash`` = ``record_hash`` of record ``n - 1`` and its own
``record_hash`` = SHA-256 of :func:`canonical` (which covers ``prev_hash``). Appends are
serialised in-process by :class:`AuditLog`'s lock; across controller processes the primary
key on ``seq`` makes a second writer of the same ``seq`` fail, and it retries on the new head,
so the chain never forks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import Select, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid.platform.audit.models import GENESIS_HASH, AuditRecord
from scaigrid.platform.auth.principal import Principal
from scaigrid.platform.db import Database
from scaigrid.platform.permissions import Role

log = structlog.get_logger(__name__)

#: Entries the background writer appends in one transaction at most.
APPEND_BATCH = 200
#: Seconds the background writer waits after a lone entry for more to share its transaction
#: (one commit per request costs as much as the request itself under a steady stream of
#: calls); a :meth:`AuditLog.flush` cuts the wait short.
APPEND_LINGER_S = 0.1
#: Appends retried at most this often when another process took the same ``seq``.
APPEND_ATTEMPTS = 20
#: Records read per batch by :func:`verify_chain` and the exports.
BATCH = 1000

#: Fields of a record in its canonical form and in API output, in order.
FIELDS: tuple[str, ...] = (
    "seq",
    "at",
    "request_id",
    "actor_id",
    "actor_type",
    "tenant_id",
    "partner_id",
    "action",
    "resource_type",
    "resource_id",
    "ip_address",
    "user_agent",
    "outcome",
    "status_code",
    "prev_hash",
)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """What the middleware knows about one request, before it joins the chain."""

    request_id: str
    actor_id: str | None
    actor_type: str
    tenant_id: str | None
    partner_id: str | None
    action: str
    resource_type: str | None
    resource_id: str | None
    ip_address: str | None
    user_agent: str | None
    outcome: str
    status_code: int
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


def _at(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def as_dict(record: AuditRecord) -> dict[str, Any]:
    """The record's :data:`FIELDS` plus ``record_hash``, ``at`` as RFC 3339 with µs."""
    values: dict[str, Any] = {name: getattr(record, name) for name in FIELDS}
    values["at"] = _at(record.at)
    values["record_hash"] = record.record_hash
    return values


def canonical(record: AuditRecord) -> bytes:
    """The bytes hashed into ``record_hash``: compact, key-sorted JSON of :data:`FIELDS`."""
    values = as_dict(record)
    del values["record_hash"]
    return json.dumps(values, sort_keys=True, separators=(",", ":")).encode()


def record_hash(record: AuditRecord) -> str:
    """Lowercase hex SHA-256 of :func:`canonical`."""
    return hashlib.sha256(canonical(record)).hexdigest()


class AuditLog:
    """Appends entries to the chain of one database (``app.state.audit``).

    Requests hand their entry to :meth:`submit`, which queues it for one background writer
    (started by :meth:`start`), so the chain append (a head read and an insert) is not paid
    on the request path. The writer appends queued entries in batches, in order, one chain.
    Readers that must see every earlier request's record call :meth:`flush` first.

    Args:
        db: the controller's database.
        queue_size: entries waiting at most; a full queue makes :meth:`submit` wait.
    """

    def __init__(self, db: Database, queue_size: int = 10_000) -> None:
        self.db = db
        self._lock = asyncio.Lock()
        self._queue: asyncio.Queue[AuditEntry] = asyncio.Queue(queue_size)
        self._flush_requested = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        #: ``(seq, record_hash)`` of the chain head as this process last wrote it; the next
        #: append builds on it without reading the head back (another controller appending
        #: meanwhile makes the insert collide on ``seq``, and the head is read again).
        self._head: tuple[int, str] | None = None

    def start(self) -> None:
        """Start the background writer (idempotent)."""
        if self._writer is None:
            self._writer = asyncio.create_task(self._run(), name="audit-writer")

    async def close(self) -> None:
        """Write every queued entry, then stop the writer."""
        await self.flush()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None

    async def submit(self, entry: AuditEntry) -> None:
        """Queue ``entry`` for the chain (appended at once when no writer runs)."""
        if self._writer is None:
            await self.append(entry)
            return
        await self._queue.put(entry)

    async def flush(self) -> None:
        """Wait until every entry submitted so far is in the database."""
        if self._writer is not None:
            self._flush_requested.set()
            await self._queue.join()

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            if self._queue.empty() and not self._flush_requested.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._flush_requested.wait(), APPEND_LINGER_S)
            self._flush_requested.clear()
            while len(batch) < APPEND_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self.append_many(batch)
            except SQLAlchemyError:
                log.exception("audit.append_failed", entries=len(batch))
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def append(self, entry: AuditEntry) -> AuditRecord:
        """Add ``entry`` as the chain's next record and return it (committed).

        Raises:
            IntegrityError: the head kept moving for :data:`APPEND_ATTEMPTS` attempts.
            SQLAlchemyError: the database failed.
        """
        return (await self.append_many([entry]))[0]

    async def append_many(self, entries: list[AuditEntry]) -> list[AuditRecord]:
        """Add ``entries``, in order, as the chain's next records in one transaction.

        Raises:
            IntegrityError: the head kept moving for :data:`APPEND_ATTEMPTS` attempts.
            SQLAlchemyError: the database failed.
        """
        async with self._lock:
            for attempt in range(APPEND_ATTEMPTS):
                async with self.db.sessionmaker() as session:
                    if self._head is None or attempt > 0:
                        head = await session.scalar(
                            select(AuditRecord).order_by(AuditRecord.seq.desc()).limit(1)
                        )
                        self._head = (
                            (0, GENESIS_HASH)
                            if head is None
                            else (
                                head.seq,
                                head.record_hash,
                            )
                        )
                    seq, prev = self._head
                    records = []
                    for entry in entries:
                        seq += 1
                        record = _record_for(entry, seq, prev)
                        prev = record.record_hash
                        records.append(record)
                    session.add_all(records)
                    try:
                        await session.commit()
                    except IntegrityError:
                        # Another controller process appended this seq first: retry on its head.
                        self._head = None
                        await session.rollback()
                        log.info("audit.append_retry", seq=records[0].seq, attempt=attempt)
                        await asyncio.sleep(0.005 * (attempt + 1))
                        continue
                    except BaseException:
                        self._head = None
                        raise
                    self._head = (records[-1].seq, records[-1].record_hash)
                    return records
        raise IntegrityError("audit append", None, Exception("the chain head kept moving"))


def _record_for(entry: AuditEntry, seq: int, prev_hash: str) -> AuditRecord:
    record = AuditRecord(
        seq=seq,
        prev_hash=prev_hash,
        at=entry.at,
        request_id=entry.request_id,
        actor_id=entry.actor_id,
        actor_type=entry.actor_type,
        tenant_id=entry.tenant_id,
        partner_id=entry.partner_id,
        action=entry.action[:300],
        resource_type=entry.resource_type,
        resource_id=None if entry.resource_id is None else entry.resource_id[:300],
        ip_address=entry.ip_address,
        user_agent=None if entry.user_agent is None else entry.user_agent[:500],
        outcome=entry.outcome,
        status_code=entry.status_code,
    )
    record.record_hash = record_hash(record)
    return record


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Query filters of ``GET /v1/audit-log``; None means "any"."""

    actor_id: str | None = None
    action: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    outcome: str | None = None
    tenant_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def visible_query(principal: Principal, flt: AuditFilter) -> Select[AuditRecord]:
    """Records ``principal`` may read (SPEC §1.3 reach) matching ``flt``, newest first.

    Reach: ``super_admin`` every record; partner roles their partner's; everyone else their
    own tenant's.
    """
    query = select(AuditRecord).order_by(AuditRecord.seq.desc())
    if principal.role in (Role.PARTNER_ADMIN, Role.PARTNER_VIEWER):
        query = query.where(AuditRecord.partner_id == principal.partner_id)
    elif not principal.is_super_admin:
        query = query.where(AuditRecord.tenant_id == principal.tenant_id)
    for name in ("actor_id", "action", "resource_type", "resource_id", "outcome", "tenant_id"):
        value = getattr(flt, name)
        if value is not None:
            query = query.where(getattr(AuditRecord, name) == value)
    if flt.since is not None:
        query = query.where(AuditRecord.at >= flt.since)
    if flt.until is not None:
        query = query.where(AuditRecord.at < flt.until)
    return query


async def list_page(
    session: AsyncSession,
    principal: Principal,
    flt: AuditFilter,
    limit: int,
    before_seq: int | None,
) -> tuple[list[AuditRecord], int | None]:
    """One page of :func:`visible_query`: up to ``limit`` records with ``seq < before_seq``;
    returns the records and the ``seq`` to continue before (None on the last page)."""
    query = visible_query(principal, flt)
    if before_seq is not None:
        query = query.where(AuditRecord.seq < before_seq)
    rows = list((await session.scalars(query.limit(limit + 1))).all())
    if len(rows) > limit:
        return rows[:limit], rows[limit - 1].seq
    return rows, None


async def iter_visible(
    db: Database, principal: Principal, flt: AuditFilter
) -> AsyncIterator[AuditRecord]:
    """Every record of :func:`visible_query`, newest first, read in batches."""
    before: int | None = None
    while True:
        async with db.sessionmaker() as session:
            rows, before = await list_page(session, principal, flt, BATCH, before)
        for row in rows:
            yield row
        if before is None:
            return


@dataclass(frozen=True, slots=True)
class ChainReport:
    """Result of :func:`verify_chain`.

    Attributes:
        checked: records examined.
        broken_seq: ``seq`` of the first record whose link or hash is wrong; None if intact.
        reason: why that record is broken.
    """

    checked: int
    broken_seq: int | None = None
    reason: str | None = None


async def verify_chain(db: Database) -> ChainReport:
    """Walk the chain from ``seq`` 1 and report the first broken link.

    A record is broken when its ``seq`` is not the previous one plus one (a deleted
    record), its ``prev_hash`` differs from the previous ``record_hash``, or its stored
    ``record_hash`` differs from the hash of its contents (an edited record).
    """
    expected_prev, expected_seq, checked = GENESIS_HASH, 1, 0
    while True:
        async with db.sessionmaker() as session:
            rows = (
                await session.scalars(
                    select(AuditRecord)
                    .where(AuditRecord.seq >= expected_seq)
                    .order_by(AuditRecord.seq)
                    .limit(BATCH)
                )
            ).all()
        if not rows:
            return ChainReport(checked)
        for row in rows:
            checked += 1
            if row.seq != expected_seq:
                return ChainReport(checked, row.seq, f"expected seq {expected_seq}")
            if row.prev_hash != expected_prev:
                return ChainReport(checked, row.seq, "prev_hash does not match the previous record")
            if record_hash(row) != row.record_hash:
                return ChainReport(checked, row.seq, "record_hash does not match its contents")
            expected_prev, expected_seq = row.record_hash, row.seq + 1

"""Egress audit records (SPEC §8.7): buffering per bunker and batch upload through a sink.

Records are buffered per bunker and flushed every :data:`FLUSH_EVERY_S` seconds or every
:data:`FLUSH_RECORDS` records, whichever comes first, as one NDJSON object at
``scaibunker/audit/{bunker_id}/{ts_us}-{worker_pid}.ndjson``. The object store is reached
through an :class:`AuditSink`: :class:`ProxySink` uploads each batch through the storage proxy
with a ``PUT`` capability on ``scaibunker/audit/{bunker_id}/`` that the worker asks the
controller for (``capability_request`` purpose ``audit``) and renews before it expires;
:class:`LocalDirSink` writes the same key layout under a directory (tests, and operators who
point ``SCAIBUNKER_AUDIT_DIR`` at a directory of their own).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

import structlog

from scaigrid.worker.capabilities import CapabilityBroker
from scaigrid.worker.link.tasks import TaskFailed
from scaigrid.worker.objects import ObjectClient

log = structlog.get_logger(__name__)

AUDIT_KEY: Final = re.compile(
    r"scaibunker/audit/[A-Za-z0-9_]{1,64}/[0-9]{1,20}-[0-9]{1,10}\.ndjson"
)
FLUSH_EVERY_S: Final = 10.0
FLUSH_RECORDS: Final = 1000
#: Records kept per bunker while the sink fails; older ones are dropped (and counted).
MAX_BUFFERED: Final = 100_000


class AuditSink(Protocol):
    """Where flushed batches go."""

    async def put(self, key: str, body: bytes) -> None:
        """Store ``body`` at object ``key``.

        Raises:
            OSError: the object could not be stored (the batch is kept and retried).
        """


class LocalDirSink:
    """Objects as files under ``root`` (key ``a/b`` → ``root/a/b``), written atomically with
    mode 0600.

    Args:
        root: directory (created 0700 if missing).
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    async def put(self, key: str, body: bytes) -> None:
        """Write ``root/key`` atomically.

        Raises:
            OSError: ``key`` is not an audit key, or the write failed.
        """
        await asyncio.to_thread(self._write, key, body)

    def _write(self, key: str, body: bytes) -> None:
        if not AUDIT_KEY.fullmatch(key):
            raise OSError(f"bad audit key {key!r}")
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.parent / f".{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(body)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


class ProxySink:
    """Batches uploaded through the storage proxy (SPEC §8.7, §11).

    Args:
        broker: the worker's capability cache; grants come from the controller over the
            link and name the proxy's base URL.
    """

    def __init__(self, broker: CapabilityBroker) -> None:
        self.broker = broker

    async def put(self, key: str, body: bytes) -> None:
        """Upload ``body`` at the audit key ``key``.

        Raises:
            OSError: not an audit key, no capability, or the upload failed (the batch is kept
                and retried at the next flush).
        """
        if not AUDIT_KEY.fullmatch(key):
            raise OSError(f"bad audit key {key!r}")
        bunker_id = key.split("/")[2]
        try:
            grant = await self.broker.get("audit", bunker_id)
            await ObjectClient(grant.storage_url).put_bytes(
                key, body, grant.token, refresh=self.broker.refresher("audit", bunker_id)
            )
        except TaskFailed as exc:
            raise OSError(f"{exc.code}: {exc.message}") from exc


def now_iso() -> str:
    """The current time as RFC 3339 UTC with microseconds."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def flow_record(
    *,
    bunker_id: str,
    tenant_id: str | None,
    proto: str,
    src_ip: str | None,
    src_port: int | None,
    dst_ip: str | None,
    dst_port: int | None,
    verdict: str,
    dns_name: str | None = None,
    packets_out: int = 0,
    bytes_out: int = 0,
    packets_in: int = 0,
    bytes_in: int = 0,
    started_at: str | None = None,
    ended_at: str | None = None,
    still_open: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """One record with every SPEC §8.7 field (``extra`` adds fields such as ``dns_answers``).

    ``started_at``/``ended_at`` default to now; ``still_open`` writes ``ended_at: null`` (a
    flow that has not ended yet).
    """
    ts = now_iso()
    return {
        "ts": ts,
        "bunker_id": bunker_id,
        "tenant_id": tenant_id,
        "proto": proto,
        "src_ip": src_ip,
        "src_port": src_port,
        "dst_ip": dst_ip,
        "dst_port": dst_port,
        "dns_name": dns_name,
        "bytes_out": bytes_out,
        "bytes_in": bytes_in,
        "packets_out": packets_out,
        "packets_in": packets_in,
        "started_at": started_at or ts,
        "ended_at": None if still_open else (ended_at or ts),
        "verdict": verdict,
        **extra,
    }


class EgressAudit:
    """Buffers records per bunker and flushes them to ``sink``.

    Args:
        sink: where batches go.
        pid: the worker daemon's process id (part of each object key).
    """

    def __init__(self, sink: AuditSink, *, pid: int | None = None) -> None:
        self.sink = sink
        self.pid = pid if pid is not None else os.getpid()
        self._before_flush: Callable[[], Awaitable[None]] | None = None
        self._buffers: dict[str, list[dict[str, Any]]] = {}
        self._dropped: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._flushes: set[asyncio.Task[None]] = set()

    def start(self, before_flush: Callable[[], Awaitable[None]] | None = None) -> None:
        """Start the periodic flush; ``before_flush`` runs before each one (it collects
        polled records, such as denied flows from nftables)."""
        self._before_flush = before_flush
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="egress-audit-flush")

    def add(self, record: dict[str, Any]) -> None:
        """Buffer ``record`` (its ``bunker_id`` picks the buffer); a full batch flushes."""
        bunker_id = str(record["bunker_id"])
        buffer = self._buffers.setdefault(bunker_id, [])
        if len(buffer) >= MAX_BUFFERED:
            buffer.pop(0)
            self._dropped[bunker_id] = self._dropped.get(bunker_id, 0) + 1
        buffer.append(record)
        if len(buffer) >= FLUSH_RECORDS:
            task = asyncio.ensure_future(self.flush(bunker_id))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def flush(self, bunker_id: str) -> None:
        """Upload ``bunker_id``'s buffered records as one object; on failure keep them."""
        async with self._lock:
            records = self._buffers.pop(bunker_id, [])
            if not records:
                return
            key = f"scaibunker/audit/{bunker_id}/{time.time_ns() // 1000}-{self.pid}.ndjson"
            body = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)
            try:
                await self.sink.put(key, body)
            except OSError as exc:
                log.warning("egress_audit_flush_failed", bunker_id=bunker_id, error=str(exc))
                self._buffers[bunker_id] = records + self._buffers.get(bunker_id, [])
                return
        dropped = self._dropped.pop(bunker_id, 0)
        log.debug("egress_audit_flushed", bunker_id=bunker_id, records=len(records), key=key)
        if dropped:
            log.warning("egress_audit_records_dropped", bunker_id=bunker_id, count=dropped)

    async def flush_all(self) -> None:
        """Collect polled records and flush every bunker's buffer."""
        if self._before_flush is not None:
            try:
                await self._before_flush()
            except Exception as exc:
                log.warning("egress_audit_collect_failed", error=str(exc))
        for bunker_id in list(self._buffers):
            await self.flush(bunker_id)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            await self.flush_all()

    async def close(self) -> None:
        """Stop the periodic flush and flush what is left."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush_all()

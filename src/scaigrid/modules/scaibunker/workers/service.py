"""Worker registration, credentials, heartbeats and reconciliation (SPEC §10.1-10.5)."""

from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.ids import new_id, new_secret
from scaigrid.modules.scaibunker.accounting import service as accounting
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.bunkers.schemas import as_utc, iso
from scaigrid.modules.scaibunker.bunkers.states import TERMINAL
from scaigrid.modules.scaibunker.workers.models import Worker, WorkerJoinToken
from scaigrid.platform.db import utcnow

log = structlog.get_logger(__name__)

JOIN_TOKEN_PREFIX = "sbj"  # noqa: S105 - a public prefix, not a secret
CREDENTIAL_PREFIX = "sbw"
HEARTBEAT_INTERVAL_S = 5


def hash_secret(secret: str) -> str:
    """SHA-256 hex digest of a bearer secret (only hashes are stored)."""
    return hashlib.sha256(secret.encode()).hexdigest()


class DriverOffer(BaseModel):
    """One driver a worker offers."""

    model_config = ConfigDict(extra="ignore")
    name: str = Field(max_length=32)
    isolation: str = Field(pattern="^(microvm|container)$")
    accel: str | None = Field(default=None, max_length=16)


class Capacity(BaseModel):
    """Capacity a worker offers to bunkers (millicores, MiB, MiB)."""

    model_config = ConfigDict(extra="ignore")
    cpu_millicores: int = Field(ge=0)
    memory_mb: int = Field(ge=0)
    disk_mb: int = Field(ge=0)
    gpu_count: int = Field(default=0, ge=0)
    gpu_type: str | None = None


class BunkerReport(BaseModel):
    """A bunker a worker says it holds."""

    model_config = ConfigDict(extra="ignore")
    bunker_id: str = Field(max_length=32)
    state: str = Field(max_length=16)
    #: Cumulative bytes the bunker sent out of the worker's uplink (absent: no network).
    egress_bytes: int | None = Field(default=None, ge=0, le=2**62)


class RegisterMessage(BaseModel):
    """The worker's first message (SPEC §10.4 ``register``); untrusted input."""

    model_config = ConfigDict(extra="ignore")
    type: str
    hostname: str = Field(min_length=1, max_length=255)
    drivers: list[DriverOffer] = Field(max_length=8)
    capacity: Capacity
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    daemon_version: str = Field(default="", max_length=32)
    bunkers: list[BunkerReport] = Field(default_factory=list, max_length=10000)
    image_cache: list[dict[str, Any]] = Field(default_factory=list, max_length=10000)


class HeartbeatMessage(BaseModel):
    """A periodic ``heartbeat``; untrusted input."""

    model_config = ConfigDict(extra="ignore")
    type: str
    free: dict[str, int | None] = Field(default_factory=dict)
    bunkers: list[BunkerReport] = Field(default_factory=list, max_length=10000)
    image_cache: list[dict[str, Any]] = Field(default_factory=list, max_length=10000)


async def mint_join_token(
    session: AsyncSession,
    *,
    tenant_id: str | None,
    labels: dict[str, str],
    expires_in_s: int,
    created_by: str | None,
) -> tuple[WorkerJoinToken, str]:
    """Create a one-use join token; return the record and the secret (shown once)."""
    token = new_secret(JOIN_TOKEN_PREFIX)
    record = WorkerJoinToken(
        id=new_id("wjt"),
        token_hash=hash_secret(token),
        tenant_id=tenant_id,
        labels=labels,
        created_by=created_by,
        created_at=utcnow(),
        expires_at=utcnow() + timedelta(seconds=expires_in_s),
    )
    session.add(record)
    await session.commit()
    return record, token


async def authenticate(session: AsyncSession, secret: str) -> WorkerJoinToken | Worker:
    """Resolve a connect credential: an unused, unexpired join token or a live worker credential.

    Raises:
        errors.AuthTokenInvalid: anything else (user keys included).
    """
    digest = hash_secret(secret)
    if secret.startswith(JOIN_TOKEN_PREFIX + "_"):
        record = (
            await session.scalars(
                select(WorkerJoinToken).where(WorkerJoinToken.token_hash == digest)
            )
        ).first()
        if (
            record is not None
            and hmac.compare_digest(record.token_hash, digest)
            and record.used_at is None
            and as_utc(record.expires_at) > utcnow()
        ):
            return record
    elif secret.startswith(CREDENTIAL_PREFIX + "_"):
        worker = (
            await session.scalars(select(Worker).where(Worker.credential_hash == digest))
        ).first()
        if worker is not None and worker.deleted_at is None:
            return worker
    raise errors.AuthTokenInvalid("invalid worker credential")


async def register(
    session: AsyncSession, auth: WorkerJoinToken | Worker, message: RegisterMessage
) -> tuple[Worker, str | None]:
    """Create or refresh the worker row; return it and a new credential on first join."""
    now = utcnow()
    credential = None
    if isinstance(auth, WorkerJoinToken):
        credential = new_secret(CREDENTIAL_PREFIX, 48)
        worker = Worker(
            id=new_id("wrk"),
            tenant_id=auth.tenant_id,
            credential_hash=hash_secret(credential),
            registered_at=now,
            labels=dict(auth.labels),
        )
        auth.used_at = now
        auth.worker_id = worker.id
        session.add(worker)
    else:
        worker = auth
    worker.hostname = message.hostname
    worker.drivers = [d.model_dump() for d in message.drivers]
    worker.capacity = message.capacity.model_dump()
    worker.free = message.capacity.model_dump(exclude={"gpu_type"})
    worker.labels = {**worker.labels, **message.labels}
    worker.daemon_version = message.daemon_version
    worker.image_cache = message.image_cache
    worker.connection = "online"
    worker.last_heartbeat = now
    await session.commit()
    return worker, credential


async def record_heartbeat(
    session: AsyncSession, worker_id: str, message: HeartbeatMessage
) -> None:
    """Store ``last_heartbeat``, ``free`` and the image cache of a worker, and the egress
    counters of the bunkers it holds (see
    :func:`~scaigrid.modules.scaibunker.accounting.service.apply_egress_report`)."""
    worker = await session.get(Worker, worker_id)
    if worker is None:
        return
    worker.last_heartbeat = utcnow()
    worker.free = {k: v for k, v in message.free.items() if v is not None}
    worker.image_cache = message.image_cache
    worker.connection = "online"
    counters = {r.bunker_id: r.egress_bytes for r in message.bunkers if r.egress_bytes is not None}
    if counters:
        bunkers = await session.scalars(
            select(Bunker)
            .where(Bunker.id.in_(list(counters)), Bunker.worker_id == worker_id)
            .with_for_update()
        )
        for bunker in bunkers:
            accounting.apply_egress_report(bunker, counters[bunker.id])
    await session.commit()


async def mark_offline(session: AsyncSession, worker_id: str) -> None:
    """Record that a worker's channel closed."""
    worker = await session.get(Worker, worker_id)
    if worker is not None:
        worker.connection = "offline"
        await session.commit()


async def stale_bunkers(
    session: AsyncSession, worker_id: str, reported: list[BunkerReport]
) -> list[str]:
    """Ids a worker reports that must be destroyed: unknown, terminal, or placed elsewhere."""
    ids = [r.bunker_id for r in reported]
    if not ids:
        return []
    rows = {
        b.id: b for b in (await session.scalars(select(Bunker).where(Bunker.id.in_(ids)))).all()
    }
    stale = []
    for bunker_id in ids:
        bunker = rows.get(bunker_id)
        if bunker is None or bunker.status in TERMINAL or bunker.worker_id != worker_id:
            stale.append(bunker_id)
    return stale


async def missing_bunkers(
    session: AsyncSession, worker_id: str, reported: list[BunkerReport]
) -> list[str]:
    """Ids the database places on the worker as running/paused that the worker no longer has."""
    held = {r.bunker_id for r in reported}
    rows = (
        await session.scalars(
            select(Bunker.id).where(
                Bunker.worker_id == worker_id, Bunker.status.in_(("running", "paused"))
            )
        )
    ).all()
    return [bunker_id for bunker_id in rows if bunker_id not in held]


def worker_to_dict(
    worker: Worker, allocated: dict[str, int], *, detail: bool = False
) -> dict[str, Any]:
    """Render a worker as its API object (SPEC §10.1)."""
    data: dict[str, Any] = {
        "id": worker.id,
        "hostname": worker.hostname,
        "tenant_id": worker.tenant_id,
        "labels": worker.labels,
        "drivers": worker.drivers,
        "capacity": worker.capacity,
        "allocated": {k: v for k, v in allocated.items() if k != "bunkers"},
        "free": worker.free,
        "connection": worker.connection,
        "admin_state": worker.admin_state,
        "last_heartbeat": iso(worker.last_heartbeat),
        "daemon_version": worker.daemon_version,
        "running_bunkers": allocated.get("bunkers", 0),
        "registered_at": iso(worker.registered_at),
    }
    if detail:
        data["image_cache"] = worker.image_cache
    return data

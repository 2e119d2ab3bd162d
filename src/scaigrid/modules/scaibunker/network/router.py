"""``GET /bunkers/{id}/audit/egress`` (SPEC §8.7): the bunker's egress audit records.

Batches are the objects ``scaibunker/audit/{bunker_id}/{ts_us}-{worker_pid}.ndjson`` in the
module's object store. A batch flushed at ``ts_us`` holds records written before it, so every
batch flushed at or after ``since`` is read and its records are filtered by ``ts``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.modules.scaibunker.bunkers import service
from scaigrid.modules.scaibunker.bunkers.schemas import as_utc
from scaigrid.modules.scaibunker.storage.store import ObjectStore
from scaigrid.platform.auth import Principal, require
from scaigrid.platform.db import get_session

log = structlog.get_logger(__name__)

router = APIRouter(tags=["network"])
SessionDep = Annotated[AsyncSession, Depends(get_session)]
CreatorDep = Annotated[Principal, Depends(require("scaibunker:create"))]
#: Longest line accepted from a batch object; longer ones are skipped as corrupt.
MAX_RECORD_BYTES = 64 * 1024


def _flush_us(key: str) -> int | None:
    name = key.rsplit("/", 1)[-1]
    stamp, _, rest = name.partition("-")
    return int(stamp) if stamp.isdigit() and rest.endswith(".ndjson") else None


def _record_time(record: dict[str, Any]) -> datetime | None:
    value = record.get("ts")
    if not isinstance(value, str):
        return None
    try:
        return as_utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError:
        return None


async def _records(
    store: ObjectStore, bunker_id: str, since: datetime, until: datetime
) -> AsyncIterator[bytes]:
    since_us = int(since.timestamp() * 1_000_000)
    keys = await store.list_keys(f"scaibunker/audit/{bunker_id}/")
    batches = sorted(
        (stamp, key) for key in keys if (stamp := _flush_us(key)) is not None and stamp >= since_us
    )
    rows: list[tuple[datetime, bytes]] = []
    for _, key in batches:
        read = await store.get(key)
        data = b"".join([chunk async for chunk in read.chunks])
        for line in data.splitlines():
            if not line or len(line) > MAX_RECORD_BYTES:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                log.warning("egress_audit_bad_line", key=key)
                continue
            when = _record_time(record) if isinstance(record, dict) else None
            if when is not None and since <= when <= until:
                rows.append((when, line + b"\n"))
    rows.sort(key=lambda row: row[0])
    for _, line in rows:
        yield line


@router.get("/bunkers/{bunker_id}/audit/egress")
async def egress_audit(
    bunker_id: str,
    request: Request,
    principal: CreatorDep,
    session: SessionDep,
    since: Annotated[datetime | None, Query()] = None,
    until: Annotated[datetime | None, Query()] = None,
) -> StreamingResponse:
    """Stream the bunker's audit records between ``since`` (default ``created_at``) and
    ``until`` (default now), oldest first, as ``application/x-ndjson``.

    Raises:
        errors.BunkerNotFound: unknown or not visible to the caller.
        errors.ValidationFailed: ``since`` after ``until``.
    """
    bunker = await service.get_visible(session, principal, bunker_id)
    start = as_utc(since) if since is not None else as_utc(bunker.created_at)
    end = as_utc(until) if until is not None else datetime.now(UTC)
    if start > end:
        raise errors.ValidationFailed(
            "since is after until", details=[{"field": "query.since", "message": "after until"}]
        )
    store: ObjectStore = request.app.state.scaibunker_storage.store
    return StreamingResponse(
        _records(store, bunker.id, start, end), media_type="application/x-ndjson"
    )

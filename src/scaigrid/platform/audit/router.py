"""``GET /v1/audit-log`` and ``GET /v1/audit-log/export`` (SPEC §1.7).

Both need ``admin:access``; the records shown are limited to the caller's reach (see
:func:`scaigrid.platform.audit.service.visible_query`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.platform.audit import service
from scaigrid.platform.auth import Principal, require
from scaigrid.platform.db import get_database, get_session
from scaigrid.platform.envelope import ok_list
from scaigrid.platform.permissions import ADMIN_ACCESS

router = APIRouter(prefix="/v1/audit-log", tags=["audit"])

Auditor = Annotated[Principal, Depends(require(ADMIN_ACCESS))]
Session = Annotated[AsyncSession, Depends(get_session)]
Outcome = Literal["SUCCESS", "FAILURE"]


async def _filter(
    actor_id: str | None = None,
    action: str | None = None,
    resource_type: str | None = None,
    resource_id: str | None = None,
    outcome: Outcome | None = None,
    tenant_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> service.AuditFilter:
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise errors.ValidationFailed(
                "Timestamps need a zone",
                details=[{"field": f"query.{name}", "message": "give an offset or Z"}],
            )
    return service.AuditFilter(
        actor_id, action, resource_type, resource_id, outcome, tenant_id, since, until
    )


Filter = Annotated[service.AuditFilter, Depends(_filter)]


def _cursor(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    if not cursor.isdigit() or len(cursor) > 19:
        raise errors.ValidationFailed(
            "Invalid cursor", details=[{"field": "query.cursor", "message": "not a cursor"}]
        )
    return int(cursor)


@router.get("")
async def list_audit_log(
    request: Request,
    principal: Auditor,
    session: Session,
    flt: Filter,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
) -> JSONResponse:
    """Audit records within reach, newest first; filters ``actor_id``, ``action``,
    ``resource_type``, ``resource_id``, ``outcome``, ``tenant_id``, ``since``, ``until``
    (RFC 3339); ``limit`` 1 to 1000 (default 100) and ``cursor`` as in SPEC §1.4.

    Raises:
        ValidationFailed: bad filter, limit or cursor (422).
    """
    await _flush(request)
    rows, before = await service.list_page(session, principal, flt, limit, _cursor(cursor))
    return ok_list([service.as_dict(r) for r in rows], None if before is None else str(before))


async def _flush(request: Request) -> None:
    """Make every record of an earlier request readable (the chain is written behind)."""
    audit: service.AuditLog | None = getattr(request.app.state, "audit", None)
    if audit is not None:
        await audit.flush()


_MEDIA = {"csv": "text/csv", "json": "application/json", "ndjson": "application/x-ndjson"}
_COLUMNS = (*service.FIELDS, "record_hash")


def _csv_line(values: list[object]) -> str:
    out = io.StringIO()
    csv.writer(out).writerow(["" if v is None else v for v in values])
    return out.getvalue()


@router.get("/export")
async def export_audit_log(
    request: Request,
    principal: Auditor,
    flt: Filter,
    format: Literal["csv", "json", "ndjson"] = "ndjson",
) -> StreamingResponse:
    """Every matching record within reach, newest first, streamed as ``csv`` (header row
    then one row per record), ``json`` (one array) or ``ndjson`` (one object per line)."""
    db = get_database(request)
    await _flush(request)

    async def body() -> AsyncIterator[str]:
        first = True
        if format == "csv":
            yield _csv_line(list(_COLUMNS))
        elif format == "json":
            yield "["
        async for row in service.iter_visible(db, principal, flt):
            values = service.as_dict(row)
            if format == "csv":
                yield _csv_line([values[c] for c in _COLUMNS])
            elif format == "json":
                yield ("" if first else ",") + json.dumps(values)
            else:
                yield json.dumps(values) + "\n"
            first = False
        if format == "json":
            yield "]"

    return StreamingResponse(
        body(),
        media_type=_MEDIA[format],
        headers={"Content-Disposition": f'attachment; filename="audit-log.{format}"'},
    )

"""``GET /v1/accounting/usage``: bunker usage by tenant, user, bunker and day (SPEC §1.9)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.modules.scaibunker.accounting.models import UsageRecord
from scaigrid.modules.scaibunker.accounting.service import aggregate
from scaigrid.platform.auth import Principal, require
from scaigrid.platform.db import get_session
from scaigrid.platform.envelope import encode

router = APIRouter(prefix="/v1/accounting", tags=["accounting"])

SessionDep = Annotated[AsyncSession, Depends(get_session)]
CreatorDep = Annotated[Principal, Depends(require("scaibunker:create"))]


@router.get("/usage")
async def usage(
    principal: CreatorDep,
    session: SessionDep,
    since: datetime | None = None,
    until: datetime | None = None,
    tenant_id: Annotated[str | None, Query(max_length=32)] = None,
    user_id: Annotated[str | None, Query(max_length=32)] = None,
    bunker_id: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[int | None, Query(ge=0)] = None,
) -> JSONResponse:
    """Aggregated usage rows, newest day first; paging under ``pagination``.

    Callers see their own usage; ``scaibunker:admin:tenant`` widens to the tenant, and
    ``scaibunker:admin`` held by a super admin to every tenant. ``since``/``until`` bound
    ``period_start`` (ISO 8601). The cursor is an opaque offset into the aggregated rows.
    """
    since, until = (t.replace(tzinfo=UTC) if t and t.tzinfo is None else t for t in (since, until))
    everywhere = principal.is_super_admin and principal.has("scaibunker:admin")
    tenant_wide = principal.has("scaibunker:admin:tenant") or principal.has("scaibunker:admin")
    query = select(UsageRecord)
    if not everywhere:
        if tenant_id is not None and tenant_id != principal.tenant_id:
            raise errors.AuthzPermissionDenied(
                "other tenants need scaibunker:admin", details={"permission": "scaibunker:admin"}
            )
        query = query.where(UsageRecord.tenant_id == principal.tenant_id)
        if not tenant_wide:
            if user_id is not None and user_id != principal.user_id:
                raise errors.AuthzPermissionDenied(
                    "other users need scaibunker:admin:tenant",
                    details={"permission": "scaibunker:admin:tenant"},
                )
            query = query.where(UsageRecord.user_id == principal.user_id)
    if tenant_id is not None:
        query = query.where(UsageRecord.tenant_id == tenant_id)
    if user_id is not None:
        query = query.where(UsageRecord.user_id == user_id)
    if bunker_id is not None:
        query = query.where(UsageRecord.bunker_id == bunker_id)
    if since is not None:
        query = query.where(UsageRecord.period_start >= since)
    if until is not None:
        query = query.where(UsageRecord.period_start < until)
    rows = aggregate((await session.scalars(query)).all())
    offset = cursor or 0
    page = rows[offset : offset + limit]
    more = offset + limit < len(rows)
    return JSONResponse(
        {
            "status": "ok",
            "data": encode(
                [
                    {
                        "tenant_id": r.tenant_id,
                        "user_id": r.user_id,
                        "bunker_id": r.bunker_id,
                        "day": r.day.isoformat(),
                        "cpu_millicore_seconds": r.cpu_millicore_seconds,
                        "memory_mb_seconds": r.memory_mb_seconds,
                        "disk_mb_seconds": r.disk_mb_seconds,
                        "gpu_seconds": r.gpu_seconds,
                        "egress_bytes": r.egress_bytes,
                        "records": r.records,
                    }
                    for r in page
                ]
            ),
            "pagination": {
                "has_more": more,
                "next_cursor": str(offset + limit) if more else None,
            },
        }
    )

"""HTTP routes of snapshots (SPEC §6.5). Thin: parse, authorise, call the service."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid.modules.scaibunker.snapshots import service
from scaigrid.modules.scaibunker.snapshots.common import get_visible_snapshot, snapshot_to_dict
from scaigrid.modules.scaibunker.state import ModuleState, get_state
from scaigrid.platform.auth import Principal, require
from scaigrid.platform.db import get_session
from scaigrid.platform.envelope import ok, ok_list
from scaigrid.platform.pagination import Limit, id_cursor

router = APIRouter(tags=["snapshots"])

StateDep = Annotated[ModuleState, Depends(get_state)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
CreatorDep = Annotated[Principal, Depends(require("scaibunker:create"))]


class SnapshotRequest(BaseModel):
    """``POST /bunkers/{id}/snapshot`` body."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=128)


@router.post("/bunkers/{bunker_id}/snapshot", status_code=201)
async def take_snapshot(
    bunker_id: str,
    principal: CreatorDep,
    state: StateDep,
    session: SessionDep,
    body: SnapshotRequest | None = None,
) -> JSONResponse:
    """201 with the ``pending`` snapshot; the worker archives and uploads in the background."""
    snapshot = await service.take_snapshot(
        state, session, principal, bunker_id, body.name if body else None
    )
    return ok(snapshot_to_dict(snapshot), status_code=201)


@router.get("/snapshots")
async def list_snapshots(
    principal: CreatorDep,
    session: SessionDep,
    limit: Limit = 100,
    cursor: Annotated[str | None, id_cursor("snp")] = None,
    bunker_id: Annotated[str | None, Query(max_length=64)] = None,
    status: Literal["pending", "uploading", "ready", "failed"] | None = None,
) -> JSONResponse:
    """One page of visible snapshots, newest first."""
    page, next_cursor = await service.list_snapshots(
        session, principal, limit=limit, cursor=cursor, bunker_id=bunker_id, status=status
    )
    return ok_list([snapshot_to_dict(s) for s in page], next_cursor)


@router.get("/snapshots/{snapshot_id}")
async def get_snapshot(
    snapshot_id: str, principal: CreatorDep, session: SessionDep
) -> JSONResponse:
    """One snapshot."""
    return ok(snapshot_to_dict(await get_visible_snapshot(session, principal, snapshot_id)))


@router.delete("/snapshots/{snapshot_id}")
async def delete_snapshot(
    snapshot_id: str, principal: CreatorDep, state: StateDep, session: SessionDep
) -> JSONResponse:
    """Remove the snapshot's objects and record."""
    await service.delete_snapshot(state, session, principal, snapshot_id)
    return ok({"id": snapshot_id, "deleted": True})

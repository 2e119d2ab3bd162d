"""HTTP routes of bunkers, exec and files (SPEC §2.3, §3.1, §4.1). Thin: parse, authorise,
call a service, shape the response."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BeforeValidator
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.modules.scaibunker.bunkers import exec as exec_service
from scaigrid.modules.scaibunker.bunkers import files as files_service
from scaigrid.modules.scaibunker.bunkers import processes, service
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.bunkers.schemas import (
    BunkerStatus,
    CreateBunkerRequest,
    ExecRequest,
    LabelPair,
    LifecycleMode,
    MkdirRequest,
    MoveRequest,
    SessionType,
    label_filters,
    split_commas,
)
from scaigrid.modules.scaibunker.network import bridges
from scaigrid.modules.scaibunker.snapshots import service as snapshots_service
from scaigrid.modules.scaibunker.state import ModuleState, get_state
from scaigrid.platform.auth import Principal, require
from scaigrid.platform.db import get_session
from scaigrid.platform.envelope import ok, ok_list
from scaigrid.platform.middleware import streaming_body
from scaigrid.platform.pagination import Limit, id_cursor
from scaigrid.protocol.link import TaskKind

router = APIRouter(tags=["bunkers"])

StateDep = Annotated[ModuleState, Depends(get_state)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
CreatorDep = Annotated[Principal, Depends(require("scaibunker:create"))]
ExecutorDep = Annotated[Principal, Depends(require("scaibunker:execute"))]
FilesDep = Annotated[Principal, Depends(require("scaibunker:files"))]
GuestUser = Annotated[Literal["user", "root"], Query()]
PathQuery = Annotated[str, Query(min_length=1, max_length=4096)]
_LIVE_WAIT_STATES = ("pending", "provisioning")
#: ``status`` of ``GET /bunkers``: one state or a comma-separated list (SPEC §2.3.2); an
#: unknown state is a 422 naming ``query.status[i]``.
StatusFilter = Annotated[list[BunkerStatus] | None, BeforeValidator(split_commas), Query()]


def _require_root(principal: Principal, user: str) -> None:
    if user == "root" and not principal.has("scaibunker:root"):
        raise errors.AuthzPermissionDenied(
            "acting as root needs scaibunker:root", details={"permission": "scaibunker:root"}
        )


async def _owned_running(state: ModuleState, principal: Principal, bunker_id: str) -> Bunker:
    return await service.ensure_running(state, principal, bunker_id)


@router.post("/bunkers", status_code=201)
async def create_bunker(
    body: CreateBunkerRequest,
    request: Request,
    principal: CreatorDep,
    state: StateDep,
    session: SessionDep,
    wait_s: Annotated[int, Query(ge=0, le=60)] = 0,
) -> JSONResponse:
    """Create a bunker; ``wait_s`` holds the answer until it leaves pending/provisioning."""
    bunker = await service.create_bunker(state, session, principal, body)
    await bridges.audit_l2_transparency(request, principal, bunker)
    bunker_id = bunker.id
    if wait_s:
        loop_time = asyncio.get_running_loop().time
        end = loop_time() + wait_s
        while bunker.status in _LIVE_WAIT_STATES and (left := end - loop_time()) > 0:
            await state.wait_bunker_change(bunker_id, left)
            await session.refresh(bunker)
    return ok(service.bunker_to_dict(bunker), status_code=201)


@router.get("/bunkers")
async def list_bunkers(
    principal: CreatorDep,
    session: SessionDep,
    limit: Limit = 100,
    cursor: Annotated[str | None, id_cursor("bnk")] = None,
    status: StatusFilter = None,
    label: Annotated[list[LabelPair] | None, Query()] = None,
    lifecycle: LifecycleMode | None = None,
    session_type: SessionType | None = None,
    session_ref: Annotated[str | None, Query(min_length=1, max_length=255)] = None,
) -> JSONResponse:
    """List the caller's bunkers (or the tenant's, for tenant admins), newest first."""
    page, next_cursor = await service.list_bunkers(
        session,
        principal,
        status=status,
        labels=label_filters(label),
        limit=limit,
        cursor=cursor,
        lifecycle=lifecycle,
        session_type=session_type,
        session_ref=session_ref,
    )
    return ok_list([service.bunker_to_dict(b) for b in page], next_cursor)


@router.get("/bunkers/{bunker_id}")
async def get_bunker(bunker_id: str, principal: CreatorDep, session: SessionDep) -> JSONResponse:
    """Read one bunker with its ``status_history``."""
    bunker = await service.get_visible(session, principal, bunker_id, with_history=True)
    return ok(service.bunker_to_dict(bunker, with_history=True))


@router.delete("/bunkers/{bunker_id}")
async def terminate_bunker(
    bunker_id: str,
    principal: CreatorDep,
    state: StateDep,
    session: SessionDep,
    snapshot: bool = False,
) -> JSONResponse:
    """Terminate a bunker (idempotent on stopping and terminal bunkers); with
    ``snapshot=true`` take a final snapshot first (``final_snapshot_id``) and terminate only
    once it is ``ready``."""
    if snapshot:
        await snapshots_service.final_snapshot(state, session, principal, bunker_id)
    bunker = await service.terminate_bunker(state, session, principal, bunker_id)
    return ok(service.bunker_to_dict(bunker))


@router.post("/bunkers/{bunker_id}/pause")
async def pause_bunker(
    bunker_id: str, principal: CreatorDep, state: StateDep, session: SessionDep
) -> JSONResponse:
    """Freeze every process of a running bunker (idempotent on a paused one)."""
    bunker = await service.pause_bunker(state, session, principal, bunker_id)
    return ok(service.bunker_to_dict(bunker))


@router.post("/bunkers/{bunker_id}/resume")
async def resume_bunker(
    bunker_id: str, principal: CreatorDep, state: StateDep, session: SessionDep
) -> JSONResponse:
    """Thaw a paused bunker (idempotent on a running one)."""
    bunker = await service.resume_bunker(state, session, principal, bunker_id)
    return ok(service.bunker_to_dict(bunker))


@router.post("/bunkers/{bunker_id}/exec")
async def exec_command(
    bunker_id: str, body: ExecRequest, request: Request, principal: ExecutorDep, state: StateDep
) -> Response:
    """Run a command in the bunker and answer with its result (foreground), an SSE stream
    (``Accept: text/event-stream``), or ``{exec_id, pid}`` at once for ``background``."""
    _require_root(principal, body.user)
    bunker = await _owned_running(state, principal, bunker_id)
    if body.background:
        max_timeout_s = state.config.exec_limits.max_timeout_s
        return ok(
            await processes.start_background(state, bunker, body, max_timeout_s=max_timeout_s)
        )
    if "text/event-stream" in request.headers.get("accept", ""):
        events = await exec_service.start_streaming(state, bunker, body)
        return StreamingResponse(
            events.frames(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return ok(await exec_service.run_foreground(state, bunker, body))


@router.put("/bunkers/{bunker_id}/files")
@streaming_body
async def upload_file(
    bunker_id: str,
    request: Request,
    principal: FilesDep,
    state: StateDep,
    path: PathQuery,
    mode: str = "0644",
    parents: bool = True,
    user: GuestUser = "user",
) -> JSONResponse:
    """Write the raw request body to ``path`` atomically; answer ``{path, size, sha256, mode}``."""
    _require_root(principal, user)
    params: dict[str, Any] = {
        "path": files_service.check_path(path),
        "mode": files_service.parse_mode(mode),
        "parents": parents,
        "user": user,
    }
    bunker = await _owned_running(state, principal, bunker_id)
    return ok(await files_service.write_file(state, bunker, params, request.stream()))


@router.get("/bunkers/{bunker_id}/files")
async def download_file(
    bunker_id: str,
    request: Request,
    principal: FilesDep,
    state: StateDep,
    path: PathQuery,
    user: GuestUser = "user",
) -> StreamingResponse:
    """Stream a file's bytes; a ``Range`` header answers 206."""
    _require_root(principal, user)
    params = {"path": files_service.check_path(path), "user": user}
    bunker = await _owned_running(state, principal, bunker_id)
    download = await files_service.read_file(state, bunker, params, request.headers.get("range"))
    return StreamingResponse(
        download.body, status_code=download.status_code, headers=download.headers
    )


@router.get("/bunkers/{bunker_id}/files/archive")
async def download_archive(
    bunker_id: str,
    principal: FilesDep,
    state: StateDep,
    path: PathQuery,
    user: GuestUser = "user",
) -> StreamingResponse:
    """Stream a tar of a directory's contents (``application/x-tar``)."""
    _require_root(principal, user)
    params = {"path": files_service.check_path(path), "user": user}
    bunker = await _owned_running(state, principal, bunker_id)
    download = await files_service.read_archive(state, bunker, params)
    return StreamingResponse(
        download.body, status_code=download.status_code, headers=download.headers
    )


@router.put("/bunkers/{bunker_id}/files/archive")
@streaming_body
async def upload_archive(
    bunker_id: str,
    request: Request,
    principal: FilesDep,
    state: StateDep,
    path: PathQuery,
    user: GuestUser = "user",
) -> JSONResponse:
    """Extract the tar request body below ``path``; answer ``{path, entries, bytes}``."""
    _require_root(principal, user)
    params = {"path": files_service.check_path(path), "user": user}
    bunker = await _owned_running(state, principal, bunker_id)
    return ok(await files_service.write_archive(state, bunker, params, request.stream()))


@router.get("/bunkers/{bunker_id}/files/list")
async def list_files(
    bunker_id: str,
    principal: FilesDep,
    state: StateDep,
    path: PathQuery = ".",
    depth: Annotated[int, Query(ge=1, le=10)] = 1,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,6}$")] = None,
    user: GuestUser = "user",
) -> JSONResponse:
    """List entries below a directory, depth-first, a page of ``limit`` at a time.

    The cursor is the position in the depth-first walk where the next page starts.
    """
    _require_root(principal, user)
    bunker = await _owned_running(state, principal, bunker_id)
    start = int(cursor or 0)
    if start + limit >= files_service.MAX_LIST_WALK:
        raise errors.ValidationFailed(
            f"listings stop after {files_service.MAX_LIST_WALK} entries; list a subdirectory",
            details=[{"field": "query.cursor", "message": "past the end of the listable entries"}],
        )
    params = {
        "path": files_service.check_path(path),
        "depth": depth,
        "limit": start + limit + 1,
        "user": user,
    }
    result = await files_service.call(state, bunker, TaskKind.FILES_LIST, params)
    entries = list(result.get("entries", result.get("value", [])))
    page = entries[start : start + limit]
    more = len(entries) > start + limit
    return ok_list(page, str(start + limit) if more else None)


@router.get("/bunkers/{bunker_id}/files/stat")
async def stat_file(
    bunker_id: str,
    principal: FilesDep,
    state: StateDep,
    path: PathQuery,
    user: GuestUser = "user",
) -> JSONResponse:
    """Describe one entry (a symlink itself, not its target)."""
    _require_root(principal, user)
    bunker = await _owned_running(state, principal, bunker_id)
    params = {"path": files_service.check_path(path), "user": user}
    return ok(await files_service.call(state, bunker, TaskKind.FILES_STAT, params))


@router.delete("/bunkers/{bunker_id}/files")
async def delete_file(
    bunker_id: str,
    principal: FilesDep,
    state: StateDep,
    path: PathQuery,
    recursive: bool = False,
    user: GuestUser = "user",
) -> JSONResponse:
    """Delete a file, or a directory (non-empty ones need ``recursive``)."""
    _require_root(principal, user)
    bunker = await _owned_running(state, principal, bunker_id)
    params = {"path": files_service.check_path(path), "recursive": recursive, "user": user}
    return ok(await files_service.call(state, bunker, TaskKind.FILES_DELETE, params))


@router.post("/bunkers/{bunker_id}/files/mkdir")
async def make_directory(
    bunker_id: str,
    body: MkdirRequest,
    principal: FilesDep,
    state: StateDep,
    user: GuestUser = "user",
) -> JSONResponse:
    """Create a directory."""
    _require_root(principal, user)
    bunker = await _owned_running(state, principal, bunker_id)
    params = {
        "path": files_service.check_path(body.path),
        "parents": body.parents,
        "mode": files_service.parse_mode(body.mode),
        "user": user,
    }
    return ok(await files_service.call(state, bunker, TaskKind.FILES_MKDIR, params))


@router.post("/bunkers/{bunker_id}/files/move")
async def move_file(
    bunker_id: str,
    body: MoveRequest,
    principal: FilesDep,
    state: StateDep,
    user: GuestUser = "user",
) -> JSONResponse:
    """Move or rename an entry."""
    _require_root(principal, user)
    bunker = await _owned_running(state, principal, bunker_id)
    params = {
        "src": files_service.check_path(body.src, "src"),
        "dst": files_service.check_path(body.dst, "dst"),
        "overwrite": body.overwrite,
        "user": user,
    }
    return ok(await files_service.call(state, bunker, TaskKind.FILES_MOVE, params))

"""HTTP routes of background processes (SPEC §3.1, §3.6). Thin: parse, authorise, relay."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from scaigrid import errors
from scaigrid.modules.scaibunker.bunkers import exec as exec_service
from scaigrid.modules.scaibunker.bunkers import processes, service
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.bunkers.schemas import (
    ProcessStatus,
    SignalRequest,
    StdinRequest,
)
from scaigrid.modules.scaibunker.state import ModuleState, get_state
from scaigrid.platform.auth import Principal, require
from scaigrid.platform.envelope import ok, ok_list
from scaigrid.platform.pagination import Limit, id_cursor

router = APIRouter(tags=["processes"])

StateDep = Annotated[ModuleState, Depends(get_state)]
ExecutorDep = Annotated[Principal, Depends(require("scaibunker:execute"))]


async def _owned_running(state: ModuleState, principal: Principal, bunker_id: str) -> Bunker:
    return await service.ensure_running(state, principal, bunker_id)


@router.get("/bunkers/{bunker_id}/processes")
async def list_processes(
    bunker_id: str,
    principal: ExecutorDep,
    state: StateDep,
    limit: Limit = 100,
    cursor: Annotated[str | None, id_cursor("exe")] = None,
    status: ProcessStatus | None = None,
) -> JSONResponse:
    """The bunker's execs, newest first; ``cursor`` is the last exec id of the previous page.

    Raises:
        errors.ValidationFailed: ``cursor`` names no exec still listed (422, ``query.cursor``).
    """
    bunker = await _owned_running(state, principal, bunker_id)
    records = await processes.list_processes(state, bunker, status)
    start = 0
    if cursor is not None:
        ids = [r.get("exec_id") for r in records]
        if cursor not in ids:
            raise errors.ValidationFailed(
                "cursor does not name a listed process",
                details=[{"field": "query.cursor", "message": "unknown cursor"}],
            )
        start = ids.index(cursor) + 1
    page = records[start : start + limit]
    more = start + limit < len(records)
    return ok_list(page, str(page[-1]["exec_id"]) if more and page else None)


@router.get("/bunkers/{bunker_id}/processes/{pid}")
async def get_process(
    bunker_id: str, pid: str, principal: ExecutorDep, state: StateDep
) -> JSONResponse:
    """One process record, by guest pid or exec id."""
    processes.check_ref(pid)
    bunker = await _owned_running(state, principal, bunker_id)
    return ok(await processes.get_process(state, bunker, pid))


@router.get("/bunkers/{bunker_id}/processes/{pid}/output")
async def process_output(
    bunker_id: str,
    pid: str,
    request: Request,
    principal: ExecutorDep,
    state: StateDep,
    stream: Literal["stdout", "stderr"] = "stdout",
    offset: Annotated[int, Query(ge=0)] = 0,
    max_bytes: Annotated[int, Query(ge=1, le=processes.CHUNK_BYTES)] = processes.CHUNK_BYTES,
    encoding: Literal["utf8", "base64"] = "utf8",
) -> Response:
    """Output from ``offset`` still in the ring buffer (at most ``max_bytes`` per call), or
    with ``Accept: text/event-stream`` an SSE stream of it until the process ends."""
    processes.check_ref(pid)
    bunker = await _owned_running(state, principal, bunker_id)
    if "text/event-stream" in request.headers.get("accept", ""):
        events = await exec_service.start_following(
            state, bunker, pid, stream=stream, offset=offset, encoding=encoding
        )
        return StreamingResponse(
            events.frames(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    chunk = await processes.read_output(
        state,
        bunker,
        pid,
        stream=stream,
        offset=offset,
        max_bytes=max_bytes,
        encoding=encoding,
    )
    return ok(chunk)


@router.post("/bunkers/{bunker_id}/processes/{pid}/signal")
async def signal_process(
    bunker_id: str, pid: str, body: SignalRequest, principal: ExecutorDep, state: StateDep
) -> JSONResponse:
    """Send a signal to the process, or with ``group`` to its process group."""
    processes.check_ref(pid)
    bunker = await _owned_running(state, principal, bunker_id)
    return ok(await processes.signal_process(state, bunker, pid, body.signal, body.group))


@router.post("/bunkers/{bunker_id}/processes/{pid}/stdin")
async def process_stdin(
    bunker_id: str, pid: str, body: StdinRequest, principal: ExecutorDep, state: StateDep
) -> JSONResponse:
    """Write to a ``stdin_open`` process's stdin; ``eof`` closes it afterwards."""
    processes.check_ref(pid)
    data = processes.decode_data(body.data, body.data_b64)
    bunker = await _owned_running(state, principal, bunker_id)
    return ok(await processes.write_stdin(state, bunker, pid, data, eof=body.eof))

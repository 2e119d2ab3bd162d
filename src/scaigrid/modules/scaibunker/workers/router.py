"""Worker routes: the channel WebSocket, join tokens, and the worker list (SPEC §10.2)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, Depends, Query, WebSocket
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.websockets import WebSocketDisconnect

from scaigrid import errors
from scaigrid.modules.scaibunker import lifecycle
from scaigrid.modules.scaibunker.bunkers import service as bunker_service
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.bunkers.schemas import LabelPair, iso, label_filters
from scaigrid.modules.scaibunker.images.service import bake_pending_images
from scaigrid.modules.scaibunker.network import bridges
from scaigrid.modules.scaibunker.state import ModuleState, get_state, module_state
from scaigrid.modules.scaibunker.storage import grants
from scaigrid.modules.scaibunker.workers import scheduler
from scaigrid.modules.scaibunker.workers import service as worker_service
from scaigrid.modules.scaibunker.workers.hub import WorkerConnection
from scaigrid.modules.scaibunker.workers.models import Worker
from scaigrid.platform.auth import Principal, current_principal
from scaigrid.platform.db import get_session
from scaigrid.platform.envelope import ok, ok_list
from scaigrid.platform.pagination import Limit, id_cursor
from scaigrid.protocol.link import (
    MAX_MESSAGE_BYTES,
    LinkClosed,
    MsgType,
    ProtocolViolation,
    loads,
)

log = structlog.get_logger(__name__)
router = APIRouter(tags=["workers"])

REGISTER_TIMEOUT_S = 10.0

StateDep = Annotated[ModuleState, Depends(get_state)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
PrincipalDep = Annotated[Principal, Depends(current_principal)]


class JoinTokenRequest(BaseModel):
    """Body of ``POST /workers/join-tokens``."""

    model_config = ConfigDict(extra="forbid")
    tenant_id: str | None = None
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    expires_in_s: int = Field(default=3600, ge=1, le=86400)


def _can_manage_workers(principal: Principal, tenant_id: str | None) -> bool:
    if tenant_id is None:
        return principal.has("scaibunker:admin:platform")
    if principal.has("scaibunker:admin:platform"):
        return True
    return principal.has("scaibunker:admin") and (
        principal.is_super_admin or tenant_id == principal.tenant_id
    )


@router.post("/workers/join-tokens", status_code=201)
async def create_join_token(
    body: JoinTokenRequest, principal: PrincipalDep, session: SessionDep
) -> JSONResponse:
    """Mint a one-use join token; the secret is shown only in this answer."""
    if not _can_manage_workers(principal, body.tenant_id):
        key = "scaibunker:admin:platform" if body.tenant_id is None else "scaibunker:admin"
        raise errors.AuthzPermissionDenied(f"needs {key}", details={"permission": key})
    record, token = await worker_service.mint_join_token(
        session,
        tenant_id=body.tenant_id,
        labels=body.labels,
        expires_in_s=body.expires_in_s,
        created_by=principal.user_id,
    )
    return ok(
        {
            "id": record.id,
            "token": token,
            "tenant_id": record.tenant_id,
            "labels": record.labels,
            "expires_at": iso(record.expires_at),
        },
        status_code=201,
    )


def _worker_reader(principal: Principal) -> bool:
    return any(
        principal.has(key)
        for key in ("scaibunker:admin", "scaibunker:admin:platform", "scaibunker:admin:tenant")
    )


@router.get("/workers")
async def list_workers(
    principal: PrincipalDep,
    session: SessionDep,
    limit: Limit = 100,
    cursor: Annotated[str | None, id_cursor("wrk")] = None,
    connection: Literal["online", "stale", "offline"] | None = None,
    admin_state: Literal["active", "draining"] | None = None,
    tenant_id: Annotated[str | None, Query(max_length=32)] = None,
    label: Annotated[list[LabelPair] | None, Query()] = None,
) -> JSONResponse:
    """List the workers the caller may see, newest first, filtered by ``connection``,
    ``admin_state``, ``tenant_id`` and ``label=key=value`` (all must match) (SPEC §10.2)."""
    if not _worker_reader(principal):
        raise errors.AuthzPermissionDenied(
            "needs an admin key", details={"permission": "scaibunker:admin:tenant"}
        )
    query = select(Worker).where(Worker.deleted_at.is_(None)).order_by(Worker.id.desc())
    if not principal.has("scaibunker:admin:platform"):
        query = query.where(
            (Worker.tenant_id.is_(None)) | (Worker.tenant_id == principal.tenant_id)
        )
    if connection is not None:
        query = query.where(Worker.connection == connection)
    if admin_state is not None:
        query = query.where(Worker.admin_state == admin_state)
    if tenant_id is not None:
        query = query.where(Worker.tenant_id == tenant_id)
    if cursor:
        query = query.where(Worker.id < cursor)
    labels = label_filters(label)
    rows: list[Worker] = []
    async for worker in await session.stream_scalars(query):
        if all(worker.labels.get(k) == v for k, v in labels.items()):
            rows.append(worker)
            if len(rows) > limit:
                break
    allocated = await scheduler.allocated_by_worker(session)
    page = rows[:limit]
    next_cursor = page[-1].id if len(rows) > limit else None
    return ok_list(
        [worker_service.worker_to_dict(w, allocated.get(w.id, {})) for w in page], next_cursor
    )


@router.get("/workers/{worker_id}")
async def get_worker(worker_id: str, principal: PrincipalDep, session: SessionDep) -> JSONResponse:
    """Read one worker with its image cache."""
    worker = await session.get(Worker, worker_id)
    visible = (
        worker is not None
        and worker.deleted_at is None
        and _worker_reader(principal)
        and (
            principal.has("scaibunker:admin:platform")
            or worker.tenant_id in (None, principal.tenant_id)
        )
    )
    if not visible or worker is None:
        raise errors.WorkerNotFound(f"worker {worker_id} not found")
    allocated = await scheduler.allocated_by_worker(session)
    return ok(worker_service.worker_to_dict(worker, allocated.get(worker.id, {}), detail=True))


async def _set_admin_state(
    worker_id: str, principal: Principal, session: AsyncSession, admin_state: str
) -> JSONResponse:
    worker = await session.get(Worker, worker_id)
    if worker is None or worker.deleted_at is not None:
        raise errors.WorkerNotFound(f"worker {worker_id} not found")
    if not _can_manage_workers(principal, worker.tenant_id):
        if _worker_reader(principal) and worker.tenant_id in (None, principal.tenant_id):
            raise errors.AuthzPermissionDenied(
                "managing this worker needs an administrative key",
                details={"permission": "scaibunker:admin:platform"},
            )
        raise errors.WorkerNotFound(f"worker {worker_id} not found")
    if worker.admin_state != admin_state:
        worker.admin_state = admin_state
        await session.commit()
        log.info("worker_admin_state", worker_id=worker_id, admin_state=admin_state)
    allocated = await scheduler.allocated_by_worker(session)
    return ok(worker_service.worker_to_dict(worker, allocated.get(worker.id, {}), detail=True))


@router.post("/workers/{worker_id}/drain")
async def drain_worker(
    worker_id: str, principal: PrincipalDep, session: SessionDep
) -> JSONResponse:
    """Place no new bunkers on the worker; existing ones run on (idempotent, SPEC §10.2)."""
    return await _set_admin_state(worker_id, principal, session, "draining")


@router.post("/workers/{worker_id}/resume")
async def resume_worker(
    worker_id: str, principal: PrincipalDep, session: SessionDep
) -> JSONResponse:
    """Let the scheduler place bunkers on the worker again (idempotent, SPEC §10.2)."""
    return await _set_admin_state(worker_id, principal, session, "active")


async def _deny(websocket: WebSocket, exc: errors.ScaiGridError) -> None:
    body = {"status": "error", "error": exc.to_dict(), "meta": {"request_id": None}}
    try:
        await websocket.send_denial_response(JSONResponse(body, status_code=exc.status_code))
    except RuntimeError:
        await websocket.close(code=1008, reason=exc.code)


async def _reconcile(
    state: ModuleState, connection: WorkerConnection, message: worker_service.RegisterMessage
) -> None:
    """Destroy what the worker should not hold; fail what it lost (SPEC §10.3)."""
    async with state.db.sessionmaker() as session:
        stale = await worker_service.stale_bunkers(session, connection.worker_id, message.bunkers)
        missing = await worker_service.missing_bunkers(
            session, connection.worker_id, message.bunkers
        )
    for bunker_id in stale:
        log.info("reconcile_destroy", worker_id=connection.worker_id, bunker_id=bunker_id)
        await bunker_service.destroy_on_worker(state, connection.worker_id, bunker_id)
    for bunker_id in missing:
        # The worker restarted without it (its bunkers die with it): a lost worker's bunker.
        await lifecycle.apply_worker_loss(state, bunker_id, [connection.worker_id])
    await bridges.recreate_bridges(state, connection)
    await bake_pending_images(state)


def _destroy_stale(state: ModuleState, worker_id: str, bunker_id: str) -> None:
    """Have a worker destroy a bunker its heartbeat lists but must not hold (unknown, ended,
    or placed elsewhere: e.g. it was failed out while the worker was silent; SPEC §10.4),
    once at a time per bunker."""
    key = (worker_id, bunker_id)
    if key in state.destroying:
        return
    state.destroying.add(key)

    async def destroy() -> None:
        try:
            log.info("heartbeat_destroy", worker_id=worker_id, bunker_id=bunker_id)
            await bunker_service.destroy_on_worker(state, worker_id, bunker_id)
        finally:
            state.destroying.discard(key)

    state.spawn(destroy(), name=f"destroy-stale-{bunker_id}")


async def _on_text(state: ModuleState, connection: WorkerConnection, text: str) -> None:
    if len(text) > MAX_MESSAGE_BYTES:
        raise ProtocolViolation("message too large")
    message = loads(text)
    kind = message["type"]
    if kind == MsgType.HEARTBEAT:
        heartbeat = worker_service.HeartbeatMessage.model_validate(message)
        async with state.db.sessionmaker() as session:
            await worker_service.record_heartbeat(session, connection.worker_id, heartbeat)
            stale = await worker_service.stale_bunkers(
                session, connection.worker_id, heartbeat.bunkers
            )
        for bunker_id in stale:
            _destroy_stale(state, connection.worker_id, bunker_id)
    elif kind == MsgType.BUNKER_EVENT:
        bunker_id, event = str(message.get("bunker_id")), str(message.get("event"))
        if event in ("vm_exited", "agent_lost"):
            async with state.db.sessionmaker() as session:
                bunker = await session.get(Bunker, bunker_id)
                owned = bunker is not None and bunker.worker_id == connection.worker_id
            if owned:
                await bunker_service.fail_bunker(state, bunker_id, "vm_exited", event)
    elif kind == MsgType.CAPABILITY_REQUEST:
        reply = await grants.answer_request(state, connection.worker_id, message)
        with contextlib.suppress(LinkClosed):
            await connection.mux.send(reply)
    else:
        connection.on_message(message)


@router.websocket("/workers/connect")
async def worker_connect(websocket: WebSocket) -> None:
    """The worker channel: authenticate, ``register``, then serve tasks until it drops."""
    state = module_state(websocket)
    header = websocket.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret:
        await _deny(
            websocket, errors.AuthTokenMissing("a join token or worker credential is required")
        )
        return
    try:
        async with state.db.sessionmaker() as session:
            auth = await worker_service.authenticate(session, secret.strip())
    except errors.ScaiGridError as exc:
        await _deny(websocket, exc)
        return
    await websocket.accept()
    try:
        first = await asyncio.wait_for(websocket.receive_text(), REGISTER_TIMEOUT_S)
        message = worker_service.RegisterMessage.model_validate(loads(first))
        if message.type != MsgType.REGISTER:
            raise ProtocolViolation("the first message must be register")
    except (TimeoutError, ProtocolViolation, ValidationError, WebSocketDisconnect, KeyError) as exc:
        log.warning("worker_register_rejected", error=str(exc))
        await websocket.close(code=1002)
        return
    async with state.db.sessionmaker() as session:
        session.add(auth)
        worker, credential = await worker_service.register(session, auth, message)
        worker_id = worker.id
    connection = WorkerConnection(worker_id, websocket.send_text, websocket.send_bytes)
    await state.hub.attach(connection)
    log.info("worker_connected", worker_id=worker_id, hostname=message.hostname)
    registered: dict[str, Any] = {
        "type": MsgType.REGISTERED,
        "worker_id": worker_id,
        "heartbeat_interval_s": worker_service.HEARTBEAT_INTERVAL_S,
    }
    if credential is not None:
        registered["credential"] = credential
    try:
        await connection.mux.send(registered)
        state.spawn(_reconcile(state, connection, message), name=f"reconcile-{worker_id}")
        while True:
            frame = await websocket.receive()
            if frame["type"] == "websocket.disconnect":
                break
            if frame.get("bytes") is not None:
                connection.mux.feed_binary(frame["bytes"])
            elif frame.get("text") is not None:
                await _on_text(state, connection, frame["text"])
    except (ProtocolViolation, ValidationError) as exc:
        log.warning("worker_protocol_violation", worker_id=worker_id, error=str(exc))
        await websocket.close(code=1002)
    except WebSocketDisconnect:
        pass
    finally:
        await state.hub.detach(connection)
        if state.hub.get(worker_id) is None:
            async with state.db.sessionmaker() as session:
                await worker_service.mark_offline(session, worker_id)
        log.info("worker_disconnected", worker_id=worker_id)

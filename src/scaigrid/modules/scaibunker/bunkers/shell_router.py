"""Routes of the interactive shell (SPEC §5.1): the ticket and the WebSocket upgrade."""

from __future__ import annotations

import contextlib
from typing import Annotated

from fastapi import APIRouter, Depends, WebSocket
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from scaigrid import errors
from scaigrid.modules.scaibunker.bunkers import service
from scaigrid.modules.scaibunker.bunkers import shell as shell_service
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.state import ModuleState, get_state, module_state
from scaigrid.platform.audit.service import AuditEntry, AuditLog
from scaigrid.platform.auth import Principal, require
from scaigrid.platform.auth.dependencies import current_principal
from scaigrid.platform.auth.service import principal_for_user
from scaigrid.platform.db import get_database
from scaigrid.platform.envelope import ok, request_id_from_scope
from scaigrid.platform.modules.service import is_enabled

router = APIRouter(tags=["shell"])

SHELL_PERMISSION = "scaibunker:shell"
ShellDep = Annotated[Principal, Depends(require(SHELL_PERMISSION))]
StateDep = Annotated[ModuleState, Depends(get_state)]


@router.post("/bunkers/{bunker_id}/shell/ticket", status_code=201)
async def shell_ticket(bunker_id: str, principal: ShellDep, state: StateDep) -> JSONResponse:
    """Mint a one-use, 30-second ticket for opening this bunker's shell from a browser."""
    async with state.db.sessionmaker() as session:
        bunker = await session.get(Bunker, bunker_id)
    if (
        bunker is None
        or bunker.owner_user_id != principal.user_id
        or bunker.tenant_id != principal.tenant_id
    ):
        raise errors.BunkerNotFound(f"bunker {bunker_id} not found")
    return ok(await shell_service.mint_ticket(state, principal, bunker_id), status_code=201)


async def _ticket_principal(websocket: WebSocket, state: ModuleState, bunker_id: str) -> Principal:
    ticket = websocket.query_params["ticket"]
    user_id = await shell_service.redeem_ticket(state, ticket, bunker_id)
    principal = await principal_for_user(get_database(websocket), user_id)
    async with state.db.sessionmaker() as session:
        if not await is_enabled(session, "scaibunker", principal.tenant_id, principal.partner_id):
            raise errors.ModuleNotEnabled("The scaibunker module is not enabled for your tenant")
    websocket.state.principal = principal
    return principal


async def _deny(websocket: WebSocket, exc: errors.ScaiGridError) -> None:
    """Answer the upgrade with the SPEC error envelope (HTTP status, no WebSocket)."""
    body = {
        "status": "error",
        "error": exc.to_dict(),
        "meta": {"request_id": request_id_from_scope(websocket.scope)},
    }
    try:
        await websocket.send_denial_response(JSONResponse(body, status_code=exc.status_code))
    except RuntimeError:
        await websocket.close(code=1008, reason=exc.code)


async def _audit_open(websocket: WebSocket, principal: Principal, bunker_id: str) -> None:
    audit: AuditLog | None = getattr(websocket.app.state, "audit", None)
    if audit is None:
        return
    client = websocket.client
    entry = AuditEntry(
        request_id=request_id_from_scope(websocket.scope),
        actor_id=principal.user_id,
        actor_type="api_key" if principal.api_key_id else "user",
        tenant_id=principal.tenant_id,
        partner_id=principal.partner_id,
        action="scaibunker.shell.open",
        resource_type="bunker",
        resource_id=bunker_id,
        ip_address=client.host if client else None,
        user_agent=websocket.headers.get("user-agent"),
        outcome="SUCCESS",
        status_code=101,
    )
    with contextlib.suppress(SQLAlchemyError):
        await audit.submit(entry)


@router.websocket("/bunkers/{bunker_id}/shell")
async def shell(websocket: WebSocket, bunker_id: str) -> None:
    """The shell WebSocket (SPEC §5): authenticate (header or ``?ticket=``), check
    ``scaibunker:shell`` (and ``scaibunker:root`` for ``user=root``), resume an idle-paused
    bunker, open or reattach the session, then relay. Refusals answer the upgrade with the
    error envelope."""
    state = module_state(websocket)
    try:
        if websocket.query_params.get("ticket"):
            principal = await _ticket_principal(websocket, state, bunker_id)
        else:
            principal = await current_principal(websocket)
        request = shell_service.ShellRequest.parse(websocket.query_params)
        if not principal.has(SHELL_PERMISSION):
            raise errors.AuthzPermissionDenied(
                f"Missing permission {SHELL_PERMISSION}", details={"permission": SHELL_PERMISSION}
            )
        if request.user == "root" and not principal.has("scaibunker:root"):
            raise errors.AuthzPermissionDenied(
                "a root shell needs scaibunker:root", details={"permission": "scaibunker:root"}
            )
        bunker = await service.ensure_running(state, principal, bunker_id)
        relay = await shell_service.open_shell(state, bunker, principal, request)
    except errors.ScaiGridError as exc:
        await _deny(websocket, exc)
        return
    try:
        await websocket.accept()
    except BaseException:
        await relay.handle.cancel()
        relay.input.abandon()
        relay.output.close()
        raise
    await _audit_open(websocket, principal, bunker_id)
    await relay.run(websocket)

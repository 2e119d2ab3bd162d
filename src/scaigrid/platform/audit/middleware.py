"""Pure ASGI middleware that records every POST, PUT, PATCH and DELETE, and every module
``GET`` when that module's ``read_audit`` config is on for the caller's tenant (SPEC §1.7).

It only watches ``send`` (the status, and the body of small JSON responses to learn a created
resource's id), so streamed uploads and downloads pass through untouched; WebSockets and
other methods are not recorded. The record is appended after the response has been sent.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scaigrid.platform.audit.service import AuditEntry, AuditLog
from scaigrid.platform.auth.principal import Principal
from scaigrid.platform.envelope import request_id_from_scope
from scaigrid.platform.modules.service import EnabledCache, effective_value

log = structlog.get_logger(__name__)

AUDITED_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Largest JSON response body kept to read a created resource's ``data.id``, in bytes.
MAX_CAPTURED_BODY = 64 * 1024
_MODULE_PREFIX = "/v1/modules/"


def _resource(scope: Scope) -> tuple[str, str | None, str | None]:
    """``(action, resource_type, resource_id)`` from the path and the matched route's
    parameters.

    The action is ``"<METHOD> <path with parameters as {name}>"``; the resource is named by
    the last path parameter (``{bunker_id}`` → type ``bunker``) or else the last literal segment
    (``/bunkers`` → ``bunker``, id from the response).
    """
    params: dict[str, Any] = scope.get("path_params") or {}
    by_value = {str(value): name for name, value in params.items()}
    segments = [f"{{{by_value[s]}}}" if s in by_value else s for s in scope["path"].split("/") if s]
    action = f"{scope['method']} /{'/'.join(segments)}"
    for segment in reversed(segments):
        if segment.startswith("{") and segment.endswith("}"):
            name = segment[1:-1]
            value = params.get(name)
            return action, name.removesuffix("_id"), None if value is None else str(value)
    literal = segments[-1] if segments else ""
    return action, (literal.removesuffix("s") or None), None


def _created_id(body: bytes) -> str | None:
    try:
        data = json.loads(body).get("data")
    except (ValueError, AttributeError):
        return None
    value = data.get("id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


class AuditMiddleware:
    """Append one audit record per audited HTTP request to ``app.state.audit``.

    Args:
        app: the next ASGI app.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        mutating = scope["method"] in AUDITED_METHODS
        if not mutating and not (
            scope["method"] == "GET" and scope["path"].startswith(_MODULE_PREFIX)
        ):
            await self.app(scope, receive, send)
            return
        status = 500
        captured = bytearray()
        capture = False

        async def watching_send(message: Message) -> None:
            nonlocal status, capture
            if message["type"] == "http.response.start":
                status = message["status"]
                content_type = Headers(raw=message.get("headers", [])).get("content-type", "")
                capture = content_type.startswith("application/json")
            elif message["type"] == "http.response.body" and capture:
                captured.extend(message.get("body", b""))
                if len(captured) > MAX_CAPTURED_BODY:
                    capture = False
                    captured.clear()
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        finally:
            if mutating or await self._read_audit_on(scope):
                await self._record(scope, status, bytes(captured))

    async def _read_audit_on(self, scope: Scope) -> bool:
        """True when the GET went to a module whose ``read_audit`` config is on for the
        caller's tenant (SPEC §1.7)."""
        state = scope.get("state", {})
        principal: Principal | None = state.get("principal")
        module_name: str | None = state.get("module")
        app_state = scope["app"].state
        if principal is None or module_name is None or app_state.db is None:
            return False
        cache: EnabledCache | None = getattr(app_state, "read_audit_cache", None)
        key = (module_name, principal.tenant_id, principal.partner_id)
        cached = cache.get(key) if cache is not None else None
        if cached is not None:
            return cached
        module = app_state.modules.get(module_name)
        model = getattr(module, "config_model", None)
        try:
            async with app_state.db.sessionmaker() as session:
                value = await effective_value(
                    session,
                    model,
                    module_name,
                    principal.tenant_id,
                    principal.partner_id,
                    "read_audit",
                )
        except SQLAlchemyError:
            log.exception("audit.read_audit_lookup_failed", module=module_name)
            return True
        if cache is not None:
            cache.put(key, value is True)
        return value is True

    async def _record(self, scope: Scope, status: int, body: bytes) -> None:
        audit: AuditLog | None = getattr(scope["app"].state, "audit", None)
        if audit is None:
            return
        action, resource_type, resource_id = _resource(scope)
        if resource_id is None and status == 201:
            resource_id = _created_id(body)
        principal: Principal | None = scope.get("state", {}).get("principal")
        headers = Headers(scope=scope)
        client = scope.get("client")
        entry = AuditEntry(
            request_id=request_id_from_scope(scope),
            actor_id=principal.user_id if principal else None,
            actor_type=(
                "anonymous"
                if principal is None
                else ("api_key" if principal.api_key_id else "user")
            ),
            tenant_id=principal.tenant_id if principal else None,
            partner_id=principal.partner_id if principal else None,
            action=action,
            resource_type=resource_type,
            resource_id=resource_id,
            ip_address=client[0] if client else None,
            user_agent=headers.get("user-agent"),
            outcome="SUCCESS" if status < 400 else "FAILURE",
            status_code=status,
        )
        try:
            await audit.submit(entry)
        except SQLAlchemyError:
            # The response is already sent; losing the record must at least be loud.
            log.exception("audit.append_failed", request_id=entry.request_id, action=action)

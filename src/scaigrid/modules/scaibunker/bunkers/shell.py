"""The interactive shell, controller side (SPEC §5): tickets, session open/reattach through
the bunker's worker, and the relay between a WebSocket and the worker's link streams.

Protocol on the WebSocket (SPEC §5.3): binary frames are raw terminal bytes both ways;
client text frames ``{"type": "resize", "cols", "rows"}`` and ``{"type": "signal",
"signal"}``; server text frames ``{"type": "session", "session_id", "replayed_bytes",
"offset"}`` (always first; ``offset`` is the output byte offset of the next binary byte, an
extension that lets a client reattach with ``?offset=`` exactly where it stopped),
``{"type": "exit", "exit_code", "signal"}`` (then close 1000), and ``{"type": "error",
"code", "message"}`` for a text frame the server could not use (the session continues).
A newer attach to the same session closes this one with 1000; a lost worker or agent closes
with 1011 and a JSON reason ``{code, message}``.

While a shell is connected its bunker is active: :func:`connected_shells` counts the
connections of this controller process, and ``last_activity_at`` is refreshed every
:data:`ACTIVITY_TOUCH_S` seconds, or a third of the bunker's idle timeout when that is
shorter (SPEC §2.6).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Final

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import update
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from scaigrid import errors
from scaigrid.ids import new_id
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.module_config import ScaiBunkerConfig, ShellConfig
from scaigrid.modules.scaibunker.state import ModuleState
from scaigrid.modules.scaibunker.workers.hub import TaskHandle, WorkerConnection
from scaigrid.platform.auth import Principal
from scaigrid.platform.db import utcnow
from scaigrid.platform.modules.service import effective_value
from scaigrid.protocol.link import InboundStream, OutboundStream, TaskKind

log = structlog.get_logger(__name__)

TICKET_TTL_S: Final = 30.0
START_TIMEOUT_S: Final = 30.0
CALL_TIMEOUT_S: Final = 10.0
#: How often a connected shell refreshes its bunker's ``last_activity_at``.
ACTIVITY_TOUCH_S: Final = 30.0
#: Longest a relay waits for the session's end (the worker's own deadline is a day).
RESULT_WAIT_S: Final = 2 * 86400.0
MAX_TEXT_FRAME_BYTES: Final = 4096
_TICKET_PREFIX: Final = "sbt_"


@dataclass
class _Ticket:
    user_id: str
    bunker_id: str
    expires_mono: float


@dataclass
class ShellRegistry:
    """Per-controller-process shell state: unredeemed tickets (without Redis), connection
    counts, and the Redis client tickets live in when the controller has one."""

    tickets: dict[str, _Ticket] = field(default_factory=dict)
    connected: dict[str, int] = field(default_factory=dict)
    redis: Redis | None = None


_registries: weakref.WeakKeyDictionary[ModuleState, ShellRegistry] = weakref.WeakKeyDictionary()


def registry(state: ModuleState) -> ShellRegistry:
    """The shell registry of ``state`` (created on first use)."""
    found = _registries.get(state)
    if found is None:
        found = _registries[state] = ShellRegistry()
        url = state.settings.redis_url
        if url:
            found.redis = Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    return found


def connected_shells(state: ModuleState, bunker_id: str) -> int:
    """How many shell WebSockets of ``bunker_id`` this controller process holds now (the
    lifecycle reaper must not treat a bunker with a connected shell as idle, SPEC §2.6)."""
    return registry(state).connected.get(bunker_id, 0)


def _ticket_key(state: ModuleState, ticket: str) -> str:
    digest = hashlib.sha256(ticket.encode()).hexdigest()
    return f"{state.settings.redis_prefix}scaibunker:shell_ticket:{digest}"


async def mint_ticket(state: ModuleState, principal: Principal, bunker_id: str) -> dict[str, Any]:
    """A one-use ticket for ``bunker_id`` bound to the caller, valid 30 s (SPEC §5.2).

    Kept in Redis (under its SHA-256, so a Redis reader cannot use it) when the controller
    has one, so any replica can redeem it; in this process's memory otherwise.

    Returns:
        ``{ticket, expires_at}`` (RFC 3339).

    Raises:
        errors.Unavailable: Redis cannot be reached.
    """
    shells = registry(state)
    ticket = _TICKET_PREFIX + secrets.token_urlsafe(32)
    if shells.redis is not None:
        value = json.dumps({"user_id": principal.user_id, "bunker_id": bunker_id})
        try:
            await shells.redis.set(_ticket_key(state, ticket), value, px=int(TICKET_TTL_S * 1000))
        except RedisError as exc:
            raise errors.Unavailable("the ticket store (Redis) cannot be reached") from exc
    else:
        now = time.monotonic()
        for key in [k for k, t in shells.tickets.items() if t.expires_mono <= now]:
            del shells.tickets[key]
        shells.tickets[ticket] = _Ticket(principal.user_id, bunker_id, now + TICKET_TTL_S)
    expires_at = utcnow().timestamp() + TICKET_TTL_S
    return {
        "ticket": ticket,
        "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at)),
    }


async def redeem_ticket(state: ModuleState, ticket: str, bunker_id: str) -> str:
    """Consume ``ticket`` for ``bunker_id``; return the user id it was minted for. A ticket is
    consumed by any redemption attempt, also a refused one.

    Raises:
        errors.AuthTokenInvalid: unknown, used, expired, or minted for another bunker.
        errors.Unavailable: Redis cannot be reached.
    """
    shells = registry(state)
    user_id: str | None = None
    if shells.redis is not None:
        try:
            raw = await shells.redis.getdel(_ticket_key(state, ticket))
        except RedisError as exc:
            raise errors.Unavailable("the ticket store (Redis) cannot be reached") from exc
        if raw is not None:
            value = json.loads(raw)
            if value.get("bunker_id") == bunker_id:
                user_id = str(value["user_id"])
    else:
        found = shells.tickets.pop(ticket, None)
        if found is not None and found.expires_mono > time.monotonic():
            user_id = found.user_id if found.bunker_id == bunker_id else None
    if user_id is None:
        raise errors.AuthTokenInvalid("the shell ticket is invalid, used or expired")
    return user_id


@dataclass(frozen=True)
class ShellRequest:
    """The query of a shell upgrade (SPEC §5.1), validated.

    Attributes:
        cols, rows: window size (1-1000), None when not given.
        command: command to run instead of the login shell, or None.
        user: ``user`` or ``root``.
        session: ``shs_`` id to reattach to, or None for a new session.
        offset: output byte offset to replay from on reattach, or None (where the last
            connection stopped).
    """

    cols: int | None
    rows: int | None
    command: str | None
    user: str
    session: str | None
    offset: int | None

    @classmethod
    def parse(cls, query: Any) -> ShellRequest:
        """Validate the upgrade's query parameters.

        Raises:
            errors.ValidationFailed: a parameter is out of range or malformed.
        """
        problems: list[dict[str, Any]] = []

        def number(name: str, low: int, high: int) -> int | None:
            raw = query.get(name)
            if raw is None:
                return None
            if not raw.isdigit() or not low <= int(raw) <= high:
                problems.append({"field": name, "message": f"must be an integer {low}-{high}"})
                return None
            return int(raw)

        cols, rows = number("cols", 1, 1000), number("rows", 1, 1000)
        offset = number("offset", 0, 1 << 62)
        user = query.get("user") or "user"
        if user not in ("user", "root"):
            problems.append({"field": "user", "message": "must be user or root"})
        command = query.get("command")
        if command is not None and (not command or "\x00" in command or len(command) > 65536):
            problems.append({"field": "command", "message": "must be a non-empty command line"})
        session = query.get("session")
        if session is not None and (
            not session.startswith("shs_")
            or len(session) > 64
            or not session.replace("_", "").isalnum()
        ):
            problems.append({"field": "session", "message": "must be a shs_ session id"})
        if problems:
            raise errors.ValidationFailed("invalid shell parameters", details=problems)
        return cls(cols, rows, command, user, session, offset)


async def shell_config(state: ModuleState, principal: Principal) -> ShellConfig:
    """The caller's effective ``shell`` module config (tenant, partner, then global)."""
    async with state.db.sessionmaker() as session:
        value = await effective_value(
            session,
            ScaiBunkerConfig,
            "scaibunker",
            principal.tenant_id,
            principal.partner_id,
            "shell",
        )
    return ShellConfig.model_validate(value or {})


class ShellRelay:
    """An opened (or reattached) session whose task runs on the worker; :meth:`run` serves
    a WebSocket with it. Create with :func:`open_shell`."""

    def __init__(
        self,
        state: ModuleState,
        connection: WorkerConnection,
        bunker_id: str,
        owner: str,
        handle: TaskHandle,
        input_stream: OutboundStream,
        output: InboundStream,
        start: dict[str, Any],
    ) -> None:
        self.state = state
        self.connection = connection
        self.bunker_id = bunker_id
        self.owner = owner
        self.handle = handle
        self.input = input_stream
        self.output = output
        self.start = start
        self.session_id = str(start.get("session_id"))
        #: Seconds between activity marks: often enough that even a short idle timeout never
        #: sees a connected shell as idle.
        self.touch_every_s = ACTIVITY_TOUCH_S

    async def run(self, websocket: WebSocket) -> None:
        """Relay until the shell exits, a newer attach takes over, the worker or agent is
        lost, or the client goes away (then the session waits for a reattach)."""
        shells = registry(self.state).connected
        shells[self.bunker_id] = shells.get(self.bunker_id, 0) + 1
        pump_out = asyncio.ensure_future(self._pump_output(websocket))
        pump_in = asyncio.ensure_future(self._pump_input(websocket))
        toucher = asyncio.ensure_future(self._touch_activity())
        gaps = asyncio.ensure_future(self._drain_progress())
        result_task = asyncio.ensure_future(self.handle.result(RESULT_WAIT_S))
        try:
            await websocket.send_text(
                json.dumps(
                    {
                        "type": "session",
                        "session_id": self.session_id,
                        "replayed_bytes": self.start.get("replayed_bytes", 0),
                        "offset": self.start.get("offset", 0),
                    }
                )
            )
            done, _ = await asyncio.wait(
                {result_task, pump_in}, return_when=asyncio.FIRST_COMPLETED
            )
            if result_task not in done:
                # The client left: detach, the session waits for a reattach.
                await self.handle.cancel()
                return
            try:
                result = result_task.result()
            except errors.ScaiGridError as exc:
                log.warning("shell_lost", session_id=self.session_id, code=exc.code)
                await _close(websocket, 1011, json.dumps(exc.to_dict()))
                return
            with contextlib.suppress(TimeoutError, WebSocketDisconnect, RuntimeError, OSError):
                await asyncio.wait_for(pump_out, 10.0)
            if result.get("status") == "exited":
                with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                    await websocket.send_text(
                        json.dumps(
                            {
                                "type": "exit",
                                "exit_code": result.get("exit_code"),
                                "signal": result.get("signal"),
                            }
                        )
                    )
            await _close(websocket, 1000, "")
        except (WebSocketDisconnect, RuntimeError, OSError):
            await self.handle.cancel()
        finally:
            for task in (pump_out, pump_in, toucher, gaps, result_task):
                task.cancel()
            self.input.abandon()
            self.output.close()
            left = shells.get(self.bunker_id, 1) - 1
            if left > 0:
                shells[self.bunker_id] = left
            else:
                shells.pop(self.bunker_id, None)

    async def _drain_progress(self) -> None:
        """Consume the task's progress (gap notices: output the agent's ring buffer dropped
        while this client read too slowly), so it does not pile up for a long session."""
        while True:
            try:
                progress = await self.handle.next_progress(3600.0)
            except errors.AgentUnavailable:
                continue
            if progress is None:
                return
            if progress.get("event") == "gap":
                log.info(
                    "shell_output_dropped",
                    session_id=self.session_id,
                    dropped_bytes=progress.get("dropped_bytes"),
                )

    async def _pump_output(self, websocket: WebSocket) -> None:
        async for chunk in self.output:
            await websocket.send_bytes(chunk)

    async def _pump_input(self, websocket: WebSocket) -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is not None:
                if data:
                    await self.input.write(data)
                continue
            text = message.get("text")
            if text is not None:
                reply = await self._control(text)
                if reply is not None:
                    await websocket.send_text(json.dumps(reply))

    async def _control(self, text: str) -> dict[str, Any] | None:
        """Apply one client text frame; return an ``error`` frame for a bad one."""
        try:
            if len(text) > MAX_TEXT_FRAME_BYTES:
                raise ValueError("text frame too large")
            frame = json.loads(text)
            if not isinstance(frame, dict):
                raise ValueError("a text frame must be a JSON object")
            kind = frame.get("type")
            base = {"session_id": self.session_id, "owner": self.owner}
            if kind == "resize":
                cols, rows = frame.get("cols"), frame.get("rows")
                if not all(
                    isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1000
                    for v in (cols, rows)
                ):
                    raise ValueError("resize needs integer cols and rows from 1 to 1000")
                params = {**base, "cols": cols, "rows": rows}
                await self._call(TaskKind.SHELL_RESIZE, params)
            elif kind == "signal":
                signal = frame.get("signal")
                if not isinstance(signal, str | int) or isinstance(signal, bool):
                    raise ValueError("signal needs a signal name such as SIGINT")
                params = {**base, "signal": signal}
                await self._call(TaskKind.SHELL_SIGNAL, params)
            else:
                raise ValueError(f"unknown frame type {kind!r} (resize or signal)")
        except ValueError as exc:
            return {"type": "error", "code": "VALIDATION_ERROR", "message": str(exc)}
        except errors.ScaiGridError as exc:
            return {"type": "error", "code": exc.code, "message": exc.message}
        return None

    async def _call(self, kind: str, params: dict[str, Any]) -> None:
        await self.connection.call(kind, params, bunker_id=self.bunker_id, timeout_s=CALL_TIMEOUT_S)

    async def _touch_activity(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                async with self.state.db.sessionmaker() as session:
                    await session.execute(
                        update(Bunker)
                        .where(Bunker.id == self.bunker_id)
                        .values(last_activity_at=utcnow())
                    )
                    await session.commit()
            await asyncio.sleep(self.touch_every_s)


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.application_state == WebSocketState.DISCONNECTED:
        return
    with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
        await websocket.close(code=code, reason=reason[:120])


async def open_shell(
    state: ModuleState, bunker: Bunker, principal: Principal, request: ShellRequest
) -> ShellRelay:
    """Open a new session, or reattach to ``request.session``, on the bunker's worker; return
    once the agent has attached (so every refusal comes before the WebSocket upgrade).

    Raises:
        errors.ShellSessionNotFound: the session does not exist (or is not the caller's).
        errors.AgentUnavailable: the worker or agent cannot be reached.
        errors.ValidationFailed: the agent refused the parameters.
    """
    config = await shell_config(state, principal)
    connection = state.hub.require(bunker.worker_id)
    output = connection.open_inbound()
    input_stream = connection.open_outbound()
    params: dict[str, Any] = {
        "session_id": request.session or new_id("shs"),
        "owner": principal.user_id,
        "create": request.session is None,
        "user": request.user,
        "grace_s": config.reconnect_grace_s,
        "buffer_bytes": max(4096, config.replay_buffer_bytes),
    }
    for name in ("cols", "rows", "command", "offset"):
        value = getattr(request, name)
        if value is not None:
            params[name] = value
    try:
        handle = await connection.start_task(
            TaskKind.SHELL_OPEN,
            params,
            bunker_id=bunker.id,
            streams={"input": input_stream.stream_id, "output": output.stream_id},
        )
        while True:
            progress = await handle.next_progress(START_TIMEOUT_S)
            if progress is None:
                await handle.result(START_TIMEOUT_S)
                raise errors.AgentUnavailable("the shell ended before it started")
            if progress.get("event") == "session":
                break
    except BaseException:
        input_stream.abandon()
        output.close()
        raise
    relay = ShellRelay(
        state, connection, bunker.id, principal.user_id, handle, input_stream, output, progress
    )
    if bunker.idle_timeout_s is not None:
        relay.touch_every_s = max(0.5, min(ACTIVITY_TOUCH_S, bunker.idle_timeout_s / 3))
    return relay

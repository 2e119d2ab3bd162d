"""The worker's WebSocket link to the controller (SPEC §10.3-10.5).

The worker always dials out; the controller never connects to a worker. One
:class:`LinkClient` keeps one connection up for the life of the daemon:

1. connect to ``<controller>/v1/modules/scaibunker/workers/connect`` with
   ``Authorization: Bearer <credential or join token>``;
2. send ``register`` and wait for ``registered`` ``{worker_id, credential?,
   heartbeat_interval_s}``; a returned credential is stored (0600) and used from then on;
3. send ``heartbeat`` every ``heartbeat_interval_s`` seconds and dispatch ``task`` /
   ``task_cancel`` / ``stream_credit`` / ``capability_grant`` messages and binary stream
   frames until the link drops (storage capabilities are asked for with
   :meth:`LinkClient.request_capability`);
4. reconnect with exponential backoff (1 s doubling to 30 s, with jitter).

Bunkers keep running while the link is down. Tasks of a dropped connection are
cancelled (their handlers clean up); the controller learns the worker's state from the next
``register``. A 401/403 answer to the connect is final: :class:`LinkAuthRejected` is raised
instead of retrying, since the same secret will be refused again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, NoReturn, Protocol

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from scaigrid.protocol.link import (
    HEARTBEAT_INTERVAL_S,
    MAX_FRAME_PAYLOAD_BYTES,
    MsgType,
    ProtocolViolation,
    StreamMux,
    loads,
)
from scaigrid.worker.link.credentials import load_credential, store_credential
from scaigrid.worker.link.tasks import HandlerSpec, TaskFailed, TaskSession

log = structlog.get_logger(__name__)

_MAX_MESSAGE_BYTES: Final = 4 * MAX_FRAME_PAYLOAD_BYTES
_AUTH_STATUSES: Final = frozenset({401, 403})
_AUTH_CLOSE_CODES: Final = frozenset({4401, 4403})
_CLOSE_TIMEOUT_S: Final = 2.0


class LinkAuthRejected(Exception):
    """The controller refused the worker's credential or join token (HTTP 401/403).

    Fatal: a new join token (and removal of a revoked credential file) is needed.
    """


class LinkConfigError(Exception):
    """The worker has neither a stored credential nor a join token."""


class CapabilityUnavailable(TaskFailed):
    """No storage capability could be had (link down, no answer, or refused)."""


class WorkerStatus(Protocol):
    """What the link reports about the worker."""

    def register_payload(self) -> dict[str, Any]:
        """Fields of ``register`` besides ``type``: ``{hostname, drivers, capacity, labels,
        daemon_version, bunkers, image_cache}``."""
        ...

    def heartbeat_payload(self) -> dict[str, Any]:
        """Fields of ``heartbeat`` besides ``type`` and ``ts``: ``{free, bunkers, image_cache}``."""
        ...


def utc_timestamp() -> str:
    """Current time as RFC 3339 UTC with milliseconds, e.g. ``2026-05-09T12:00:00.123Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LinkClient:
    """Keeps the worker connected to the controller.

    Args:
        url: ``ws://`` or ``wss://`` URL of the controller's worker endpoint.
        credential_path: file holding the ``sbw_`` credential (read at every connect).
        join_token: ``sbj_`` join token, used only while no credential is stored.
        status: source of the ``register`` and ``heartbeat`` contents.
        handlers: handler per task kind.
        backoff_initial_s: first reconnect delay, doubled per failed attempt.
        backoff_max_s: upper bound of the reconnect delay; a connection that stayed up
            this long resets the backoff.
        register_timeout_s: how long to wait for ``registered`` after ``register``.
        open_timeout_s: timeout of the TCP/TLS/WebSocket handshake.
    """

    def __init__(
        self,
        *,
        url: str,
        credential_path: Path,
        join_token: str | None,
        status: WorkerStatus,
        handlers: Mapping[str, HandlerSpec],
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
        register_timeout_s: float = 30.0,
        open_timeout_s: float = 10.0,
    ) -> None:
        self.url = url
        self.worker_id: str | None = None
        self._credential_path = credential_path
        self._join_token = join_token
        self._status = status
        self._handlers = handlers
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._register_timeout_s = register_timeout_s
        self._open_timeout_s = open_timeout_s
        self._mux: StreamMux | None = None
        self._connected = asyncio.Event()
        self._grants: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._grant_ids = itertools.count(1)

    @property
    def connected(self) -> bool:
        """True while a registered connection is up."""
        return self._mux is not None and not self._mux.closed

    async def wait_connected(self) -> None:
        """Wait until a connection is registered."""
        await self._connected.wait()

    async def send_bunker_event(self, bunker_id: str, event: str) -> bool:
        """Send ``bunker_event`` ``{bunker_id, event}`` if connected.

        Returns:
            True if sent. When the link is down the event is dropped (logged): the
            bunker's state in the next ``register``/``heartbeat`` carries the same news.
        """
        mux = self._mux
        if mux is not None and not mux.closed:
            try:
                await mux.send(
                    {"type": MsgType.BUNKER_EVENT, "bunker_id": bunker_id, "event": event}
                )
            except OSError:
                pass
            else:
                return True
        log.info("bunker_event_dropped", bunker_id=bunker_id, event=event, reason="link down")
        return False

    async def request_capability(
        self,
        purpose: str,
        *,
        bunker_id: str | None = None,
        image_id: str | None = None,
        snapshot_id: str | None = None,
        timeout_s: float = 30.0,
    ) -> dict[str, Any]:
        """Ask the controller for a storage capability (``capability_request``, SPEC §10.4).

        Args:
            purpose: ``audit`` (with ``bunker_id``), ``image_artifact`` (with ``image_id``) or
                ``snapshot_layer`` / ``snapshot_manifest`` (with ``snapshot_id``); see
                :mod:`scaigrid.modules.scaibunker.storage.grants`.
            timeout_s: how long to wait for the link to be up and the grant to arrive.

        Returns:
            ``{capability, expires_at, storage_url}`` (``expires_at`` in unix seconds).

        Raises:
            CapabilityUnavailable: the link is down past ``timeout_s``, no grant came, or
                the controller refused (its code and message).
        """
        request_id = f"cap_{next(self._grant_ids)}"
        message: dict[str, Any] = {
            "type": MsgType.CAPABILITY_REQUEST,
            "request_id": request_id,
            "purpose": purpose,
        }
        if bunker_id is not None:
            message["bunker_id"] = bunker_id
        if image_id is not None:
            message["image_id"] = image_id
        if snapshot_id is not None:
            message["snapshot_id"] = snapshot_id
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._grants[request_id] = waiter
        try:
            async with asyncio.timeout(timeout_s):
                await self._connected.wait()
                mux = self._mux
                if mux is None:
                    raise CapabilityUnavailable("OBJECT_STORE_UNAVAILABLE", "link down")
                await mux.send(message)
                grant = await waiter
        except (TimeoutError, OSError) as exc:
            raise CapabilityUnavailable(
                "OBJECT_STORE_UNAVAILABLE", f"no {purpose} capability from the controller"
            ) from exc
        finally:
            self._grants.pop(request_id, None)
        error = grant.get("error")
        if isinstance(error, dict):
            raise CapabilityUnavailable(
                str(error.get("code") or "AUTHZ_PERMISSION_DENIED"), str(error.get("message"))
            )
        return grant

    def _on_grant(self, message: dict[str, Any]) -> None:
        waiter = self._grants.get(str(message.get("request_id")))
        if waiter is not None and not waiter.done():
            waiter.set_result(message)

    async def run(self) -> None:
        """Connect and stay connected until cancelled.

        Raises:
            LinkAuthRejected: the controller answered 401/403 (never retried).
            LinkConfigError: there is no credential and no join token.
        """
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                await self._connect_once()
            except (OSError, TimeoutError, WebSocketException) as exc:
                log.warning("link_connect_failed", url=self.url, error=str(exc) or repr(exc))
            else:
                if time.monotonic() - started >= self._backoff_max_s:
                    attempt = 0
            delay = min(self._backoff_max_s, self._backoff_initial_s * (2**attempt))
            delay = random.uniform(delay / 2, delay)
            attempt = min(attempt + 1, 30)
            log.info("link_reconnect_scheduled", delay_s=round(delay, 3), attempt=attempt)
            await asyncio.sleep(delay)

    def _secret(self) -> tuple[str, str]:
        credential = load_credential(self._credential_path)
        if credential is not None:
            return credential, "credential"
        if self._join_token:
            return self._join_token, "join_token"
        raise LinkConfigError(
            f"no worker credential at {self._credential_path} and no join token; "
            "mint a join token (POST /workers/join-tokens) and pass --join-token"
        )

    async def _connect_once(self) -> None:
        """Run one connection; return when a registered connection ended.

        Raises:
            LinkAuthRejected: 401/403.
            OSError, TimeoutError, WebSocketException: the connection failed or broke before
                it was registered.
        """
        secret, auth = self._secret()
        log.info("link_connecting", url=self.url, auth=auth)
        try:
            async with connect(
                self.url,
                additional_headers={"Authorization": f"Bearer {secret}"},
                proxy=None,
                compression=None,
                max_size=_MAX_MESSAGE_BYTES,
                open_timeout=self._open_timeout_s,
            ) as ws:
                await self._session(ws, auth)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in _AUTH_STATUSES:
                self._reject(auth, f"HTTP {status}")
            raise

    def _reject(self, auth: str, reason: str) -> NoReturn:
        if auth == "credential":
            hint = (
                f"the stored credential in {self._credential_path} was refused (worker "
                "deregistered or credential revoked); remove the file and start again "
                "with a new join token"
            )
        else:
            hint = "the join token was refused (expired, already used or unknown); mint a new one"
        log.error("link_auth_rejected", url=self.url, auth=auth, reason=reason, hint=hint)
        raise LinkAuthRejected(f"{reason}: {hint}")

    async def _session(self, ws: ClientConnection, auth: str) -> None:
        mux = StreamMux(ws.send, ws.send, odd_ids=False)
        try:
            interval = await self._register(ws, mux, auth)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            if code in _AUTH_CLOSE_CODES:
                self._reject(auth, f"close code {code}")
            raise
        session = TaskSession(mux, self._handlers)
        self._mux = mux
        self._connected.set()
        heartbeat = asyncio.create_task(self._heartbeats(mux, interval), name="link-heartbeat")
        try:
            await self._receive(ws, mux, session)
        except asyncio.CancelledError:
            # The daemon is stopping: say so instead of the library's 1011 on cancellation.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                    await ws.close(code=1001, reason="worker stopping")
            raise
        finally:
            self._connected.clear()
            self._mux = None
            heartbeat.cancel()
            mux.close()
            await session.shutdown()
            await asyncio.gather(heartbeat, return_exceptions=True)
            log.info("link_disconnected", worker_id=self.worker_id)

    async def _register(self, ws: ClientConnection, mux: StreamMux, auth: str) -> float:
        await mux.send({"type": MsgType.REGISTER, **self._status.register_payload()})
        async with asyncio.timeout(self._register_timeout_s):
            frame = await ws.recv()
        message = loads(frame)
        if message["type"] != MsgType.REGISTERED or not isinstance(message.get("worker_id"), str):
            raise ProtocolViolation(f"expected registered, got {message['type']}")
        self.worker_id = message["worker_id"]
        credential = message.get("credential")
        if isinstance(credential, str) and credential:
            try:
                store_credential(self._credential_path, credential)
            except OSError as exc:
                log.error(
                    "credential_store_failed",
                    path=str(self._credential_path),
                    error=str(exc),
                    consequence="this worker cannot reconnect after a restart",
                )
                self._join_token = None
            else:
                log.info("credential_stored", path=str(self._credential_path))
        elif auth == "join_token":
            log.warning("registered_without_credential", worker_id=self.worker_id)
        interval = message.get("heartbeat_interval_s")
        if not isinstance(interval, int | float) or interval <= 0:
            interval = HEARTBEAT_INTERVAL_S
        log.info(
            "link_registered", worker_id=self.worker_id, url=self.url, heartbeat_interval_s=interval
        )
        return float(interval)

    async def _heartbeats(self, mux: StreamMux, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                payload = self._status.heartbeat_payload()
            except Exception as exc:
                # Skip the beat rather than report made-up figures; the next one retries.
                log.error("heartbeat_payload_failed", exc_info=exc)
                continue
            message = {"type": MsgType.HEARTBEAT, "ts": utc_timestamp(), **payload}
            try:
                await mux.send(message)
            except OSError:
                return

    async def _receive(
        self,
        ws: ClientConnection,
        mux: StreamMux,
        session: TaskSession,
    ) -> None:
        try:
            async for frame in ws:
                if isinstance(frame, bytes):
                    mux.feed_binary(frame)
                    continue
                message = loads(frame)
                kind = message["type"]
                if kind == MsgType.TASK:
                    session.submit(message)
                elif kind == MsgType.TASK_CANCEL:
                    session.cancel(str(message.get("task_id")))
                elif kind == MsgType.STREAM_CREDIT:
                    mux.feed_credit(message)
                elif kind == MsgType.CAPABILITY_GRANT:
                    self._on_grant(message)
                else:
                    log.debug("link_message_ignored", type=kind)
        except ProtocolViolation as exc:
            log.warning("link_protocol_violation", error=str(exc))
            await ws.close(code=1002, reason="protocol violation")
        except ConnectionClosed as exc:
            log.info("link_closed", code=exc.rcvd.code if exc.rcvd else None)

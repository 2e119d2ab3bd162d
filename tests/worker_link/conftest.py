"""A small WebSocket server standing in for the controller's worker endpoint.

It speaks the real channel protocol (``scaigrid.protocol.link``) on 127.0.0.1: checks the
bearer secret during the HTTP upgrade (401 when unknown), answers ``register`` with
``registered`` (handing out an ``sbw_`` credential for a join token, which it consumes), and
records every message and stream frame the worker sends. Tests drive it like a controller:
send tasks, return (or withhold) stream credit, drop the connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from scaigrid.ids import new_id, new_secret
from scaigrid.protocol.link import (
    MAX_FRAME_PAYLOAD_BYTES,
    STREAM_WINDOW_BYTES,
    decode_frame,
    dumps,
    encode_frame,
    loads,
)
from scaigrid.worker.link.client import LinkClient
from scaigrid.worker.link.tasks import HandlerSpec

CONNECT_PATH = "/v1/modules/scaibunker/workers/connect"


class StubConnection:
    """One worker connection as the stub controller sees it."""

    def __init__(
        self, ws: ServerConnection, authorization: str | None, *, auto_credit: bool
    ) -> None:
        self.ws = ws
        self.authorization = authorization
        self.auto_credit = auto_credit
        self.hold_credit: set[int] = set()
        self.register: dict[str, Any] | None = None
        self.worker_id: str | None = None
        self._queues: dict[str, asyncio.Queue[dict[str, Any]]] = collections.defaultdict(
            asyncio.Queue
        )
        self._stash: dict[tuple[str, str], collections.deque[dict[str, Any]]] = (
            collections.defaultdict(collections.deque)
        )
        self.granted: dict[int, int] = collections.defaultdict(int)
        self._sent: dict[int, int] = collections.defaultdict(int)
        self._granted_event = asyncio.Event()
        self._stash_changed = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self.streams: dict[int, bytearray] = collections.defaultdict(bytearray)
        self.eof: set[int] = set()
        self._stream_changed = asyncio.Event()
        self.closed = asyncio.Event()
        self._next_stream_id = 1

    def allocate_stream(self) -> int:
        """Return a fresh odd (controller-side) stream id."""
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        return stream_id

    def _deliver(self, frame: str | bytes) -> None:
        if isinstance(frame, bytes):
            stream_id, payload = decode_frame(frame)
            if payload:
                self.streams[stream_id] += payload
                if self.auto_credit and stream_id not in self.hold_credit:
                    grant = asyncio.ensure_future(self.credit(stream_id, len(payload)))
                    self._background.add(grant)
                    grant.add_done_callback(self._background.discard)
            else:
                self.eof.add(stream_id)
            self._stream_changed.set()
            return
        message = loads(frame)
        if message["type"] == "stream_credit":
            self.granted[message["stream_id"]] += message["bytes"]
            self._granted_event.set()
            return
        self._queues[message["type"]].put_nowait(message)
        if "task_id" in message:
            self._stash[(message["type"], message["task_id"])].append(message)
            self._stash_changed.set()

    async def next(self, msg_type: str, timeout: float = 5.0) -> dict[str, Any]:
        """Return the next message of ``msg_type`` the worker sent."""
        async with asyncio.timeout(timeout):
            return await self._queues[msg_type].get()

    async def next_for(self, msg_type: str, task_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """Return the next message of ``msg_type`` for ``task_id``.

        A view separate from :meth:`next`: a test uses one or the other for task messages.
        """
        stash = self._stash[(msg_type, task_id)]
        async with asyncio.timeout(timeout):
            while not stash:
                self._stash_changed.clear()
                await self._stash_changed.wait()
            return stash.popleft()

    async def fresh(self, msg_type: str, timeout: float = 5.0) -> dict[str, Any]:
        """Drop the queued messages of ``msg_type`` and return the next one to arrive."""
        queue = self._queues[msg_type]
        while not queue.empty():
            queue.get_nowait()
        return await self.next(msg_type, timeout)

    def pending_for(self, msg_type: str, task_id: str) -> int:
        """Number of received messages of ``msg_type`` for ``task_id`` not yet taken."""
        return len(self._stash[(msg_type, task_id)])

    def pending(self, msg_type: str) -> int:
        """Number of received, not yet consumed messages of ``msg_type``."""
        return self._queues[msg_type].qsize()

    async def wait_stream(
        self, stream_id: int, predicate: Callable[[bytes, bool], bool], timeout: float = 5.0
    ) -> bytes:
        """Wait until ``predicate(bytes_so_far, eof)`` holds for ``stream_id``; return the bytes."""
        async with asyncio.timeout(timeout):
            while True:
                data = bytes(self.streams[stream_id])
                if predicate(data, stream_id in self.eof):
                    return data
                self._stream_changed.clear()
                await self._stream_changed.wait()

    async def send(self, message: dict[str, Any]) -> None:
        """Send one JSON message to the worker."""
        await self.ws.send(dumps(message))

    async def send_stream(self, stream_id: int, payload: bytes) -> None:
        """Send one binary frame (``b""`` = EOF) to the worker."""
        await self.ws.send(encode_frame(stream_id, payload))

    async def send_body(self, stream_id: int, data: bytes, chunk_bytes: int = 200_000) -> None:
        """Send ``data`` then EOF on ``stream_id``, never beyond the worker's credit."""
        view = memoryview(data)
        while view:
            while (
                available := STREAM_WINDOW_BYTES + self.granted[stream_id] - self._sent[stream_id]
            ) <= 0:
                self._granted_event.clear()
                await self._granted_event.wait()
            size = min(available, chunk_bytes, MAX_FRAME_PAYLOAD_BYTES, len(view))
            await self.send_stream(stream_id, bytes(view[:size]))
            self._sent[stream_id] += size
            view = view[size:]
        await self.send_stream(stream_id, b"")

    async def release(self, stream_id: int) -> None:
        """Stop holding back credit on ``stream_id`` and return what was held."""
        self.hold_credit.discard(stream_id)
        await self.credit(stream_id, max(len(self.streams[stream_id]), 1))

    async def credit(self, stream_id: int, nbytes: int) -> None:
        """Return ``nbytes`` of credit on a worker → controller stream."""
        await self.send({"type": "stream_credit", "stream_id": stream_id, "bytes": nbytes})

    async def task(
        self,
        kind: str,
        params: Mapping[str, Any] | None = None,
        *,
        bunker_id: str | None = None,
        streams: Mapping[str, int] | None = None,
        task_id: str | None = None,
    ) -> str:
        """Send a ``task``; return its id."""
        task_id = task_id or new_id("req")
        message: dict[str, Any] = {
            "type": "task",
            "task_id": task_id,
            "kind": kind,
            "params": dict(params or {}),
        }
        if bunker_id is not None:
            message["bunker_id"] = bunker_id
        if streams:
            message["streams"] = dict(streams)
        await self.send(message)
        return task_id

    async def drop(self) -> None:
        """Close the connection from the controller side."""
        await self.ws.close(code=1012, reason="controller restart")
        await self.closed.wait()


class ControllerStub:
    """The stand-in controller endpoint; see the module docstring."""

    def __init__(self, heartbeat_interval_s: float = 5.0, *, auto_credit: bool = False) -> None:
        self.heartbeat_interval_s = heartbeat_interval_s
        self.auto_credit = auto_credit
        self.join_tokens: set[str] = set()
        self.credentials: set[str] = set()
        self.refuse_with: list[int] = []
        self.attempts: list[tuple[float, str | None]] = []
        self.connections: list[StubConnection] = []
        self._connected: asyncio.Queue[StubConnection] = asyncio.Queue()
        self._server: Server | None = None
        self.worker_id = new_id("wrk")

    @property
    def url(self) -> str:
        """``ws://`` URL of the worker endpoint."""
        assert self._server is not None
        port = next(iter(self._server.sockets)).getsockname()[1]
        return f"ws://127.0.0.1:{port}{CONNECT_PATH}"

    @property
    def http_url(self) -> str:
        """Base ``http://`` URL, as a worker is configured with."""
        return self.url.replace("ws://", "http://").removesuffix(CONNECT_PATH)

    def new_join_token(self) -> str:
        """Mint a one-use join token."""
        token = new_secret("sbj")
        self.join_tokens.add(token)
        return token

    async def start(self) -> None:
        """Listen on 127.0.0.1 on a free port."""
        self._server = await serve(
            self._handle, "127.0.0.1", 0, process_request=self._check, compression=None
        )

    async def stop(self) -> None:
        """Close the listener and every connection."""
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def next_connection(self, timeout: float = 5.0) -> StubConnection:
        """Return the next registered worker connection."""
        async with asyncio.timeout(timeout):
            return await self._connected.get()

    def _check(self, connection: ServerConnection, request: Request) -> Response | None:
        authorization = request.headers.get("Authorization")
        self.attempts.append((time.monotonic(), authorization))
        if request.path != CONNECT_PATH:
            return connection.respond(404, "not found\n")
        if self.refuse_with:
            return connection.respond(self.refuse_with.pop(0), "refused by test\n")
        secret = (authorization or "").removeprefix("Bearer ")
        if secret not in self.join_tokens and secret not in self.credentials:
            return connection.respond(401, "AUTH_TOKEN_INVALID\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        authorization = ws.request.headers.get("Authorization") if ws.request else None
        secret = (authorization or "").removeprefix("Bearer ")
        conn = StubConnection(ws, authorization, auto_credit=self.auto_credit)
        try:
            conn.register = loads(await ws.recv())
            assert conn.register["type"] == "register"
            registered: dict[str, Any] = {
                "type": "registered",
                "worker_id": self.worker_id,
                "heartbeat_interval_s": self.heartbeat_interval_s,
            }
            if secret in self.join_tokens:
                self.join_tokens.discard(secret)
                credential = new_secret("sbw", 36)
                self.credentials.add(credential)
                registered["credential"] = credential
            conn.worker_id = self.worker_id
            await ws.send(dumps(registered))
            self.connections.append(conn)
            self._connected.put_nowait(conn)
            async for frame in ws:
                conn._deliver(frame)
        except ConnectionClosed:
            pass
        finally:
            conn.closed.set()


class StaticStatus:
    """A :class:`~scaigrid.worker.link.client.WorkerStatus` with fixed contents."""

    def __init__(self) -> None:
        self.bunkers: list[dict[str, Any]] = []

    def register_payload(self) -> dict[str, Any]:
        return {
            "hostname": "test-worker",
            "drivers": [{"name": "container", "isolation": "container", "accel": None}],
            "capacity": {
                "cpu_millicores": 2000,
                "memory_mb": 4096,
                "disk_mb": 10240,
                "gpu_count": 0,
                "gpu_type": None,
            },
            "labels": {"zone": "test"},
            "daemon_version": "0.0.0",
            "bunkers": list(self.bunkers),
            "image_cache": [],
        }

    def heartbeat_payload(self) -> dict[str, Any]:
        return {
            "free": {"cpu_millicores": 2000, "memory_mb": 4096, "disk_mb": 10240, "gpu_count": 0},
            "bunkers": list(self.bunkers),
            "image_cache": [],
        }


@pytest.fixture
async def controller() -> AsyncIterator[ControllerStub]:
    stub = ControllerStub()
    await stub.start()
    try:
        yield stub
    finally:
        await stub.stop()


LinkStarter = Callable[..., tuple[LinkClient, "asyncio.Task[None]"]]


@pytest.fixture
async def start_link(tmp_path: Path, controller: ControllerStub) -> AsyncIterator[LinkStarter]:
    """Start :class:`LinkClient` instances against the stub; cancels them at teardown."""
    running: list[asyncio.Task[None]] = []

    def _start(
        handlers: Mapping[str, HandlerSpec] | None = None,
        *,
        join_token: str | None = None,
        data_dir: Path | None = None,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 0.2,
    ) -> tuple[LinkClient, asyncio.Task[None]]:
        link = LinkClient(
            url=controller.url,
            credential_path=(data_dir or tmp_path) / "credential",
            join_token=join_token,
            status=StaticStatus(),
            handlers=handlers or {},
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
        )
        task = asyncio.create_task(link.run())
        running.append(task)
        return link, task

    yield _start
    for task in running:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task

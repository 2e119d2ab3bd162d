"""The worker channel: one WebSocket between a worker and the controller (SPEC §10.3-10.4).

Wire format
-----------
* **Text frames** carry JSON messages ``{"type": ..., ...}`` (:class:`MsgType` lists them).
* **Binary frames** carry byte streams: an 8-byte big-endian stream id followed by the
  payload. An empty payload ends the stream (EOF).
* Every stream has credit-based flow control: the sender starts with
  :data:`STREAM_WINDOW_BYTES` of credit and may send only that many bytes before the
  receiver returns credit with ``{"type": "stream_credit", "stream_id", "bytes"}``. A receiver
  returns credit as its consumer actually reads, so one slow consumer cannot starve the
  channel and no hop buffers more than one window per stream. A receiver whose consumer
  has taken a whole window and then waits for more (the window, not the consumer, holds the
  sender back) widens the window to :data:`RECEIVE_WINDOW_BYTES` by granting the difference
  at once: 1 MiB is ~3 ms of a fast transfer, shorter than a scheduling delay on a busy
  host. A slow consumer never widens its window; a peer that does not widen keeps 1 MiB.
* Stream ids are allocated by the side that names them in a message: the controller uses odd
  ids, the worker even ids, so the two never collide.

Tasks
-----
The controller sends ``task`` ``{task_id, kind, bunker_id?, params, streams?}``; the worker
answers ``task_ack``, zero or more ``task_progress`` ``{task_id, progress}`` and one
``task_result`` ``{task_id, ok, result?, error?}`` where ``error`` is
``{code, message, details?}`` with a SPEC error code. ``streams`` maps role names
(``"stdin"``, ``"stdout"``, ``"stderr"``, ``"body"``) to stream ids.
"""

from __future__ import annotations

import asyncio
import collections
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

PROTOCOL_VERSION: Final = 1
STREAM_WINDOW_BYTES: Final = 1 << 20
#: The window a receiver widens a stream to once its consumer keeps up (see above).
RECEIVE_WINDOW_BYTES: Final = 8 << 20
MAX_FRAME_PAYLOAD_BYTES: Final = 256 * 1024
HEARTBEAT_INTERVAL_S: Final = 5
#: Largest JSON message either side accepts; a worker answers a task whose result would be
#: larger with an error instead (a bigger message would drop the whole channel).
MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
#: Credit is returned in grants of a quarter of the window, at most this size (fewer,
#: larger messages on a fast stream).
_CREDIT_GRANT_BYTES: Final = RECEIVE_WINDOW_BYTES // 8
_HEADER = struct.Struct(">Q")


class MsgType:
    """Names of the JSON messages on the worker channel (SPEC §10.4)."""

    REGISTER = "register"
    REGISTERED = "registered"
    HEARTBEAT = "heartbeat"
    TASK = "task"
    TASK_ACK = "task_ack"
    TASK_PROGRESS = "task_progress"
    TASK_RESULT = "task_result"
    TASK_CANCEL = "task_cancel"
    BUNKER_EVENT = "bunker_event"
    STREAM_CREDIT = "stream_credit"
    CAPABILITY_REQUEST = "capability_request"
    CAPABILITY_GRANT = "capability_grant"


class TaskKind:
    """Task kinds the controller sends (SPEC §10.4); the skeleton implements these."""

    BUNKER_CREATE = "bunker.create"
    BUNKER_DESTROY = "bunker.destroy"
    BUNKER_PAUSE = "bunker.pause"
    BUNKER_RESUME = "bunker.resume"
    BUNKER_SNAPSHOT = "bunker.snapshot"
    IMAGE_BAKE = "image.bake"
    IMAGE_SCAN = "image.scan"
    IMAGE_EVICT = "image.evict"
    EXEC_START = "exec.start"
    FILES_WRITE = "files.write"
    FILES_READ = "files.read"
    FILES_LIST = "files.list"
    FILES_STAT = "files.stat"
    FILES_DELETE = "files.delete"
    FILES_MKDIR = "files.mkdir"
    FILES_MOVE = "files.move"
    FILES_ARCHIVE_READ = "files.archive_read"
    FILES_ARCHIVE_WRITE = "files.archive_write"
    EXEC_BACKGROUND = "exec.background"
    PROCESS_LIST = "process.list"
    PROCESS_GET = "process.get"
    PROCESS_OUTPUT = "process.output"
    PROCESS_SIGNAL = "process.signal"
    PROCESS_STDIN = "process.stdin"
    PROCESS_FOLLOW = "process.follow"
    BRIDGE_CREATE = "bridge.create"
    BRIDGE_DELETE = "bridge.delete"
    BRIDGE_LIST = "bridge.list"
    SHELL_OPEN = "shell.open"
    SHELL_RESIZE = "shell.resize"
    SHELL_SIGNAL = "shell.signal"
    SHELL_CLOSE = "shell.close"
    SHELL_LIST = "shell.list"


class LinkClosed(ConnectionError):
    """The channel closed (or broke the protocol) while a stream or task still needed it."""


class ProtocolViolation(LinkClosed):
    """The peer broke the channel protocol (bad frame, credit overrun); the link is dropped."""


def encode_frame(stream_id: int, payload: bytes | memoryview) -> bytes:
    """Return a binary frame: 8-byte big-endian ``stream_id`` + ``payload``."""
    return b"".join((_HEADER.pack(stream_id), payload))


def decode_frame(frame: bytes) -> tuple[int, bytes]:
    """Split a binary frame into ``(stream_id, payload)``.

    Raises:
        ProtocolViolation: the frame is shorter than its 8-byte header.
    """
    if len(frame) < _HEADER.size:
        raise ProtocolViolation("binary frame shorter than its stream id")
    (stream_id,) = _HEADER.unpack_from(frame)
    return stream_id, frame[_HEADER.size :]


def dumps(message: dict[str, Any]) -> str:
    """Encode a channel message as compact JSON."""
    return json.dumps(message, separators=(",", ":"))


def loads(text: str | bytes) -> dict[str, Any]:
    """Decode a channel message.

    Raises:
        ProtocolViolation: not a JSON object with a string ``type``.
    """
    try:
        message = json.loads(text)
    except ValueError as exc:
        raise ProtocolViolation("text frame is not JSON") from exc
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolViolation("text frame is not a typed message")
    return message


SendText = Callable[[str], Awaitable[None]]
SendBytes = Callable[[bytes], Awaitable[None]]


class InboundStream:
    """Bytes arriving on one stream; returns credit to the sender as they are read."""

    def __init__(self, mux: StreamMux, stream_id: int) -> None:
        self.stream_id = stream_id
        self._mux = mux
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._unacked = 0
        self._taken = 0
        self._window = STREAM_WINDOW_BYTES
        self._eof = False
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def _feed(self, payload: bytes) -> None:
        if self._eof:
            raise ProtocolViolation(f"data after end of stream {self.stream_id}")
        if not payload:
            self._eof = True
        else:
            self._buffered += len(payload)
            if self._buffered > self._window:
                raise ProtocolViolation(f"stream {self.stream_id} overran its credit")
            self._chunks.append(payload)
        self._ready.set()

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self._ready.set()

    async def read(self) -> bytes:
        """Return the next chunk, or ``b""`` at the end of the stream.

        Raises:
            LinkClosed: the channel closed before the stream ended.
        """
        while not self._chunks:
            if self._eof:
                return b""
            if self._error is not None:
                raise LinkClosed(str(self._error)) from self._error
            if self._window < RECEIVE_WINDOW_BYTES and self._taken >= STREAM_WINDOW_BYTES:
                # The consumer has caught up with the sender, which the window holds back:
                # widen it. A consumer slower than the sender never gets here.
                self._unacked += RECEIVE_WINDOW_BYTES - self._window
                self._window = RECEIVE_WINDOW_BYTES
                granted, self._unacked = self._unacked, 0
                await self._mux.send_credit(self.stream_id, granted)
                continue
            self._ready.clear()
            await self._ready.wait()
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        self._taken += len(chunk)
        self._unacked += len(chunk)
        if self._unacked >= min(self._window // 4, _CREDIT_GRANT_BYTES):
            granted, self._unacked = self._unacked, 0
            await self._mux.send_credit(self.stream_id, granted)
        return chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        """Yield chunks until the end of the stream."""
        while chunk := await self.read():
            yield chunk

    def close(self) -> None:
        """Stop receiving: later frames for this id are dropped."""
        self._mux._inbound.pop(self.stream_id, None)


class OutboundStream:
    """Bytes sent on one stream, never more than the receiver's credit allows."""

    def __init__(self, mux: StreamMux, stream_id: int) -> None:
        self.stream_id = stream_id
        self._mux = mux
        self._credit = STREAM_WINDOW_BYTES
        self._credit_event = asyncio.Event()
        self._closed = False
        self._error: BaseException | None = None

    def _grant(self, nbytes: int) -> None:
        self._credit += nbytes
        self._credit_event.set()

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self._credit_event.set()

    async def write(self, data: bytes) -> None:
        """Send ``data``, waiting for credit as needed.

        Raises:
            LinkClosed: the channel closed before all of ``data`` was sent.
        """
        view = memoryview(data)
        while view:
            while self._credit <= 0:
                if self._error is not None:
                    raise LinkClosed(str(self._error)) from self._error
                self._credit_event.clear()
                await self._credit_event.wait()
            if self._error is not None:
                raise LinkClosed(str(self._error)) from self._error
            size = min(len(view), self._credit, MAX_FRAME_PAYLOAD_BYTES)
            self._credit -= size
            # A chunk that fits one frame is sent as it is (no copy of the payload).
            payload = data if size == len(data) and isinstance(data, bytes) else view[:size]
            await self._mux.send_frame(self.stream_id, payload)
            view = view[size:]

    async def end(self) -> None:
        """Send the end-of-stream marker (idempotent) and forget the stream."""
        if self._closed:
            return
        self._closed = True
        self._mux._outbound.pop(self.stream_id, None)
        await self._mux.send_frame(self.stream_id, b"")

    def abandon(self) -> None:
        """Forget the stream without sending EOF (its task failed or was cancelled)."""
        self._closed = True
        self._mux._outbound.pop(self.stream_id, None)


class StreamMux:
    """Multiplexes flow-controlled byte streams and JSON messages over one channel.

    Args:
        send_text: coroutine sending one text frame.
        send_bytes: coroutine sending one binary frame.
        odd_ids: True on the controller (allocates odd stream ids), False on the worker.

    All sends are serialised, so callers may use the mux from many tasks at once.
    """

    def __init__(self, send_text: SendText, send_bytes: SendBytes, *, odd_ids: bool) -> None:
        self._send_text = send_text
        self._send_bytes = send_bytes
        self._next_id = 1 if odd_ids else 2
        self._inbound: dict[int, InboundStream] = {}
        self._outbound: dict[int, OutboundStream] = {}
        self._lock = asyncio.Lock()
        self._closed: BaseException | None = None

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed is not None

    def allocate(self) -> int:
        """Return a fresh stream id of this side's parity."""
        stream_id = self._next_id
        self._next_id += 2
        return stream_id

    def inbound(self, stream_id: int) -> InboundStream:
        """Register and return a stream this side will receive on."""
        stream = InboundStream(self, stream_id)
        if self._closed is not None:
            stream._fail(self._closed)
        self._inbound[stream_id] = stream
        return stream

    def outbound(self, stream_id: int) -> OutboundStream:
        """Register and return a stream this side will send on."""
        stream = OutboundStream(self, stream_id)
        if self._closed is not None:
            stream._fail(self._closed)
        self._outbound[stream_id] = stream
        return stream

    async def send(self, message: dict[str, Any]) -> None:
        """Send one JSON message.

        Raises:
            LinkClosed: the channel is closed.
        """
        await self._send(self._send_text, dumps(message))

    async def send_frame(self, stream_id: int, payload: bytes | memoryview) -> None:
        """Send one binary frame (callers normally use :class:`OutboundStream`)."""
        await self._send(self._send_bytes, encode_frame(stream_id, payload))

    async def send_credit(self, stream_id: int, nbytes: int) -> None:
        """Return ``nbytes`` of credit for an inbound stream; ignored once closed."""
        if self._closed is None:
            await self.send(
                {"type": MsgType.STREAM_CREDIT, "stream_id": stream_id, "bytes": nbytes}
            )

    async def _send(self, sender: Callable[[Any], Awaitable[None]], frame: str | bytes) -> None:
        if self._closed is not None:
            raise LinkClosed(str(self._closed))
        async with self._lock:
            try:
                await sender(frame)
            except Exception as exc:
                self.close(exc)
                raise LinkClosed(str(exc)) from exc

    def feed_binary(self, frame: bytes) -> None:
        """Dispatch a received binary frame to its stream (unknown ids are dropped).

        Raises:
            ProtocolViolation: malformed frame or credit overrun; drop the link.
        """
        stream_id, payload = decode_frame(frame)
        stream = self._inbound.get(stream_id)
        if stream is None:
            return
        stream._feed(payload)
        if not payload:
            self._inbound.pop(stream_id, None)

    def feed_credit(self, message: dict[str, Any]) -> None:
        """Apply a received ``stream_credit`` message.

        Raises:
            ProtocolViolation: the message is malformed.
        """
        stream_id, nbytes = message.get("stream_id"), message.get("bytes")
        if not isinstance(stream_id, int) or not isinstance(nbytes, int) or nbytes <= 0:
            raise ProtocolViolation("malformed stream_credit")
        stream = self._outbound.get(stream_id)
        if stream is not None:
            stream._grant(nbytes)

    def close(self, exc: BaseException | None = None) -> None:
        """Fail every open stream with :class:`LinkClosed` (idempotent)."""
        if self._closed is not None:
            return
        self._closed = exc or LinkClosed("worker channel closed")
        for inbound in self._inbound.values():
            inbound._fail(self._closed)
        for outbound in self._outbound.values():
            outbound._fail(self._closed)
        self._inbound.clear()
        self._outbound.clear()


def error_payload(code: str, message: str, details: Any = None) -> dict[str, Any]:
    """Build the ``error`` object of a failed ``task_result``."""
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return error

"""Worker ↔ guest agent protocol: HTTP/2 (``h2``) over one reliable byte stream.

This module is the contract between the worker (HTTP/2 client, :class:`AgentClient`)
and the in-bunker agent (HTTP/2 server, :class:`AgentRouter`). It is shared by both
and must stay import-light: stdlib plus ``h2`` (and its ``hpack``/``hyperframe``) only,
because it runs inside every bunker from the agent's self-contained runtime.

Transport
    One ordered, reliable byte stream (a unix socket for containers; virtio-serial or
    vsock for VMs). HTTP/2 with prior knowledge, no TLS, no ALPN. Nothing else about the
    transport is assumed. Concurrent operations are HTTP/2 streams; each direction of
    each stream is flow controlled, and received data is acknowledged (the window
    reopened) only once the consumer has taken it, so a slow consumer slows its producer
    and nothing else.

Request
    ``:method`` and ``:path`` (``/v1/...``, no query string) name the operation; header
    ``x-args`` holds the operation's parameters as compact JSON (an object, ASCII,
    at most :data:`MAX_ARGS_BYTES`); the request body holds raw bytes for
    operations that take them (exec stdin, file content) and is empty otherwise.

Success
    ``:status 200``. A small result is the whole body as JSON
    (``content-type: application/json``). A streaming operation sends its bytes as the
    body and its JSON end result in the trailer ``x-result``. Operation metadata that is
    known before the body may come in response headers (``x-start``, ``x-meta``).

Failure
    ``4xx``/``5xx`` with a JSON body ``{"code", "message", "details"?}`` where ``code``
    is a SPEC §1.5 error code (``VALIDATION_ERROR``, ``FILE_NOT_FOUND``,
    ``FILE_CONFLICT``, ``FILE_ACCESS_DENIED``, ``BUNKER_DISK_FULL``,
    ``PROCESS_NOT_FOUND``, ``PROCESS_NOT_RUNNING``, ...; the status for each is in
    :data:`ERROR_STATUS`). A failure after the response has started is a stream reset
    (``RST_STREAM INTERNAL_ERROR``), seen by the client as :class:`AgentStreamReset`.
    A server that has answered completely before the request body ended resets the
    stream with ``NO_ERROR`` (RFC 9113 §8.1) to stop the upload.

Exec output
    The exec response body (and ``/v1/processes/{id}/output`` with ``follow``) is a
    sequence of records ``[1 byte channel][4 bytes big-endian length][payload]``:
    channel 1 = stdout bytes, 2 = stderr bytes, 3 = gap: a JSON payload
    ``{"stream", "offset", "dropped_bytes"}`` saying that the agent's ring buffer
    overwrote ``dropped_bytes`` of that stream before they could be sent, and that the
    next bytes of the stream start at byte ``offset``. The response header ``x-start``
    carries ``{"exec_id", "pid"}``; the trailer ``x-result`` carries the end result.
    A record's payload is at most :data:`MAX_RECORD_BYTES`.

Operations (agent side: :mod:`scaigrid.agent.routes`)
    ``GET /v1/ping``, ``POST /v1/exec``, ``GET /v1/processes``,
    ``GET /v1/processes/{id}``, ``GET /v1/processes/{id}/output``,
    ``POST /v1/processes/{id}/signal``, ``PUT|GET|DELETE /v1/files``,
    ``GET /v1/files/list``, ``GET /v1/files/stat``, ``POST /v1/files/mkdir``,
    ``POST /v1/files/move``, ``POST /v1/shell`` (a bidirectional PTY stream: the request
    body is terminal input, the response exec records of output), ``GET /v1/shells``,
    ``POST /v1/shells/{id}/resize``, ``POST /v1/shells/{id}/signal``,
    ``DELETE /v1/shells/{id}`` (see :mod:`scaigrid.agent.shell_routes`).

Spec followed: RFC 9113 (HTTP/2); SPEC.md §3 (exec) and §4 (files) for the operations.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
import hyperframe.frame

PROTOCOL_VERSION = 1

CHANNEL_STDOUT = 1
CHANNEL_STDERR = 2
CHANNEL_GAP = 3
CHANNEL_NAMES = {CHANNEL_STDOUT: "stdout", CHANNEL_STDERR: "stderr", CHANNEL_GAP: "gap"}
RECORD_HEADER = struct.Struct(">BI")
MAX_RECORD_BYTES = 1 << 20

#: Per-stream receive window each side advertises (bytes buffered per stream at most): a
#: few milliseconds of a fast transfer, so a busy peer does not stall the stream.
STREAM_WINDOW_BYTES = 4 << 20
#: Connection receive window; large so that stalled streams never starve the others.
CONNECTION_WINDOW_BYTES = (1 << 31) - 1
#: Largest DATA frame each side accepts: a quarter of the per-frame work (events, flushes,
#: copies) that 64 KiB frames cost; 1 MiB frames measured slower (more system time).
MAX_FRAME_BYTES = 1 << 18
MAX_CONCURRENT_STREAMS = 1024
MAX_HEADER_LIST_BYTES = 1 << 20
#: Largest ``x-args`` JSON a request may carry (it must fit the header list).
MAX_ARGS_BYTES = MAX_HEADER_LIST_BYTES - 4096
#: Largest JSON body :meth:`AgentResponse.json` accepts.
MAX_JSON_BODY_BYTES = 64 << 20
_READ_BYTES = 256 * 1024
_WRITE_BUFFER_BYTES = 2 * MAX_FRAME_BYTES
_DEFAULT_WINDOW = 65535


def _data_frame_body_repr(self: hyperframe.frame.DataFrame) -> str:
    return f"data=<{len(self.data)} bytes>"


# h2 formats every frame it receives for a trace log, enabled or not, and hyperframe's
# repr of a DATA frame re-serialises (copies) the whole payload to show its first bytes:
# about a tenth of the worker's CPU during a download. Show the length instead.
hyperframe.frame.DataFrame._body_repr = _data_frame_body_repr  # type: ignore[method-assign,assignment]

#: HTTP status the agent answers for each error code (SPEC §1.5).
ERROR_STATUS: dict[str, int] = {
    "VALIDATION_ERROR": 422,
    "NOT_FOUND": 404,
    "PROCESS_NOT_FOUND": 404,
    "PROCESS_NOT_RUNNING": 409,
    "STDIN_CLOSED": 409,
    "FILE_NOT_FOUND": 404,
    "FILE_CONFLICT": 409,
    "FILE_ACCESS_DENIED": 403,
    "BUNKER_DISK_FULL": 507,
    "SHELL_SESSION_NOT_FOUND": 404,
    "INTERNAL_ERROR": 500,
}

_log = logging.getLogger(__name__)


class AgentError(Exception):
    """An operation failed with a SPEC error code.

    Raised by :meth:`AgentClient.request` for a 4xx/5xx response, and raised by agent
    handlers to produce one.

    Attributes:
        code: SPEC §1.5 error code, e.g. ``"FILE_NOT_FOUND"``.
        message: human-readable text (branch on ``code``, never on this).
        details: optional structured details (JSON value) or ``None``.
        status: HTTP status of the response (default from :data:`ERROR_STATUS`).
    """

    def __init__(
        self, code: str, message: str, details: Any = None, *, status: int | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details
        self.status = status if status is not None else ERROR_STATUS.get(code, 500)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON error body ``{"code", "message", "details"?}``."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return body


class AgentConnectionLost(Exception):
    """The byte stream closed, the peer broke the protocol, or a stream was reset."""


class AgentStreamReset(AgentConnectionLost):
    """One HTTP/2 stream was reset by the peer; the connection itself may be fine.

    Attributes:
        error_code: the RST_STREAM error code (RFC 9113 §7).
    """

    def __init__(self, stream_id: int, error_code: int) -> None:
        super().__init__(f"stream {stream_id} reset by peer (error code {error_code})")
        self.error_code = error_code


def dumps(value: Any) -> str:
    """Compact, ASCII-only JSON as used in ``x-*`` headers and JSON bodies."""
    return json.dumps(value, separators=(",", ":"))


def encode_record(channel: int, payload: bytes) -> bytes:
    """Frame one exec-output record ``[channel][u32 BE length][payload]``."""
    return RECORD_HEADER.pack(channel, len(payload)) + payload


class RecordDecoder:
    """Incremental parser of exec-output records from arbitrary body chunks."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add bytes; return the complete ``(channel, payload)`` records now available.

        Raises:
            ValueError: a record announces more than :data:`MAX_RECORD_BYTES` or an
                unknown channel.
        """
        self._buf += data
        records: list[tuple[int, bytes]] = []
        pos = 0
        while len(self._buf) - pos >= RECORD_HEADER.size:
            channel, length = RECORD_HEADER.unpack_from(self._buf, pos)
            if channel not in CHANNEL_NAMES or length > MAX_RECORD_BYTES:
                raise ValueError(f"malformed exec record (channel {channel}, length {length})")
            end = pos + RECORD_HEADER.size + length
            if end > len(self._buf):
                break
            records.append((channel, bytes(self._buf[pos + RECORD_HEADER.size : end])))
            pos = end
        del self._buf[:pos]
        return records

    @property
    def pending(self) -> int:
        """Bytes of an incomplete record held back."""
        return len(self._buf)


class _PlainEncoder(hpack.Encoder):
    """HPACK encoder without Huffman coding.

    hpack's pure-Python Huffman encoder is quadratic in the value length (a 300 KB
    ``x-args`` takes ~17 s to encode, ~0.004 s plain); on a local byte stream the ~20%
    it would save is worth nothing. Decoding either form stays cheap.
    """

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return bytes(super().encode(headers, huffman=False))


class _Stream:
    """Per-stream state shared by the reader loop and the stream's owner."""

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.headers: list[tuple[str, str]] | None = None
        self.trailers: list[tuple[str, str]] | None = None
        self.chunks: deque[tuple[bytes, int]] = deque()
        self.ended = False
        self.sent_end = False
        self.reset_code: int | None = None
        self.error: BaseException | None = None
        self.unacked = 0
        self.inbound = asyncio.Event()
        self.window = asyncio.Event()


class _Link:
    """One HTTP/2 connection over a byte stream; the part client and server share.

    All ``h2`` state changes happen on the event loop thread without awaits in between,
    so the connection object needs no lock. The reader task never waits on a consumer
    and never awaits ``drain()``, so reading always continues (control frames such as
    WINDOW_UPDATE and SETTINGS ACK keep flowing even while senders are blocked).
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, client_side: bool
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")
        )
        self.conn.encoder = _PlainEncoder()
        self.conn.decoder.max_header_list_size = MAX_HEADER_LIST_BYTES
        self.streams: dict[int, _Stream] = {}
        self.lost: AgentConnectionLost | None = None
        self.settings_received = asyncio.Event()
        self.slot_freed = asyncio.Event()
        self.closed = asyncio.Event()
        self.on_request: Callable[[_Stream], None] | None = None
        self.on_reset: Callable[[_Stream], None] | None = None
        self._reader_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Send the preface and our SETTINGS, then start reading."""
        self.conn.initiate_connection()
        settings: dict[h2.settings.SettingCodes | int, int] = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW_BYTES,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_BYTES,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_BYTES,
        }
        if self.conn.config.client_side:
            settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        self.conn.update_settings(settings)
        self.conn.increment_flow_control_window(CONNECTION_WINDOW_BYTES - _DEFAULT_WINDOW)
        # A sender waits in drain() only once a couple of frames are queued (the default
        # 64 KiB mark would stop it after every frame); the windows bound the rest.
        self.writer.transport.set_write_buffer_limits(high=_WRITE_BUFFER_BYTES)
        self.flush()
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    # -- reading ---------------------------------------------------------------------

    async def _read_loop(self) -> None:
        reason = AgentConnectionLost("connection closed")
        try:
            while True:
                data = await self.reader.read(_READ_BYTES)
                if not data:
                    reason = AgentConnectionLost("peer closed the byte stream")
                    return
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    self.flush()
                    reason = AgentConnectionLost(f"HTTP/2 protocol error: {exc!r}")
                    return
                for event in events:
                    self._dispatch(event)
                self.flush()
                if self.lost is not None:
                    reason = self.lost
                    return
        except (OSError, EOFError) as exc:
            reason = AgentConnectionLost(f"byte stream failed: {exc!r}")
        except Exception as exc:
            _log.exception("agent protocol reader failed")
            reason = AgentConnectionLost(f"protocol reader failed: {exc!r}")
        finally:
            self._mark_lost(reason)

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id or 0)
            if stream is None:
                self._ack_now(event.stream_id or 0, event.flow_controlled_length or 0)
            else:
                stream.chunks.append((event.data or b"", event.flow_controlled_length or 0))
                stream.inbound.set()
        elif isinstance(event, h2.events.RequestReceived):
            stream = _Stream(event.stream_id or 0)
            stream.headers = _str_headers(event.headers)
            self.streams[stream.id] = stream
            if self.on_request is not None:
                self.on_request(stream)
        elif isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                if isinstance(event, h2.events.ResponseReceived):
                    stream.headers = _str_headers(event.headers)
                else:
                    stream.trailers = _str_headers(event.headers)
                stream.inbound.set()
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.ended = True
                stream.inbound.set()
            self.slot_freed.set()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.reset_code = int(event.error_code or 0)
                stream.inbound.set()
                stream.window.set()
                if self.on_reset is not None:
                    self.on_reset(stream)
            self.slot_freed.set()
        elif isinstance(event, h2.events.WindowUpdated):
            if not event.stream_id:
                for stream in self.streams.values():
                    stream.window.set()
            elif (stream := self.streams.get(event.stream_id)) is not None:
                stream.window.set()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self.settings_received.set()
            self.slot_freed.set()
            for stream in self.streams.values():
                stream.window.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.lost = AgentConnectionLost(
                f"peer closed the connection (GOAWAY, error code {event.error_code})"
            )

    def _mark_lost(self, reason: AgentConnectionLost) -> None:
        if self.lost is None:
            self.lost = reason
        for stream in self.streams.values():
            if stream.error is None:
                stream.error = self.lost
            stream.inbound.set()
            stream.window.set()
        self.slot_freed.set()
        self.settings_received.set()
        if not self.writer.is_closing():
            self.writer.close()
        self.closed.set()

    # -- writing ---------------------------------------------------------------------

    def flush(self) -> None:
        """Hand whatever h2 has queued to the transport (never blocks)."""
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self) -> None:
        """Wait until the transport buffer is below its high-water mark."""
        try:
            await self.writer.drain()
        except (OSError, RuntimeError) as exc:
            lost = AgentConnectionLost(f"byte stream failed: {exc!r}")
            self._mark_lost(lost)
            raise lost from exc

    def check(self, stream: _Stream) -> None:
        """Raise if ``stream`` can no longer be used."""
        if stream.error is not None:
            raise stream.error
        if self.lost is not None:
            raise self.lost
        if stream.reset_code is not None:
            raise AgentStreamReset(stream.id, stream.reset_code)

    async def wait_window(self, stream: _Stream) -> int:
        """Wait until ``stream`` may send at least one byte; return how many it may send."""
        while True:
            self.check(stream)
            try:
                window = self.conn.local_flow_control_window(stream.id)
            except h2.exceptions.StreamClosedError as exc:
                raise AgentStreamReset(stream.id, h2.errors.ErrorCodes.STREAM_CLOSED) from exc
            if window > 0:
                return min(window, self.conn.max_outbound_frame_size)
            stream.window.clear()
            await stream.window.wait()

    async def send_data(self, stream: _Stream, data: bytes, *, end_stream: bool = False) -> None:
        """Send ``data`` within the flow-control windows, waiting for them as needed."""
        view = memoryview(data)
        while len(view) > 0:
            allowed = await self.wait_window(stream)
            size = min(allowed, len(view))
            last = end_stream and size == len(view)
            # h2 copies the payload into its frame: pass a whole chunk without copying it first.
            payload = data if size == len(data) and isinstance(data, bytes) else bytes(view[:size])
            self._call(stream, self.conn.send_data, stream.id, payload, end_stream=last)
            view = view[size:]
            if last:
                stream.sent_end = True
            self.flush()
            await self.drain()
        if end_stream and not stream.sent_end:
            self.end_stream(stream)
            await self.drain()

    def send_headers(
        self, stream: _Stream, headers: list[tuple[str, str]], *, end_stream: bool = False
    ) -> None:
        """Send a header block (request, response or trailers)."""
        self.check(stream)
        self._call(stream, self.conn.send_headers, stream.id, headers, end_stream=end_stream)
        if end_stream:
            stream.sent_end = True
            self.slot_freed.set()
        self.flush()

    def end_stream(self, stream: _Stream) -> None:
        """Close our side of ``stream`` with an empty DATA frame."""
        self.check(stream)
        self._call(stream, self.conn.end_stream, stream.id)
        stream.sent_end = True
        self.slot_freed.set()
        self.flush()

    def reset(self, stream: _Stream, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Reset ``stream`` (idempotent; a no-op on a closed stream or connection)."""
        if stream.reset_code is None:
            stream.reset_code = int(error_code)
        stream.inbound.set()
        stream.window.set()
        if self.lost is None:
            try:
                self.conn.reset_stream(stream.id, error_code)
            except h2.exceptions.ProtocolError:
                return
            self.slot_freed.set()
            self.flush()

    def _call(self, stream: _Stream, fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except h2.exceptions.StreamClosedError as exc:
            raise AgentStreamReset(stream.id, stream.reset_code or 0) from exc
        except h2.exceptions.ProtocolError as exc:
            raise AgentConnectionLost(f"HTTP/2 protocol error: {exc!r}") from exc

    # -- consuming -------------------------------------------------------------------

    async def read_chunk(self, stream: _Stream) -> bytes | None:
        """Next body chunk of ``stream``, or ``None`` at its end.

        The previous chunk counts as consumed now: its bytes are acknowledged, which
        reopens the peer's window by that much.
        """
        self.ack(stream)
        while True:
            if stream.chunks:
                data, flow_len = stream.chunks.popleft()
                stream.unacked += flow_len
                if data:
                    return data
                continue
            if stream.ended:
                return None
            self.check(stream)
            stream.inbound.clear()
            await stream.inbound.wait()

    def ack(self, stream: _Stream) -> None:
        """Acknowledge the bytes the consumer of ``stream`` has taken."""
        if stream.unacked:
            size, stream.unacked = stream.unacked, 0
            self._ack_now(stream.id, size)

    def _ack_now(self, stream_id: int, size: int) -> None:
        if size <= 0 or self.lost is not None:
            return
        try:
            self.conn.acknowledge_received_data(size, stream_id)
        except h2.exceptions.ProtocolError:
            return
        self.flush()

    async def wait_inbound(self, stream: _Stream, ready: Callable[[], bool]) -> None:
        """Wait until ``ready()`` holds for ``stream`` (raising if the stream breaks)."""
        while not ready():
            self.check(stream)
            stream.inbound.clear()
            await stream.inbound.wait()

    def forget(self, stream: _Stream) -> None:
        """Drop ``stream``'s state, acknowledging whatever it still buffered."""
        self.streams.pop(stream.id, None)
        stream.unacked += sum(flow_len for _, flow_len in stream.chunks)
        stream.chunks.clear()
        self.ack(stream)

    async def close(self, timeout_s: float = 1.0) -> None:
        """Send GOAWAY, stop reading and close the byte stream."""
        if self.lost is None:
            try:
                self.conn.close_connection()
                self.flush()
            except h2.exceptions.ProtocolError:
                pass
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.wait({self._reader_task})
        self._mark_lost(AgentConnectionLost("connection closed locally"))
        try:
            async with asyncio.timeout(timeout_s):
                await self.writer.wait_closed()
        except (OSError, TimeoutError):
            pass


def _str_headers(headers: Any) -> list[tuple[str, str]]:
    return [(str(name), str(value)) for name, value in headers or ()]


def _deadline_of(timeout_s: float | None) -> float | None:
    return None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s


# =====================================================================================
# Client side (worker)
# =====================================================================================


class AgentResponse:
    """The response to one :meth:`AgentClient.request`.

    Every wait uses the request's deadline; on expiry the method raises
    :class:`TimeoutError` and resets the stream. Consume the body (or call
    :meth:`aclose`, or use ``async with``) so the stream's buffered bytes are released.

    Attributes:
        status: HTTP status (200 for every response returned; errors raise instead).
        headers: response headers without pseudo-headers, lower-case names.
    """

    def __init__(
        self,
        link: _Link,
        stream: _Stream,
        deadline: float | None,
        body_task: asyncio.Task[None] | None,
    ) -> None:
        self._link = link
        self._stream = stream
        self._deadline = deadline
        self._body_task = body_task
        headers = stream.headers or []
        self.status = int(dict(headers).get(":status", "0"))
        self.headers: dict[str, str] = {k: v for k, v in headers if not k.startswith(":")}
        self._done = False

    async def __aenter__(self) -> AgentResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def iter_body(self) -> AsyncIterator[bytes]:
        """Yield the raw body chunks as they arrive.

        A chunk counts as consumed when the next one is requested (or the iteration
        ends); only then does the agent's window reopen, so a slow consumer slows the
        agent's sending for this stream alone.

        Raises:
            TimeoutError: the request's deadline passed.
            AgentConnectionLost: the connection dropped or the agent reset the stream.
        """
        try:
            while True:
                async with asyncio.timeout_at(self._deadline):
                    chunk = await self._link.read_chunk(self._stream)
                if chunk is None:
                    self._finish()
                    return
                yield chunk
        except TimeoutError:
            await self.aclose()
            raise
        finally:
            self._link.ack(self._stream)

    async def read(self, limit: int = MAX_JSON_BODY_BYTES) -> bytes:
        """The whole body as bytes.

        Raises:
            ValueError: the body exceeds ``limit`` bytes (the stream is reset).
            TimeoutError, AgentConnectionLost: as :meth:`iter_body`.
        """
        parts: list[bytes] = []
        size = 0
        async for chunk in self.iter_body():
            size += len(chunk)
            if size > limit:
                await self.aclose()
                raise ValueError(f"response body exceeds {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def json(self) -> Any:
        """The whole body decoded as JSON (for small results, at most 64 MiB).

        Raises:
            ValueError: the body is too large or not JSON.
            TimeoutError, AgentConnectionLost: as :meth:`iter_body`.
        """
        return json.loads(await self.read())

    async def trailers(self) -> dict[str, str]:
        """Wait for the end of the response and return its trailers (may be empty).

        Any body not yet read is consumed and discarded first.

        Raises:
            TimeoutError, AgentConnectionLost: as :meth:`iter_body`.
        """
        async for _ in self.iter_body():
            pass
        try:
            async with asyncio.timeout_at(self._deadline):
                await self._link.wait_inbound(self._stream, lambda: self._stream.ended)
        except TimeoutError:
            await self.aclose()
            raise
        self._finish()
        return dict(self._stream.trailers or [])

    async def exec_events(self) -> AsyncIterator[tuple[str, bytes]]:
        """Parse an exec-output body into ``(kind, data)`` events.

        ``kind`` is ``"stdout"`` or ``"stderr"`` with raw bytes, or ``"gap"`` with the
        JSON payload ``{"stream", "offset", "dropped_bytes"}`` (see the module
        docstring). Call :meth:`trailers` afterwards for ``x-result``.

        Raises:
            AgentConnectionLost: malformed records, connection loss or stream reset.
            TimeoutError: the request's deadline passed.
        """
        decoder = RecordDecoder()
        async for chunk in self.iter_body():
            try:
                records = decoder.feed(chunk)
            except ValueError as exc:
                await self.aclose()
                raise AgentConnectionLost(str(exc)) from exc
            for channel, payload in records:
                yield CHANNEL_NAMES[channel], payload
        if decoder.pending:
            raise AgentConnectionLost("exec output ended inside a record")

    async def aclose(self) -> None:
        """Give up on the response: reset the stream if it is still open (idempotent)."""
        if self._done:
            return
        if not (self._stream.ended and self._stream.sent_end):
            self._link.reset(self._stream, h2.errors.ErrorCodes.CANCEL)
        self._finish()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        task = self._body_task
        if task is not None and not task.done():
            if self._stream.reset_code is not None or self._link.lost is not None:
                task.cancel()
            # The upload may still run after a complete response; the agent resets it
            # with NO_ERROR, which the stream must still be registered to hear.
            task.add_done_callback(lambda _t: self._link.forget(self._stream))
            return
        self._link.forget(self._stream)


class AgentClient:
    """The worker's side of one agent connection; safe for many concurrent requests."""

    def __init__(self, link: _Link) -> None:
        self._link = link
        self._body_tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def connect(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        timeout_s: float = 10.0,
    ) -> AgentClient:
        """Speak HTTP/2 on an already open byte stream to the agent.

        Sends the connection preface and SETTINGS and waits for the agent's SETTINGS.

        Raises:
            AgentConnectionLost: the agent closed the stream or broke the protocol
                (e.g. it refused this peer).
            TimeoutError: no SETTINGS from the agent within ``timeout_s`` seconds.
        """
        link = _Link(reader, writer, client_side=True)
        link.start()
        try:
            async with asyncio.timeout(timeout_s):
                await link.settings_received.wait()
        except TimeoutError:
            await link.close()
            raise
        if link.lost is not None:
            raise link.lost
        return cls(link)

    @property
    def closed(self) -> bool:
        """True once the connection is gone (closed locally, by the agent, or broken)."""
        return self._link.lost is not None

    async def wait_closed(self) -> None:
        """Wait until the connection is gone (for a supervisor watching the agent)."""
        await self._link.closed.wait()

    async def ping(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """``GET /v1/ping``.

        Returns:
            ``{"agent_version", "protocol_version", "uptime_s", "pid", ...}``.

        Raises:
            TimeoutError, AgentConnectionLost, AgentError.
        """
        response = await self.request("GET", "/v1/ping", {}, timeout_s=timeout_s)
        result: dict[str, Any] = await response.json()
        return result

    async def request(
        self,
        method: str,
        path: str,
        args: dict[str, Any],
        body: bytes | AsyncIterator[bytes] | None = None,
        *,
        timeout_s: float | None,
    ) -> AgentResponse:
        """Start one operation and wait for its response headers.

        Args:
            method: ``GET``, ``PUT``, ``POST`` or ``DELETE``.
            path: ``/v1/...`` (no query string).
            args: the operation's parameters, sent as ``x-args`` JSON.
            body: request body: bytes, or an async iterator of chunks that is consumed
                by a task of its own (a slow iterator holds back only this stream); if
                it raises, the stream is reset and that exception is re-raised here or
                by the response's methods.
            timeout_s: deadline in seconds for the whole exchange (response headers,
                body and trailers), or ``None`` for none.

        Returns:
            The response (status 200).

        Raises:
            AgentError: the agent answered 4xx/5xx (``code``, ``message``, ``details``).
            TimeoutError: the deadline passed (the stream is reset).
            AgentConnectionLost: the connection is gone or the stream was reset.
            ValueError: ``args`` encode to more than :data:`MAX_ARGS_BYTES`.
        """
        link = self._link
        deadline = _deadline_of(timeout_s)
        encoded_args = dumps(args)
        if len(encoded_args) > MAX_ARGS_BYTES:
            raise ValueError(f"x-args is {len(encoded_args)} bytes, more than {MAX_ARGS_BYTES}")
        headers = [
            (":method", method),
            (":scheme", "http"),
            (":authority", "agent"),
            (":path", path),
            ("x-args", encoded_args),
        ]
        has_body = body is not None and not (isinstance(body, bytes) and not body)
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    if link.lost is not None:
                        raise link.lost
                    limit = link.conn.remote_settings.max_concurrent_streams
                    if link.conn.open_outbound_streams < limit:
                        break
                    link.slot_freed.clear()
                    await link.slot_freed.wait()
        except TimeoutError:
            raise TimeoutError(f"no free stream for {method} {path}") from None
        stream = _Stream(link.conn.get_next_available_stream_id())
        link.streams[stream.id] = stream
        try:
            link.send_headers(stream, headers, end_stream=not has_body)
        except AgentConnectionLost:
            link.forget(stream)
            raise
        body_task = None
        if has_body:
            assert body is not None
            body_task = asyncio.get_running_loop().create_task(self._send_body(stream, body))
            self._body_tasks.add(body_task)
            body_task.add_done_callback(self._body_tasks.discard)
        response: AgentResponse | None = None
        try:
            async with asyncio.timeout_at(deadline):
                await link.wait_inbound(stream, lambda: stream.headers is not None)
            response = AgentResponse(link, stream, deadline, body_task)
            if response.status >= 400:
                raise await _error_from(response)
        except BaseException:
            if response is not None:
                await response.aclose()
            else:
                link.reset(stream, h2.errors.ErrorCodes.CANCEL)
                link.forget(stream)
            if body_task is not None:
                body_task.cancel()
            raise
        return response

    async def _send_body(self, stream: _Stream, body: bytes | AsyncIterator[bytes]) -> None:
        link = self._link
        try:
            if isinstance(body, bytes):
                await link.send_data(stream, body, end_stream=True)
                return
            async for chunk in body:
                if chunk:
                    await link.send_data(stream, bytes(chunk))
            link.end_stream(stream)
            await link.drain()
        except AgentConnectionLost:
            # The agent answered early and reset the upload, or the connection broke;
            # the response side reports whichever it was.
            return
        except Exception as exc:
            stream.error = exc
            link.reset(stream, h2.errors.ErrorCodes.CANCEL)

    async def close(self) -> None:
        """Close the connection (GOAWAY, then close the byte stream). Idempotent."""
        for task in list(self._body_tasks):
            task.cancel()
        await self._link.close()


async def _error_from(response: AgentResponse) -> AgentError:
    try:
        body = await response.read(1 << 20)
        value = json.loads(body)
        return AgentError(
            str(value["code"]),
            str(value.get("message", "")),
            value.get("details"),
            status=response.status,
        )
    except (ValueError, KeyError, TypeError):
        return AgentError(
            "INTERNAL_ERROR", f"agent answered {response.status}", status=response.status
        )


# =====================================================================================
# Server side (agent)
# =====================================================================================


class ServerRequest:
    """One request as seen by an agent handler, and the means to answer it.

    Attributes:
        method: HTTP method.
        path: request path.
        args: the decoded ``x-args`` object.
        params: values of ``{name}`` segments of the matched route pattern.
        response_started: True once the response headers went out.
    """

    def __init__(
        self,
        link: _Link,
        stream: _Stream,
        method: str,
        path: str,
        args: dict[str, Any],
        params: dict[str, str],
    ) -> None:
        self._link = link
        self._stream = stream
        self.method = method
        self.path = path
        self.args = args
        self.params = params
        self.response_started = False
        self.response_ended = False

    @property
    def body_ended(self) -> bool:
        """True once the client finished sending the request body."""
        return self._stream.ended

    async def body(self) -> AsyncIterator[bytes]:
        """Yield the request body chunks; each is acknowledged when the next is asked for.

        Raises:
            AgentConnectionLost: the client reset the stream or the connection broke.
        """
        try:
            while True:
                chunk = await self._link.read_chunk(self._stream)
                if chunk is None:
                    return
                yield chunk
        finally:
            self._link.ack(self._stream)

    def start(self, status: int = 200, headers: dict[str, str] | None = None) -> None:
        """Send the response headers (the body and trailers follow)."""
        block = [(":status", str(status))]
        block.extend((k, v) for k, v in (headers or {}).items())
        self._link.send_headers(self._stream, block)
        self.response_started = True

    async def writable(self) -> int:
        """Wait until at least one body byte may be sent; return how many may be."""
        return await self._link.wait_window(self._stream)

    async def write(self, data: bytes) -> None:
        """Send body bytes (waits for the flow-control window as needed)."""
        await self._link.send_data(self._stream, data)

    def finish(self, trailers: dict[str, str] | None = None) -> None:
        """End the response, with trailers if given."""
        if trailers:
            self._link.send_headers(self._stream, list(trailers.items()), end_stream=True)
        else:
            self._link.end_stream(self._stream)
        self.response_ended = True

    async def send_json(
        self, value: Any, status: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        """Send a whole JSON response."""
        all_headers = {"content-type": "application/json"}
        all_headers.update(headers or {})
        self.start(status, all_headers)
        await self._link.send_data(self._stream, dumps(value).encode(), end_stream=True)
        self.response_ended = True

    async def send_error(self, error: AgentError) -> None:
        """Send an error response ``{"code", "message", "details"?}``."""
        await self.send_json(error.to_dict(), status=error.status)


Handler = Callable[[ServerRequest], Awaitable[None]]


class AgentRouter:
    """Maps ``(method, path pattern)`` to handlers and serves connections with them.

    Patterns are literal segments and ``{name}`` placeholders matching one segment,
    e.g. ``/v1/processes/{exec_id}/output``.
    """

    def __init__(self) -> None:
        self._routes: list[tuple[str, tuple[str, ...], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        """Register ``handler`` for ``method`` on ``pattern``."""
        self._routes.append((method.upper(), tuple(pattern.strip("/").split("/")), handler))

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """Find the handler for a request.

        Raises:
            AgentError: ``NOT_FOUND`` (404) when no route matches.
        """
        segments = path.split("?", 1)[0].strip("/").split("/")
        for route_method, pattern, handler in self._routes:
            if route_method != method or len(pattern) != len(segments):
                continue
            params: dict[str, str] = {}
            for want, got in zip(pattern, segments, strict=True):
                if want.startswith("{") and want.endswith("}"):
                    if not got:
                        break
                    params[want[1:-1]] = got
                elif want != got:
                    break
            else:
                return handler, params
        raise AgentError("NOT_FOUND", f"no operation {method} {path}")

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection until the peer closes it or it breaks.

        Each request runs in its own task; a stream reset by the client cancels its
        task. When the connection ends, every remaining task is cancelled.
        """
        link = _Link(reader, writer, client_side=False)
        tasks: dict[int, asyncio.Task[None]] = {}
        loop = asyncio.get_running_loop()

        def on_request(stream: _Stream) -> None:
            task = loop.create_task(self._handle(link, stream))
            tasks[stream.id] = task

            def done(_task: asyncio.Task[None]) -> None:
                # Also when the task was cancelled before it ever ran (request and reset
                # arrived together): release what the stream buffered.
                tasks.pop(stream.id, None)
                link.forget(stream)

            task.add_done_callback(done)

        def on_reset(stream: _Stream) -> None:
            task = tasks.get(stream.id)
            if task is not None:
                task.cancel()

        link.on_request = on_request
        link.on_reset = on_reset
        link.start()
        try:
            await link.closed.wait()
        finally:
            for task in list(tasks.values()):
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks.values(), return_exceptions=True)
            await link.close()

    async def _handle(self, link: _Link, stream: _Stream) -> None:
        headers = dict(stream.headers or [])
        request = ServerRequest(
            link, stream, headers.get(":method", ""), headers.get(":path", ""), {}, {}
        )
        try:
            await self._run(request, headers.get("x-args"))
            if not stream.ended:
                link.reset(stream, h2.errors.ErrorCodes.NO_ERROR)
        except asyncio.CancelledError:
            link.reset(stream, h2.errors.ErrorCodes.CANCEL)
            raise
        except AgentConnectionLost:
            link.reset(stream, h2.errors.ErrorCodes.CANCEL)
        except Exception:
            _log.exception("agent handler failed after responding: %s", request.path)
            link.reset(stream, h2.errors.ErrorCodes.INTERNAL_ERROR)

    async def _run(self, request: ServerRequest, raw_args: str | None) -> None:
        try:
            handler, request.params = self.match(request.method, request.path)
            request.args = _parse_args(raw_args)
            await handler(request)
        except AgentError as exc:
            if request.response_started:
                raise
            await request.send_error(exc)
        except (AgentConnectionLost, asyncio.CancelledError):
            raise
        except Exception as exc:
            if request.response_started:
                raise
            _log.exception("agent handler failed: %s %s", request.method, request.path)
            await request.send_error(AgentError("INTERNAL_ERROR", f"internal agent error: {exc!r}"))
            return
        if not request.response_ended:
            if not request.response_started:
                request.start(200)
            request.finish()


def _parse_args(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise AgentError("VALIDATION_ERROR", f"x-args is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise AgentError("VALIDATION_ERROR", "x-args must be a JSON object")
    return value

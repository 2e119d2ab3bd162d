"""Foreground and streaming (SSE) exec relayed to the bunker's worker and agent
(SPEC §3.2-3.5, §12.4)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import json
from collections.abc import AsyncIterator
from typing import Any

import structlog

from scaigrid import errors
from scaigrid.ids import new_id
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.bunkers.schemas import ExecRequest
from scaigrid.modules.scaibunker.state import ModuleState
from scaigrid.modules.scaibunker.workers.hub import TaskHandle
from scaigrid.protocol.link import InboundStream, LinkClosed, OutboundStream, TaskKind

log = structlog.get_logger(__name__)

RESULT_GRACE_S = 30.0


class HeadTail:
    """Keeps the first and last halves of at most ``limit`` bytes of a stream (SPEC §3.4).

    Args:
        limit: bytes kept in total; the head keeps ``limit // 2``, the tail the rest.
    """

    def __init__(self, limit: int) -> None:
        self.head_limit = limit // 2
        self.tail_limit = limit - self.head_limit
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        """Account for ``chunk``, keeping memory bounded by ``limit`` (plus one chunk)."""
        self.total += len(chunk)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            if len(self.tail) > self.tail_limit:
                del self.tail[: len(self.tail) - self.tail_limit]

    def skip(self, count: int) -> None:
        """Account for ``count`` bytes that never arrived (the agent's ring buffer dropped
        them): they count as omitted; the head stops growing and the tail restarts, since
        neither may span the hole."""
        if count <= 0:
            return
        self.total += count
        self.head_limit = len(self.head)
        self.tail.clear()

    @property
    def truncated(self) -> bool:
        """True when bytes between head and tail were dropped."""
        return self.total > len(self.head) + len(self.tail)

    def render(self, encoding: str) -> str:
        """Return the kept bytes as UTF-8 text (with the omission marker) or base64."""
        omitted = self.total - len(self.head) - len(self.tail)
        if encoding == "base64":
            return base64.b64encode(bytes(self.head + self.tail)).decode()
        if not omitted:
            return bytes(self.head + self.tail).decode("utf-8", errors="replace")
        head = bytes(self.head).decode("utf-8", errors="replace")
        tail = bytes(self.tail).decode("utf-8", errors="replace")
        return f"{head}\n[... {omitted} bytes omitted ...]\n{tail}"


async def _collect_gaps(handle: TaskHandle, gaps: dict[str, list[tuple[int, int]]]) -> None:
    """Move gap notices that already arrived into ``gaps[stream]`` as ``(resume_offset,
    dropped_bytes)``. Progress arrives in order with the stream data, so every gap that
    precedes a chunk has been delivered by the time that chunk is read."""
    while True:
        try:
            progress = await handle.next_progress(0.0)
        except errors.AgentUnavailable:
            return
        if progress is None:
            return
        stream = str(progress.get("stream"))
        if progress.get("event") == "gap" and stream in gaps:
            gaps[stream].append((int(progress["offset"]), int(progress["dropped_bytes"])))


def _apply_gaps(sink: HeadTail, pending: list[tuple[int, int]]) -> None:
    while pending and sink.total >= pending[0][0] - pending[0][1]:
        resume, _ = pending.pop(0)
        sink.skip(resume - sink.total)


async def _drain(
    stream: InboundStream,
    sink: HeadTail,
    name: str,
    handle: TaskHandle,
    gaps: dict[str, list[tuple[int, int]]],
) -> None:
    async for chunk in stream:
        await _collect_gaps(handle, gaps)
        _apply_gaps(sink, gaps[name])
        sink.feed(chunk)
    await _collect_gaps(handle, gaps)
    _apply_gaps(sink, gaps[name])


async def _feed(stream: OutboundStream, data: bytes) -> None:
    """Send stdin; a command that exits without reading it ends the task, which cancels this."""
    await stream.write(data)
    await stream.end()


def _stdin_bytes(request: ExecRequest) -> bytes | None:
    if request.stdin is not None:
        return request.stdin.encode()
    if request.stdin_b64 is not None:
        try:
            return base64.b64decode(request.stdin_b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise errors.ValidationFailed(
                "stdin_b64 is not valid base64",
                details=[{"field": "stdin_b64", "message": "invalid base64"}],
            ) from exc
    return None


def _limits(state: ModuleState, request: ExecRequest) -> tuple[int, int]:
    limits = state.config.exec_limits
    timeout_s = request.timeout_s or limits.default_timeout_s
    if timeout_s > limits.max_timeout_s:
        raise errors.ValidationFailed(
            f"timeout_s may not exceed {limits.max_timeout_s}",
            details=[{"field": "timeout_s", "message": f"must be at most {limits.max_timeout_s}"}],
        )
    max_output = request.max_output_bytes or limits.default_max_output_bytes
    if max_output > limits.max_output_bytes_cap:
        raise errors.ValidationFailed(
            f"max_output_bytes may not exceed {limits.max_output_bytes_cap}",
            details=[{"field": "max_output_bytes", "message": "over the configured cap"}],
        )
    return timeout_s, max_output


async def run_foreground(
    state: ModuleState, bunker: Bunker, request: ExecRequest
) -> dict[str, Any]:
    """Run ``request`` in ``bunker`` and return the foreground result (SPEC §3.3).

    Output is kept head-and-tail per stream up to ``max_output_bytes``; memory stays bounded
    whatever the command prints.

    Raises:
        errors.ValidationFailed: limits or stdin are invalid.
        errors.AgentUnavailable: the exec could not be started.
    """
    if request.background:
        raise errors.ValidationFailed(
            "background execs are not available yet",
            details=[{"field": "background", "message": "not supported by this controller"}],
        )
    timeout_s, max_output = _limits(state, request)
    stdin = _stdin_bytes(request)
    connection = state.hub.require(bunker.worker_id)
    stdout, stderr = connection.open_inbound(), connection.open_inbound()
    streams = {"stdout": stdout.stream_id, "stderr": stderr.stream_id}
    stdin_stream = None
    if stdin is not None:
        stdin_stream = connection.open_outbound()
        streams["stdin"] = stdin_stream.stream_id
    exec_id = new_id("exe")
    params = {
        "exec_id": exec_id,
        "command": request.command,
        "cwd": request.cwd,
        "env": request.env,
        "user": request.user,
        "timeout_s": timeout_s,
        "stdin": "body" if stdin is not None else "none",
        # This process reads everything and keeps head and tail, so the agent may make a
        # fast writer wait for it rather than drop output the result should hold.
        "paced": True,
        # The result carries the pid: no start event (one link message less per exec).
        "announce_start": False,
    }
    out, err = HeadTail(max_output), HeadTail(max_output)
    handle = await connection.start_task(
        TaskKind.EXEC_START, params, bunker_id=bunker.id, streams=streams
    )
    gaps: dict[str, list[tuple[int, int]]] = {"stdout": [], "stderr": []}
    pumps = [
        asyncio.ensure_future(_drain(stdout, out, "stdout", handle, gaps)),
        asyncio.ensure_future(_drain(stderr, err, "stderr", handle, gaps)),
    ]
    feeder = None
    if stdin_stream is not None and stdin is not None:
        feeder = asyncio.ensure_future(_feed(stdin_stream, stdin))
    try:
        result = await handle.result(timeout_s + RESULT_GRACE_S)
        await asyncio.wait_for(asyncio.gather(*pumps), RESULT_GRACE_S)
    except (LinkClosed, errors.AgentUnavailable, TimeoutError) as exc:
        log.warning("exec_agent_lost", bunker_id=bunker.id, exec_id=exec_id, error=str(exc))
        result = {"exec_id": exec_id, "pid": None, "status": "agent_lost", "exit_code": None}
    finally:
        for pump in pumps:
            pump.cancel()
        if feeder is not None:
            feeder.cancel()
        if stdin_stream is not None:
            stdin_stream.abandon()
        stdout.close()
        stderr.close()
    return {
        "exec_id": result.get("exec_id", exec_id),
        "pid": result.get("pid"),
        "status": result.get("status"),
        "exit_code": result.get("exit_code"),
        "signal": result.get("signal"),
        "stdout": out.render(request.encoding),
        "stderr": err.render(request.encoding),
        "stdout_truncated": out.truncated,
        "stderr_truncated": err.truncated,
        "duration_ms": result.get("duration_ms"),
        "started_at": result.get("started_at"),
    }


KEEPALIVE_S = 15.0
START_TIMEOUT_S = 30.0
_SSE_QUEUE_CHUNKS = 8


def sse_frame(event: str, data: Any) -> bytes:
    """One Server-Sent-Events frame: ``event: <event>`` and one JSON ``data`` line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class _StreamCursor:
    """Turns one output stream's chunks into ``{seq, data}`` events (SPEC §3.5).

    ``seq`` is the byte offset of the event's first byte. In ``utf8`` mode an incremental
    decoder holds back a character split across chunks, so no event ever carries half of
    one; a gap (bytes the agent's ring buffer overwrote before the link could carry them)
    flushes the decoder and moves the offset past the dropped bytes.
    """

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self.offset = 0
        self.gaps: list[tuple[int, int]] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _pending(self) -> int:
        return len(self._decoder.getstate()[0])

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        """Events for ``chunk`` (which starts at :attr:`offset` once due gaps are applied)."""
        events = self._apply_gaps()
        if self.encoding == "base64":
            events.append({"seq": self.offset, "data": base64.b64encode(chunk).decode()})
        else:
            seq = self.offset - self._pending()
            text = self._decoder.decode(chunk)
            if text:
                events.append({"seq": seq, "data": text})
        self.offset += len(chunk)
        return events

    def finish(self) -> list[dict[str, Any]]:
        """Events for bytes still held back at the end of the stream."""
        events = self._apply_gaps()
        if self.encoding == "utf8" and self._pending():
            seq = self.offset - self._pending()
            events.append({"seq": seq, "data": self._decoder.decode(b"", final=True)})
        return events

    def _apply_gaps(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        while self.gaps and self.offset >= self.gaps[0][0] - self.gaps[0][1]:
            resume, _ = self.gaps.pop(0)
            if self.encoding == "utf8" and self._pending():
                seq = self.offset - self._pending()
                events.append({"seq": seq, "data": self._decoder.decode(b"", final=True)})
            self.offset = max(self.offset, resume)
        return events


async def _pump_into(
    stream: InboundStream, name: str, queue: asyncio.Queue[tuple[str, bytes | None]]
) -> None:
    async for chunk in stream:
        await queue.put((name, chunk))
    await queue.put((name, None))


class ExecEventStream:
    """A started streaming exec: iterate :meth:`frames` for its SSE frames (SPEC §3.5).

    Create with :func:`start_streaming`, which raises API-level errors before any byte of
    the response is sent. Memory is bounded: at most a few link chunks are queued, and a
    slow reader slows the link, never the process (the agent's ring buffer absorbs the
    difference and reports what it dropped).
    """

    def __init__(
        self,
        handle: TaskHandle,
        outputs: dict[str, InboundStream],
        start: dict[str, Any],
        *,
        encoding: str,
        timeout_s: float,
        feeder: asyncio.Future[None] | None,
        stdin_stream: OutboundStream | None,
        offsets: dict[str, int] | None = None,
    ) -> None:
        self.offsets = offsets or {}
        self.handle = handle
        self.outputs = outputs
        self.start = start
        self.encoding = encoding
        self.timeout_s = timeout_s
        self.feeder = feeder
        self.stdin_stream = stdin_stream

    async def frames(self) -> AsyncIterator[bytes]:
        """``start``, ``stdout``/``stderr``, keepalive comments every 15 s, then ``exit``."""
        cursors = {name: _StreamCursor(self.encoding) for name in self.outputs}
        for name, offset in self.offsets.items():
            cursors[name].offset = offset
        queue: asyncio.Queue[tuple[str, bytes | None]] = asyncio.Queue(_SSE_QUEUE_CHUNKS)
        pumps = [
            asyncio.ensure_future(_pump_into(stream, name, queue))
            for name, stream in self.outputs.items()
        ]
        open_streams = set(self.outputs)
        try:
            yield sse_frame("start", self.start)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.timeout_s + RESULT_GRACE_S
            while open_streams:
                try:
                    name, chunk = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    if loop.time() > deadline:
                        break
                    yield b": keepalive\n\n"
                    continue
                await _collect_gaps(self.handle, {n: c.gaps for n, c in cursors.items()})
                if chunk is None:
                    open_streams.discard(name)
                    events = cursors[name].finish()
                else:
                    events = cursors[name].feed(chunk)
                for event in events:
                    yield sse_frame(name, event)
            result = await self._result()
            yield sse_frame("exit", result)
        except errors.ScaiGridError as exc:
            # SPEC §1.5: an API-level failure after the stream started.
            log.warning("exec_stream_failed", exec_id=self.start.get("exec_id"), code=exc.code)
            yield sse_frame("error", exc.to_dict()) + b"data: [DONE]\n\n"
        finally:
            for pump in pumps:
                pump.cancel()
            if self.feeder is not None:
                self.feeder.cancel()
            if self.stdin_stream is not None:
                self.stdin_stream.abandon()
            for stream in self.outputs.values():
                stream.close()

    async def _result(self) -> dict[str, Any]:
        exec_id = self.start.get("exec_id")
        try:
            result = await self.handle.result(RESULT_GRACE_S)
        except (LinkClosed, errors.AgentUnavailable) as exc:
            log.warning("exec_agent_lost", exec_id=exec_id, error=str(exc))
            result = {"exec_id": exec_id, "pid": self.start.get("pid"), "status": "agent_lost"}
        return {
            "exec_id": result.get("exec_id", exec_id),
            "pid": result.get("pid", self.start.get("pid")),
            "status": result.get("status"),
            "exit_code": result.get("exit_code"),
            "signal": result.get("signal"),
            "stdout_truncated": False,
            "stderr_truncated": False,
            "duration_ms": result.get("duration_ms"),
            "started_at": result.get("started_at"),
        }


async def start_streaming(
    state: ModuleState, bunker: Bunker, request: ExecRequest
) -> ExecEventStream:
    """Start ``request`` for an SSE answer; return once the process runs.

    Raises:
        errors.ValidationFailed: limits or stdin are invalid.
        errors.AgentUnavailable: the exec could not be started (or did not start in time).
        errors.ScaiGridError: the agent's refusal (e.g. ``VALIDATION_ERROR``).
    """
    timeout_s, _ = _limits(state, request)
    stdin = _stdin_bytes(request)
    connection = state.hub.require(bunker.worker_id)
    outputs = {"stdout": connection.open_inbound(), "stderr": connection.open_inbound()}
    streams = {name: stream.stream_id for name, stream in outputs.items()}
    stdin_stream = connection.open_outbound() if stdin is not None else None
    if stdin_stream is not None:
        streams["stdin"] = stdin_stream.stream_id
    params = {
        "exec_id": new_id("exe"),
        "command": request.command,
        "cwd": request.cwd,
        "env": request.env,
        "user": request.user,
        "timeout_s": timeout_s,
        "stdin": "body" if stdin is not None else "none",
    }
    feeder = None
    try:
        handle = await connection.start_task(
            TaskKind.EXEC_START, params, bunker_id=bunker.id, streams=streams
        )
        if stdin_stream is not None and stdin is not None:
            feeder = asyncio.ensure_future(_feed(stdin_stream, stdin))
        start = await handle.next_progress(START_TIMEOUT_S)
        if start is None:
            await handle.result(RESULT_GRACE_S)
            raise errors.AgentUnavailable("the exec ended before it started")
    except BaseException:
        if feeder is not None:
            feeder.cancel()
        if stdin_stream is not None:
            stdin_stream.abandon()
        for stream in outputs.values():
            stream.close()
        raise
    return ExecEventStream(
        handle,
        outputs,
        {"exec_id": start.get("exec_id", params["exec_id"]), "pid": start.get("pid")},
        encoding=request.encoding,
        timeout_s=timeout_s,
        feeder=feeder,
        stdin_stream=stdin_stream,
    )


FOLLOW_DEADLINE_S = 3600.0


async def start_following(
    state: ModuleState,
    bunker: Bunker,
    ref: str,
    *,
    stream: str,
    offset: int,
    encoding: str,
) -> ExecEventStream:
    """Follow a process's ``stream`` from byte ``offset`` as SSE (SPEC §3.6): the same
    events as a streaming exec (``start``, ``stdout``/``stderr`` from ``offset``, ``exit``).

    Raises:
        errors.ScaiGridError: ``PROCESS_NOT_FOUND`` and other refusals, before any byte.
    """
    connection = state.hub.require(bunker.worker_id)
    output = connection.open_inbound()
    params = {"ref": ref, "stream": stream, "offset": offset}
    try:
        handle = await connection.start_task(
            TaskKind.PROCESS_FOLLOW,
            params,
            bunker_id=bunker.id,
            streams={"output": output.stream_id},
        )
        start = await handle.next_progress(START_TIMEOUT_S)
        if start is None:
            await handle.result(RESULT_GRACE_S)
            raise errors.AgentUnavailable("the output stream ended before it started")
    except BaseException:
        output.close()
        raise
    return ExecEventStream(
        handle,
        {stream: output},
        {"exec_id": start.get("exec_id"), "pid": start.get("pid")},
        encoding=encoding,
        timeout_s=FOLLOW_DEADLINE_S,
        feeder=None,
        stdin_stream=None,
        offsets={stream: offset},
    )

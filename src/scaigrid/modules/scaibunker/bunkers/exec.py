"""Foreground exec relayed to the bunker's worker and agent (SPEC §3.2-3.4, §12.4)."""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

import structlog

from scaigrid import errors
from scaigrid.ids import new_id
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.bunkers.schemas import ExecRequest
from scaigrid.modules.scaibunker.state import ModuleState
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


async def _drain(stream: InboundStream, sink: HeadTail) -> None:
    async for chunk in stream:
        sink.feed(chunk)


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
    }
    out, err = HeadTail(max_output), HeadTail(max_output)
    handle = await connection.start_task(
        TaskKind.EXEC_START, params, bunker_id=bunker.id, streams=streams
    )
    pumps = [
        asyncio.ensure_future(_drain(stdout, out)),
        asyncio.ensure_future(_drain(stderr, err)),
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

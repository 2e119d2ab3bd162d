"""The agent's shell operations (SPEC §5) on top of :mod:`scaigrid.agent.shells`.

``POST /v1/shell``
    Open a session (``create: true``) or reattach to one, and stream it. Args
    ``{session_id, owner, create, command?, user, cols?, rows?, grace_s, buffer_bytes,
    offset?}``. The request body is the terminal's input, written as it arrives; the
    response is the output as exec records (channel 1 = bytes, 3 = gap) from ``offset``
    (default: where the previous attachment stopped), after the header ``x-start``
    ``{session_id, pid, offset, replayed_bytes, dropped_bytes}``. It ends with the trailer
    ``x-result``: ``{status: "exited", exit_code, signal, output_bytes}`` when the
    process ended, or ``{status: "taken_over"}`` when a newer attach took the session.
    Cancelling the stream detaches (the grace period starts). ``SHELL_SESSION_NOT_FOUND``
    for an unknown session or another owner's.
``GET /v1/shells``
    ``[{session_id, pid, user, attached, finished, exit_code, output_bytes,
    started_at}]``.
``POST /v1/shells/{id}/resize`` args ``{owner, cols, rows}`` → ``{}``.
``POST /v1/shells/{id}/signal`` args ``{owner, signal}`` → ``{}``; the terminal's
    foreground process group gets the signal.
``DELETE /v1/shells/{id}`` args ``{owner}`` → ``{}``; hangs the session up at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

from scaigrid.agent.routes import parse_signal
from scaigrid.agent.shells import ShellManager, ShellSession, ShellSpec
from scaigrid.agent.validation import get_bool, get_identity, get_int, get_str, invalid
from scaigrid.protocol.agent import (
    CHANNEL_GAP,
    CHANNEL_STDOUT,
    RECORD_HEADER,
    AgentRouter,
    ServerRequest,
    dumps,
    encode_record,
)

SHELL_CONTENT_TYPE = "application/x-scaibunker-exec"
MAX_BUFFER_BYTES = 64 << 20
MAX_GRACE_S = 86400
_RECORD_PAYLOAD_BYTES = 64 * 1024


class ShellRoutes:
    """Binds the shell operations to a :class:`ShellManager`."""

    def __init__(self, shells: ShellManager) -> None:
        self.shells = shells

    def add_to(self, router: AgentRouter) -> None:
        """Register the operations listed in the module docstring."""
        router.add("POST", "/v1/shell", self.shell)
        router.add("GET", "/v1/shells", self.list_shells)
        router.add("POST", "/v1/shells/{session_id}/resize", self.resize)
        router.add("POST", "/v1/shells/{session_id}/signal", self.signal)
        router.add("DELETE", "/v1/shells/{session_id}", self.close)

    def _session(self, request: ServerRequest, session_id: str) -> ShellSession:
        return self.shells.get(session_id, get_str(request.args, "owner", ""))

    async def shell(self, request: ServerRequest) -> None:
        """``POST /v1/shell``: open or reattach, then stream (see the module docstring)."""
        args = request.args
        session_id = get_str(args, "session_id")
        if not 0 < len(session_id) <= 128 or "/" in session_id:
            raise invalid("session_id must be 1 to 128 characters without /", "session_id")
        cols = _size(args, "cols")
        rows = _size(args, "rows")
        if get_bool(args, "create", False):
            session = self.shells.open(
                ShellSpec(
                    session_id=session_id,
                    owner=get_str(args, "owner", ""),
                    argv=_argv(args.get("command")),
                    identity=get_identity(args),
                    cols=cols or 80,
                    rows=rows or 24,
                    grace_s=get_int(args, "grace_s", 60, high=MAX_GRACE_S),
                    buffer_bytes=get_int(
                        args, "buffer_bytes", 1 << 20, low=4096, high=MAX_BUFFER_BYTES
                    ),
                )
            )
        else:
            session = self._session(request, session_id)
            if cols or rows:
                self.shells.resize(session, cols or session.spec.cols, rows or session.spec.rows)
        offset = get_int(args, "offset", session.sent_offset)
        gen = self.shells.begin_attach(session)
        ring = session.output
        first = min(max(offset, ring.start), ring.end)
        start = {
            "session_id": session.session_id,
            "pid": session.pid,
            "offset": first,
            "replayed_bytes": ring.end - first,
            "dropped_bytes": max(0, first - offset),
        }
        delivered = False
        feeder = asyncio.get_running_loop().create_task(
            self.shells.write_input(session, request.body())
        )
        try:
            request.start(200, {"content-type": SHELL_CONTENT_TYPE, "x-start": dumps(start)})
            result = await _stream(request, session, gen, first)
            request.finish({"x-result": dumps(result)})
            delivered = result.get("status") == "exited"
        finally:
            feeder.cancel()
            self.shells.end_attach(session, gen, delivered=delivered)

    async def list_shells(self, request: ServerRequest) -> None:
        """``GET /v1/shells`` → the live sessions."""
        await request.send_json([s.record() for s in self.shells.listing()])

    async def resize(self, request: ServerRequest) -> None:
        """``POST /v1/shells/{id}/resize`` args ``{owner, cols, rows}``."""
        session = self._session(request, request.params["session_id"])
        cols, rows = _size(request.args, "cols"), _size(request.args, "rows")
        if not cols or not rows:
            raise invalid("cols and rows are required", "cols")
        self.shells.resize(session, cols, rows)
        await request.send_json({})

    async def signal(self, request: ServerRequest) -> None:
        """``POST /v1/shells/{id}/signal`` args ``{owner, signal}``."""
        session = self._session(request, request.params["session_id"])
        self.shells.send_signal(session, parse_signal(request.args.get("signal")))
        await request.send_json({})

    async def close(self, request: ServerRequest) -> None:
        """``DELETE /v1/shells/{id}`` args ``{owner}``."""
        self.shells.close(self._session(request, request.params["session_id"]))
        await request.send_json({})


async def _stream(
    request: ServerRequest, session: ShellSession, gen: int, offset: int
) -> dict[str, Any]:
    """Send output records from ``offset`` until the session finishes (→ its result) or a
    newer attachment takes over (→ ``{status: "taken_over"}``)."""
    ring = session.output
    while True:
        if session.attach_gen != gen:
            return {"status": "taken_over"}
        if offset < ring.end:
            window = await request.writable()
            if session.attach_gen != gen:
                return {"status": "taken_over"}
            want = min(max(window - RECORD_HEADER.size, 4096), _RECORD_PAYLOAD_BYTES)
            start, data = ring.read(offset, min(want, ring.end - offset))
            if start > offset:
                gap = {"stream": "stdout", "offset": start, "dropped_bytes": start - offset}
                await request.write(encode_record(CHANNEL_GAP, dumps(gap).encode()))
            if data:
                await request.write(encode_record(CHANNEL_STDOUT, data))
            offset = start + len(data)
            session.sent_offset = offset
            continue
        if session.finished:
            return session.result()
        await session.changed.wait()


def _size(args: dict[str, Any], name: str) -> int | None:
    if args.get(name) is None:
        return None
    return get_int(args, name, 0, low=1, high=1000)


def _argv(command: Any) -> list[str]:
    if command is None:
        return []
    if isinstance(command, str) and command and "\x00" not in command:
        return ["/bin/sh", "-c", command]
    if (
        isinstance(command, list)
        and command
        and all(isinstance(a, str) and a and "\x00" not in a for a in command)
        and command[0].startswith("/")
    ):
        return list(command)
    raise invalid("command must be a non-empty string or a list starting with a path", "command")

"""Shell task kinds (SPEC §5, §10.4): relay a PTY session between link streams and the
agent's ``POST /v1/shell`` stream (see :mod:`scaigrid.agent.shell_routes`).

``shell.open``
    params ``{session_id, owner, create, command?, user, cols?, rows?, grace_s,
    buffer_bytes, offset?}`` (passed to the agent unchanged); streams ``input``
    (controller → worker: terminal input) and ``output`` (worker → controller: terminal
    output). Progress ``{event: "session", session_id, pid, offset, replayed_bytes,
    dropped_bytes}`` once attached, then the output flows with the link's credit (a slow
    controller slows the stream; the agent's ring buffer absorbs the shell's output and
    reports overwritten bytes as progress ``{event: "gap", offset, dropped_bytes}``).
    Result: the agent's ``x-result``: ``{status: "exited", exit_code, signal,
    output_bytes}`` or ``{status: "taken_over"}``. Cancelling the task detaches (the
    session's grace period starts). Errors: ``SHELL_SESSION_NOT_FOUND``,
    ``VALIDATION_ERROR``, ``AGENT_UNAVAILABLE``.
``shell.resize`` / ``shell.signal`` / ``shell.close``
    params ``{session_id, owner, cols, rows}`` / ``{session_id, owner, signal}`` /
    ``{session_id, owner}``; result ``{}``.
``shell.list``
    params ``{}``; result ``{entries: [...]}`` (the agent's ``GET /v1/shells``).
"""

from __future__ import annotations

import json
from typing import Any, Final

from scaigrid.protocol.link import TaskKind
from scaigrid.worker.bunkers import BunkerSupervisor
from scaigrid.worker.link.tasks import (
    HandlerSpec,
    Task,
    TaskFailed,
    agent_errors,
    stream_chunks,
)

#: A shell attachment may last this long; the client then reattaches.
SHELL_DEADLINE_S: Final = 86400.0
SHELL_CALL_DEADLINE_S: Final = 30.0
_AGENT_CALL_TIMEOUT_S: Final = 25.0


def _session_id(params: dict[str, Any]) -> str:
    value = params.get("session_id")
    if not isinstance(value, str) or not 0 < len(value) <= 128 or not value.isascii():
        raise TaskFailed("VALIDATION_ERROR", "session_id must be a shell session id")
    if not value.replace("_", "").isalnum():
        raise TaskFailed("VALIDATION_ERROR", "session_id must be a shell session id")
    return value


class ShellHandlers:
    """Handlers of the shell task kinds, bound to a supervisor."""

    def __init__(self, supervisor: BunkerSupervisor) -> None:
        self._bunkers = supervisor

    def specs(self) -> dict[str, HandlerSpec]:
        """The handler table entries of the shell kinds."""
        specs = {
            TaskKind.SHELL_OPEN: HandlerSpec(
                agent_errors(self.shell_open),
                SHELL_DEADLINE_S,
                timeout_code="AGENT_UNAVAILABLE",
                inbound_roles=frozenset({"input"}),
                outbound_roles=frozenset({"output"}),
            )
        }
        for kind, call in (
            (TaskKind.SHELL_RESIZE, self.shell_resize),
            (TaskKind.SHELL_SIGNAL, self.shell_signal),
            (TaskKind.SHELL_CLOSE, self.shell_close),
            (TaskKind.SHELL_LIST, self.shell_list),
        ):
            specs[kind] = HandlerSpec(
                agent_errors(call), SHELL_CALL_DEADLINE_S, timeout_code="AGENT_UNAVAILABLE"
            )
        return specs

    async def shell_open(self, task: Task) -> dict[str, Any]:
        """``shell.open`` → the agent's ``x-result`` after relaying the session."""
        _session_id(task.params)
        out = task.outbound("output")
        body = stream_chunks(task.inbound("input"))
        client = await self._bunkers.agent(task.require_bunker_id())
        response = await client.request(
            "POST", "/v1/shell", dict(task.params), body, timeout_s=None
        )
        try:
            raw = response.headers.get("x-start") or "{}"
            await task.progress({"event": "session", **json.loads(raw)})
            async for kind, data in response.exec_events():
                if kind == "stdout":
                    await out.write(data)
                elif kind == "gap":
                    await task.progress({"event": "gap", **json.loads(data)})
            result = json.loads((await response.trailers())["x-result"])
        finally:
            await response.aclose()
        await out.end()
        return result if isinstance(result, dict) else {"value": result}

    async def _call(self, task: Task, method: str, suffix: str, keys: tuple[str, ...]) -> Any:
        session_id = _session_id(task.params)
        args = {k: task.params[k] for k in ("owner", *keys) if k in task.params}
        client = await self._bunkers.agent(task.require_bunker_id())
        response = await client.request(
            method, f"/v1/shells/{session_id}{suffix}", args, timeout_s=_AGENT_CALL_TIMEOUT_S
        )
        async with response:
            return await response.json()

    async def shell_resize(self, task: Task) -> dict[str, Any]:
        """``shell.resize`` → ``{}``."""
        await self._call(task, "POST", "/resize", ("cols", "rows"))
        return {}

    async def shell_signal(self, task: Task) -> dict[str, Any]:
        """``shell.signal`` → ``{}``."""
        await self._call(task, "POST", "/signal", ("signal",))
        return {}

    async def shell_close(self, task: Task) -> dict[str, Any]:
        """``shell.close`` → ``{}``."""
        await self._call(task, "DELETE", "", ())
        return {}

    async def shell_list(self, task: Task) -> dict[str, Any]:
        """``shell.list`` → ``{entries}``."""
        client = await self._bunkers.agent(task.require_bunker_id())
        response = await client.request("GET", "/v1/shells", {}, timeout_s=_AGENT_CALL_TIMEOUT_S)
        async with response:
            return {"entries": await response.json()}


def shell_specs(supervisor: BunkerSupervisor) -> dict[str, HandlerSpec]:
    """The shell kinds' handler table entries bound to ``supervisor``."""
    return ShellHandlers(supervisor).specs()

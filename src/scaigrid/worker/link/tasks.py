"""Task dispatch on the worker side of the channel (SPEC §10.4).

For every ``task`` message the worker answers ``task_ack`` at once, runs the kind's
handler in its own asyncio task under a deadline, and finishes with exactly one
``task_result``:

* ``task_ack`` ``{task_id, accepted: true}``; ``accepted: false`` with ``error`` for an unknown
  kind or a task id that is already running (no ``task_result`` follows a refused task);
* zero or more ``task_progress`` ``{task_id, progress}``;
* ``task_result`` ``{task_id, ok: true, result}`` or ``{task_id, ok: false, error: {code, message,
  details?}}``. :class:`TaskFailed` and :class:`scaigrid.errors.ScaiGridError` keep their code;
  a passed deadline answers the kind's ``timeout_code``; a ``task_cancel`` answers
  ``TASK_CANCELLED``; anything else answers ``INTERNAL_ERROR`` with a safe message (and a log
  line carrying the traceback).

Streams named in ``streams`` are registered with the mux while the ``task`` message is
handled, before the next frame is read, so no early byte of an inbound stream is dropped.
Before the ``task_result`` every outbound stream of the task is ended with EOF and every
inbound stream is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import wraps
from typing import Any

import structlog

from scaigrid.errors import AgentUnavailable, ScaiGridError
from scaigrid.protocol.agent import AgentConnectionLost, AgentError
from scaigrid.protocol.link import (
    MAX_MESSAGE_BYTES,
    InboundStream,
    LinkClosed,
    MsgType,
    OutboundStream,
    StreamMux,
    dumps,
    error_payload,
)

log = structlog.get_logger(__name__)

TASK_CANCELLED = "TASK_CANCELLED"
INTERNAL_ERROR = "INTERNAL_ERROR"
UNKNOWN_TASK_KIND = "UNKNOWN_TASK_KIND"
DUPLICATE_TASK = "DUPLICATE_TASK"


class TaskFailed(Exception):
    """A task failed with a code the controller understands.

    Args:
        code: SPEC error code (``AGENT_UNAVAILABLE``, ``FILE_NOT_FOUND``…) or a worker task
            code (``BOOT_FAILED``, ``BAKE_FAILED``).
        message: safe to show to the tenant.
        details: optional structured details.
    """

    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


@dataclass
class Task:
    """One task being run: its message fields, its streams and a progress sender.

    Attributes:
        task_id: controller-chosen id.
        kind: task kind, e.g. ``"exec.start"``.
        bunker_id: target bunker, when the kind has one.
        params: the kind's parameters (see the handler's documentation).
    """

    task_id: str
    kind: str
    bunker_id: str | None
    params: dict[str, Any]
    _mux: StreamMux
    _inbound: dict[str, InboundStream] = field(default_factory=dict)
    _outbound: dict[str, OutboundStream] = field(default_factory=dict)

    def require_bunker_id(self) -> str:
        """Return ``bunker_id``.

        Raises:
            TaskFailed: ``VALIDATION_ERROR`` when the task names no bunker.
        """
        if not self.bunker_id:
            raise TaskFailed("VALIDATION_ERROR", f"{self.kind} needs a bunker_id")
        return self.bunker_id

    def inbound(self, role: str) -> InboundStream:
        """Return the controller → worker stream for ``role`` (e.g. ``"stdin"``, ``"body"``).

        Raises:
            TaskFailed: ``VALIDATION_ERROR`` when the task named no such stream.
        """
        stream = self._inbound.get(role)
        if stream is None:
            raise TaskFailed("VALIDATION_ERROR", f"{self.kind} needs a {role!r} stream")
        return stream

    def outbound(self, role: str) -> OutboundStream:
        """Return the worker → controller stream for ``role`` (e.g. ``"stdout"``, ``"body"``).

        Raises:
            TaskFailed: ``VALIDATION_ERROR`` when the task named no such stream.
        """
        stream = self._outbound.get(role)
        if stream is None:
            raise TaskFailed("VALIDATION_ERROR", f"{self.kind} needs a {role!r} stream")
        return stream

    async def progress(self, progress: dict[str, Any]) -> None:
        """Send one ``task_progress`` ``{task_id, progress}``.

        Raises:
            LinkClosed: the channel is gone.
        """
        await self._mux.send(
            {"type": MsgType.TASK_PROGRESS, "task_id": self.task_id, "progress": progress}
        )


TaskHandler = Callable[[Task], Awaitable[dict[str, Any]]]
Deadline = float | Callable[[Mapping[str, Any]], float]


@dataclass(frozen=True)
class HandlerSpec:
    """How to run one task kind.

    Attributes:
        handler: coroutine returning the ``result`` object of a successful task.
        deadline_s: seconds the handler may run, or a function of ``params`` giving them.
        timeout_code: error code sent when the deadline passes.
        inbound_roles: stream roles the controller sends on (e.g. ``{"stdin"}``).
        outbound_roles: stream roles the worker sends on (e.g. ``{"stdout", "stderr"}``).
    """

    handler: TaskHandler
    deadline_s: Deadline
    timeout_code: str = INTERNAL_ERROR
    inbound_roles: frozenset[str] = frozenset()
    outbound_roles: frozenset[str] = frozenset()

    def deadline_for(self, params: Mapping[str, Any]) -> float:
        """Return the deadline in seconds for a task with ``params``."""
        if callable(self.deadline_s):
            return self.deadline_s(params)
        return self.deadline_s


class _DeadlinePassed(Exception):
    """The handler's deadline passed (distinct from a TimeoutError the handler raised)."""


@dataclass
class _Running:
    task: Task
    wrapper: asyncio.Task[None] | None = None
    inner: asyncio.Task[dict[str, Any]] | None = None
    cancel_requested: bool = False


def error_of(exc: BaseException, kind: str) -> dict[str, Any]:
    """Return the ``error`` object of a ``task_result`` for a handler's exception."""
    if isinstance(exc, TaskFailed):
        return error_payload(exc.code, exc.message, exc.details)
    if isinstance(exc, ScaiGridError):
        return error_payload(exc.code, exc.message, exc.details)
    return error_payload(INTERNAL_ERROR, f"internal error in worker task {kind}")


class TaskSession:
    """The tasks of one link connection.

    Args:
        mux: the connection's stream multiplexer.
        handlers: handler per task kind.

    When the connection ends, :meth:`shutdown` cancels every task still running; no result
    is sent for those (the controller fails them when it sees the link close).
    """

    def __init__(self, mux: StreamMux, handlers: Mapping[str, HandlerSpec]) -> None:
        self._mux = mux
        self._handlers = handlers
        self._running: dict[str, _Running] = {}
        self._refusals: set[asyncio.Task[None]] = set()

    def submit(self, message: dict[str, Any]) -> None:
        """Handle one ``task`` message: register its streams and start it.

        Never raises for a bad task: a malformed one is logged and dropped, an unknown kind
        or duplicate id is refused with ``task_ack {accepted: false}``.
        """
        task_id = message.get("task_id")
        kind = message.get("kind")
        if not isinstance(task_id, str) or not task_id or not isinstance(kind, str):
            log.warning("task_malformed", task_id=task_id, kind=kind)
            return
        spec = self._handlers.get(kind)
        if spec is None:
            self._refuse(task_id, UNKNOWN_TASK_KIND, f"unknown task kind {kind!r}")
            return
        if task_id in self._running:
            self._refuse(task_id, DUPLICATE_TASK, f"task {task_id} is already running")
            return
        params = message.get("params")
        bunker_id = message.get("bunker_id")
        task = Task(
            task_id=task_id,
            kind=kind,
            bunker_id=bunker_id if isinstance(bunker_id, str) else None,
            params=params if isinstance(params, dict) else {},
            _mux=self._mux,
        )
        streams = message.get("streams")
        for role, stream_id in (streams if isinstance(streams, dict) else {}).items():
            if not isinstance(stream_id, int):
                continue
            if role in spec.inbound_roles:
                task._inbound[role] = self._mux.inbound(stream_id)
            elif role in spec.outbound_roles:
                task._outbound[role] = self._mux.outbound(stream_id)
            else:
                log.warning("task_stream_role_ignored", task_id=task_id, kind=kind, role=role)
        running = _Running(task)
        self._running[task_id] = running
        running.wrapper = asyncio.create_task(self._run(running, spec), name=f"task:{task_id}")

    def cancel(self, task_id: str) -> None:
        """Handle ``task_cancel``: cancel the task's handler (no-op for unknown ids)."""
        running = self._running.get(task_id)
        if running is None:
            return
        running.cancel_requested = True
        if running.inner is not None:
            running.inner.cancel()
        elif running.wrapper is not None:
            running.wrapper.cancel()

    async def shutdown(self) -> None:
        """Cancel every running task and wait until their handlers have cleaned up."""
        wrappers = [r.wrapper for r in self._running.values() if r.wrapper is not None]
        wrappers.extend(self._refusals)
        for wrapper in wrappers:
            wrapper.cancel()
        await asyncio.gather(*wrappers, return_exceptions=True)

    def _refuse(self, task_id: str, code: str, message: str) -> None:
        log.warning("task_refused", task_id=task_id, code=code, reason=message)
        ack = {
            "type": MsgType.TASK_ACK,
            "task_id": task_id,
            "accepted": False,
            "error": error_payload(code, message),
        }
        refusal = asyncio.create_task(self._send_quietly(ack))
        self._refusals.add(refusal)
        refusal.add_done_callback(self._refusals.discard)

    async def _send_quietly(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(LinkClosed):
            await self._mux.send(message)

    async def _run(self, running: _Running, spec: HandlerSpec) -> None:
        task = running.task
        bound = log.bind(task_id=task.task_id, kind=task.kind, bunker_id=task.bunker_id)
        try:
            await self._mux.send(
                {"type": MsgType.TASK_ACK, "task_id": task.task_id, "accepted": True}
            )
            deadline_s = spec.deadline_for(task.params)
            inner = asyncio.create_task(self._invoke(spec, task, deadline_s))
            running.inner = inner
            if running.cancel_requested:
                inner.cancel()
            try:
                await asyncio.wait({inner})
            except asyncio.CancelledError:
                inner.cancel()
                await asyncio.gather(inner, return_exceptions=True)
                raise
            message = self._result_message(task, inner, spec, deadline_s, bound)
            await self._finish_streams(task)
            await self._mux.send(message)
        except LinkClosed:
            bound.info("task_result_undelivered", reason="link closed")
        finally:
            self._close_streams(task)
            self._running.pop(task.task_id, None)

    @staticmethod
    async def _invoke(spec: HandlerSpec, task: Task, deadline_s: float) -> dict[str, Any]:
        scope = asyncio.timeout(deadline_s)
        try:
            async with scope:
                return await spec.handler(task)
        except TimeoutError:
            if scope.expired():
                raise _DeadlinePassed from None
            raise

    @staticmethod
    def _result_message(
        task: Task,
        inner: asyncio.Task[dict[str, Any]],
        spec: HandlerSpec,
        deadline_s: float,
        bound: Any,
    ) -> dict[str, Any]:
        base: dict[str, Any] = {"type": MsgType.TASK_RESULT, "task_id": task.task_id}
        if inner.cancelled():
            bound.info("task_cancelled")
            return {**base, "ok": False, "error": error_payload(TASK_CANCELLED, "task cancelled")}
        exc = inner.exception()
        if exc is None:
            message = {**base, "ok": True, "result": inner.result()}
            if len(dumps(message)) > MAX_MESSAGE_BYTES - 1024:
                bound.warning("task_result_too_large")
                error = error_payload(
                    "VALIDATION_ERROR",
                    f"the {task.kind} result is too large for one answer; ask for less "
                    "(a smaller depth or limit)",
                )
                return {**base, "ok": False, "error": error}
            bound.debug("task_done")
            return message
        if isinstance(exc, _DeadlinePassed):
            bound.warning("task_deadline_passed", deadline_s=deadline_s)
            error = error_payload(
                spec.timeout_code, f"{task.kind} did not finish within {deadline_s:.0f} s"
            )
        elif isinstance(exc, LinkClosed):
            bound.info("task_link_lost", error=str(exc))
            error = error_of(exc, task.kind)
        elif isinstance(exc, TaskFailed | ScaiGridError):
            bound.info("task_failed", code=getattr(exc, "code", None), error=str(exc))
            error = error_of(exc, task.kind)
        else:
            bound.error("task_crashed", exc_info=exc)
            error = error_of(exc, task.kind)
        return {**base, "ok": False, "error": error}

    @staticmethod
    async def _finish_streams(task: Task) -> None:
        for stream in task._outbound.values():
            await stream.end()

    @staticmethod
    def _close_streams(task: Task) -> None:
        for inbound in task._inbound.values():
            inbound.close()
        for outbound in task._outbound.values():
            outbound.abandon()


def agent_errors(handler: TaskHandler) -> TaskHandler:
    """Wrap a handler that calls the guest agent: agent error codes pass through as task
    errors, a lost or silent agent is ``AGENT_UNAVAILABLE``."""

    @wraps(handler)
    async def wrapped(task: Task) -> dict[str, Any]:
        try:
            return await handler(task)
        except AgentError as exc:
            raise TaskFailed(exc.code, exc.message, exc.details) from exc
        except AgentConnectionLost as exc:
            raise AgentUnavailable(f"lost contact with the agent: {exc}") from exc
        except TimeoutError as exc:
            raise AgentUnavailable("the agent did not answer in time") from exc

    return wrapped


async def stream_chunks(stream: InboundStream) -> AsyncIterator[bytes]:
    """Yield a link stream's chunks until EOF (credit is returned as they are taken)."""
    while chunk := await stream.read():
        yield chunk

"""The controller's end of worker channels: live connections and task calls (SPEC §10.4).

Each connected worker has one :class:`WorkerConnection`. Services send tasks through it
with :meth:`WorkerConnection.start_task` (streams, progress, result) or
:meth:`WorkerConnection.call` (request/response). The hub never talks to a worker that has
not dialled in: the controller never connects to workers.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from scaigrid import errors
from scaigrid.protocol.link import (
    InboundStream,
    LinkClosed,
    MsgType,
    OutboundStream,
    StreamMux,
)

log = structlog.get_logger(__name__)

_task_ids = itertools.count(1)


class TaskHandle:
    """A task sent to a worker: its progress messages and its single result."""

    def __init__(self, connection: WorkerConnection, task_id: str, kind: str) -> None:
        self.task_id = task_id
        self.kind = kind
        self._connection = connection
        self._progress: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._result: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    @property
    def done(self) -> bool:
        """True once the worker sent the task's result (or the link closed)."""
        return self._result.done()

    def _deliver_progress(self, progress: dict[str, Any]) -> None:
        self._progress.put_nowait(progress)

    def _deliver_result(self, message: dict[str, Any]) -> None:
        if not self._result.done():
            self._result.set_result(message)

    def _fail(self, exc: BaseException) -> None:
        if not self._result.done():
            self._result.set_exception(exc)

    async def next_progress(self, timeout_s: float) -> dict[str, Any] | None:
        """Return the next progress object, or ``None`` once the result has arrived.

        Raises:
            errors.AgentUnavailable: nothing arrived within ``timeout_s`` seconds.
        """
        if not self._progress.empty():
            return self._progress.get_nowait()
        getter = asyncio.ensure_future(self._progress.get())
        try:
            done, _ = await asyncio.wait(
                {getter, self._result}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not getter.done():
                getter.cancel()
        if getter in done:
            return getter.result()
        if self._result in done:
            return None
        raise errors.AgentUnavailable(f"worker did not answer {self.kind} within {timeout_s:.0f} s")

    async def result(self, timeout_s: float) -> dict[str, Any]:
        """Wait for the task result and return its ``result`` object.

        Raises:
            errors.ScaiGridError: the worker reported an error (its SPEC code is kept).
            errors.AgentUnavailable: the link closed or ``timeout_s`` seconds passed; the task
                is cancelled on the worker in the timeout case.
        """
        try:
            message = await asyncio.wait_for(asyncio.shield(self._result), timeout_s)
        except TimeoutError:
            await self.cancel()
            raise errors.AgentUnavailable(
                f"worker did not finish {self.kind} within {timeout_s:.0f} s"
            ) from None
        except LinkClosed as exc:
            raise errors.AgentUnavailable("the worker connection was lost") from exc
        if message.get("ok"):
            result = message.get("result") or {}
            return result if isinstance(result, dict) else {"value": result}
        error = message.get("error") or {}
        raise errors.from_code(
            str(error.get("code", "INTERNAL_ERROR")),
            str(error.get("message", "worker task failed")),
            error.get("details"),
        )

    async def cancel(self) -> None:
        """Ask the worker to cancel the task (no-op once it finished or the link closed)."""
        if self._result.done():
            return
        try:
            await self._connection.mux.send({"type": MsgType.TASK_CANCEL, "task_id": self.task_id})
        except LinkClosed:
            return


class WorkerConnection:
    """One live worker channel.

    Args:
        worker_id: the registered worker's id.
        send_text: coroutine sending one text frame on the WebSocket.
        send_bytes: coroutine sending one binary frame on the WebSocket.
    """

    def __init__(
        self,
        worker_id: str,
        send_text: Callable[[str], Awaitable[None]],
        send_bytes: Callable[[bytes], Awaitable[None]],
    ) -> None:
        self.worker_id = worker_id
        self.mux = StreamMux(send_text, send_bytes, odd_ids=True)
        self._tasks: dict[str, TaskHandle] = {}

    @property
    def closed(self) -> bool:
        """True once the channel closed."""
        return self.mux.closed

    def open_inbound(self) -> InboundStream:
        """Allocate a stream the worker will send on."""
        return self.mux.inbound(self.mux.allocate())

    def open_outbound(self) -> OutboundStream:
        """Allocate a stream the controller will send on."""
        return self.mux.outbound(self.mux.allocate())

    async def start_task(
        self,
        kind: str,
        params: dict[str, Any],
        *,
        bunker_id: str | None = None,
        streams: dict[str, int] | None = None,
    ) -> TaskHandle:
        """Send a ``task`` and return its handle at once.

        Raises:
            errors.AgentUnavailable: the channel is closed.
        """
        task_id = f"tsk_{next(_task_ids)}"
        handle = TaskHandle(self, task_id, kind)
        self._tasks[task_id] = handle
        message: dict[str, Any] = {
            "type": MsgType.TASK,
            "task_id": task_id,
            "kind": kind,
            "params": params,
        }
        if bunker_id is not None:
            message["bunker_id"] = bunker_id
        if streams:
            message["streams"] = streams
        try:
            await self.mux.send(message)
        except LinkClosed as exc:
            self._tasks.pop(task_id, None)
            raise errors.AgentUnavailable("the worker connection was lost") from exc
        return handle

    async def call(
        self,
        kind: str,
        params: dict[str, Any],
        *,
        bunker_id: str | None = None,
        timeout_s: float = 30.0,
    ) -> dict[str, Any]:
        """Send a task without streams and wait for its result (see :meth:`TaskHandle.result`)."""
        handle = await self.start_task(kind, params, bunker_id=bunker_id)
        return await handle.result(timeout_s)

    def on_message(self, message: dict[str, Any]) -> None:
        """Route a task reply or credit message to its waiter."""
        kind = message["type"]
        if kind == MsgType.STREAM_CREDIT:
            self.mux.feed_credit(message)
            return
        handle = self._tasks.get(str(message.get("task_id")))
        if handle is None:
            return
        if kind == MsgType.TASK_PROGRESS:
            progress = message.get("progress")
            handle._deliver_progress(progress if isinstance(progress, dict) else {})
        elif kind == MsgType.TASK_RESULT:
            self._tasks.pop(handle.task_id, None)
            handle._deliver_result(message)
        elif kind == MsgType.TASK_ACK and not message.get("accepted", False):
            self._tasks.pop(handle.task_id, None)
            handle._deliver_result({"ok": False, "error": message.get("error") or {}})

    def close(self) -> None:
        """Fail every pending task and stream with :class:`LinkClosed`."""
        exc = LinkClosed(f"worker {self.worker_id} disconnected")
        self.mux.close(exc)
        for handle in self._tasks.values():
            handle._fail(exc)
        self._tasks.clear()


class WorkerHub:
    """The live worker connections held by this controller process."""

    def __init__(self) -> None:
        self._connections: dict[str, WorkerConnection] = {}
        self.changed = asyncio.Condition()

    def get(self, worker_id: str | None) -> WorkerConnection | None:
        """Return the live connection of ``worker_id``, or ``None``."""
        if worker_id is None:
            return None
        connection = self._connections.get(worker_id)
        return None if connection is None or connection.closed else connection

    def require(self, worker_id: str | None) -> WorkerConnection:
        """Return the live connection of ``worker_id``.

        Raises:
            errors.AgentUnavailable: the worker is not connected.
        """
        connection = self.get(worker_id)
        if connection is None:
            raise errors.AgentUnavailable("the bunker's worker is not connected")
        return connection

    def connected_ids(self) -> list[str]:
        """Ids of the workers connected right now."""
        return [wid for wid, conn in self._connections.items() if not conn.closed]

    async def attach(self, connection: WorkerConnection) -> None:
        """Make ``connection`` the worker's channel, closing an older one (SPEC §10.3)."""
        old = self._connections.get(connection.worker_id)
        self._connections[connection.worker_id] = connection
        if old is not None and old is not connection:
            old.close()
        async with self.changed:
            self.changed.notify_all()

    async def detach(self, connection: WorkerConnection) -> None:
        """Forget ``connection`` if it is still the worker's current channel."""
        connection.close()
        if self._connections.get(connection.worker_id) is connection:
            del self._connections[connection.worker_id]
        async with self.changed:
            self.changed.notify_all()

    async def close(self) -> None:
        """Close every connection (controller shutdown)."""
        for connection in list(self._connections.values()):
            connection.close()
        self._connections.clear()

"""Task dispatch and stream flow control over the worker link, against a real WebSocket peer.

The handlers here are small test kinds registered with the real dispatcher; they exercise the
same code paths as ``files.read`` (worker → controller stream), ``files.write`` (controller →
worker stream) and ``exec.start`` (long-running, cancellable).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from scaigrid.errors import BunkerNotRunning
from scaigrid.protocol.link import STREAM_WINDOW_BYTES
from scaigrid.worker.link.tasks import HandlerSpec, Task, TaskFailed

from .conftest import ControllerStub, LinkStarter


async def _connect(controller: ControllerStub, start_link: LinkStarter, handlers: Any):
    link, _ = start_link(handlers, join_token=controller.new_join_token())
    conn = await controller.next_connection()
    await link.wait_connected()
    return link, conn


async def test_unknown_task_kind_is_refused_in_the_ack(
    controller: ControllerStub, start_link: LinkStarter
) -> None:
    _, conn = await _connect(controller, start_link, {})
    task_id = await conn.task("bunker.teleport", {})

    ack = await conn.next("task_ack")
    assert ack["task_id"] == task_id
    assert ack["accepted"] is False
    assert ack["error"]["code"] == "UNKNOWN_TASK_KIND"
    await asyncio.sleep(0.1)
    assert conn.pending("task_result") == 0, "a refused task gets no result"


async def test_outbound_stream_never_has_more_than_one_window_in_flight(
    controller: ControllerStub, start_link: LinkStarter
) -> None:
    total = 3 * STREAM_WINDOW_BYTES + 12345
    payload = os.urandom(total)

    async def flood(task: Task) -> dict[str, Any]:
        await task.progress({"size": total})
        body = task.outbound("body")
        view = memoryview(payload)
        for offset in range(0, total, 100_000):
            await body.write(bytes(view[offset : offset + 100_000]))
        return {"size": total}

    handlers = {"test.read": HandlerSpec(flood, 30, outbound_roles=frozenset({"body"}))}
    _, conn = await _connect(controller, start_link, handlers)
    stream_id = conn.allocate_stream()
    task_id = await conn.task("test.read", streams={"body": stream_id})

    assert (await conn.next("task_ack"))["accepted"] is True
    assert (await conn.next("task_progress"))["progress"] == {"size": total}
    got = await conn.wait_stream(stream_id, lambda data, eof: len(data) >= STREAM_WINDOW_BYTES)
    await asyncio.sleep(0.3)
    assert len(conn.streams[stream_id]) == STREAM_WINDOW_BYTES, "stopped at one window"

    await conn.credit(stream_id, 300_000)
    await conn.wait_stream(stream_id, lambda data, eof: len(data) >= STREAM_WINDOW_BYTES + 300_000)
    await asyncio.sleep(0.3)
    assert len(conn.streams[stream_id]) == STREAM_WINDOW_BYTES + 300_000

    await conn.credit(stream_id, total)
    got = await conn.wait_stream(stream_id, lambda data, eof: eof)
    assert got == payload
    result = await conn.next("task_result")
    expected = {"type": "task_result", "task_id": task_id, "ok": True, "result": {"size": total}}
    assert result == expected


async def test_inbound_stream_receives_bytes_sent_right_after_the_task(
    controller: ControllerStub, start_link: LinkStarter
) -> None:
    received = bytearray()

    async def sink(task: Task) -> dict[str, Any]:
        async for chunk in task.inbound("body"):
            received.extend(chunk)
        return {"size": len(received)}

    handlers = {"test.write": HandlerSpec(sink, 30, inbound_roles=frozenset({"body"}))}
    _, conn = await _connect(controller, start_link, handlers)
    stream_id = conn.allocate_stream()
    payload = os.urandom(2 * STREAM_WINDOW_BYTES)
    await conn.task("test.write", streams={"body": stream_id})

    await conn.send_body(stream_id, payload)

    result = await conn.next("task_result")
    assert result["ok"] is True
    assert result["result"] == {"size": len(payload)}
    assert bytes(received) == payload
    assert conn.granted[stream_id] >= len(payload) - STREAM_WINDOW_BYTES


async def test_task_cancel_cancels_the_running_handler(
    controller: ControllerStub, start_link: LinkStarter
) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def forever(task: Task) -> dict[str, Any]:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}

    _, conn = await _connect(controller, start_link, {"test.forever": HandlerSpec(forever, 60)})
    task_id = await conn.task("test.forever")
    assert (await conn.next("task_ack"))["accepted"] is True
    await asyncio.wait_for(started.wait(), 5)

    await conn.send({"type": "task_cancel", "task_id": task_id})
    result = await conn.next("task_result")
    assert cancelled.is_set()
    assert result["task_id"] == task_id
    assert result["ok"] is False
    assert result["error"]["code"] == "TASK_CANCELLED"


async def test_deadline_errors_and_crashes_map_to_codes(
    controller: ControllerStub, start_link: LinkStarter
) -> None:
    async def slow(task: Task) -> dict[str, Any]:
        await asyncio.sleep(10)
        return {}

    async def failing(task: Task) -> dict[str, Any]:
        raise TaskFailed("FILE_NOT_FOUND", "no such file: /x", {"path": "/x"})

    async def not_running(task: Task) -> dict[str, Any]:
        raise BunkerNotRunning("bunker is stopping")

    async def crashing(task: Task) -> dict[str, Any]:
        raise RuntimeError("secret internal detail")

    handlers = {
        "test.slow": HandlerSpec(slow, 0.2, timeout_code="AGENT_UNAVAILABLE"),
        "test.failing": HandlerSpec(failing, 5),
        "test.not_running": HandlerSpec(not_running, 5),
        "test.crashing": HandlerSpec(crashing, 5),
    }
    _, conn = await _connect(controller, start_link, handlers)
    expected = {
        await conn.task("test.slow"): ("AGENT_UNAVAILABLE", None),
        await conn.task("test.failing"): ("FILE_NOT_FOUND", {"path": "/x"}),
        await conn.task("test.not_running"): ("BUNKER_NOT_RUNNING", None),
        await conn.task("test.crashing"): ("INTERNAL_ERROR", None),
    }
    results = {}
    for _ in expected:
        result = await conn.next("task_result")
        results[result["task_id"]] = result
    for task_id, (code, details) in expected.items():
        error = results[task_id]["error"]
        assert results[task_id]["ok"] is False
        assert error["code"] == code
        assert error.get("details") == details
    crash = next(r for r in results.values() if r["error"]["code"] == "INTERNAL_ERROR")
    assert "secret" not in crash["error"]["message"]


async def test_duplicate_task_id_is_refused_while_running(
    controller: ControllerStub, start_link: LinkStarter
) -> None:
    release = asyncio.Event()

    async def wait(task: Task) -> dict[str, Any]:
        await release.wait()
        return {"done": True}

    _, conn = await _connect(controller, start_link, {"test.wait": HandlerSpec(wait, 30)})
    task_id = await conn.task("test.wait")
    assert (await conn.next("task_ack"))["accepted"] is True
    await conn.task("test.wait", task_id=task_id)
    refusal = await conn.next("task_ack")
    assert refusal["accepted"] is False
    assert refusal["error"]["code"] == "DUPLICATE_TASK"
    release.set()
    assert (await conn.next("task_result"))["result"] == {"done": True}


async def test_dropped_link_cancels_its_tasks(
    controller: ControllerStub, start_link: LinkStarter
) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def forever(task: Task) -> dict[str, Any]:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}

    _, conn = await _connect(controller, start_link, {"test.forever": HandlerSpec(forever, 60)})
    await conn.task("test.forever")
    await asyncio.wait_for(started.wait(), 5)
    await conn.drop()
    await asyncio.wait_for(cancelled.wait(), 5)
    second = await controller.next_connection()
    assert second.pending("task_result") == 0

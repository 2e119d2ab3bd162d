"""End to end: the SDK's processes and streaming exec against a real stack (issue #5)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from scaigrid.client import AsyncClient, Client
from scaigrid.client.errors import ProcessNotFound, ProcessNotRunning, StdinClosed
from tests.e2e.conftest import create_bunker
from tests.fixtures.stack import BASE, Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def bunker_id(stack: Stack, busybox_image: str) -> Any:
    bunker = create_bunker(stack, busybox_image, memory_mb=256, disk_mb=256)
    yield bunker["id"]
    with stack.client() as client:
        client.delete(f"{BASE}/bunkers/{bunker['id']}")


def test_sync_stream_yields_start_output_and_exit(stack: Stack, bunker_id: str) -> None:
    with Client(stack.url, stack.admin_key) as client:
        events = list(
            client.processes.stream(bunker_id, "printf 'a\\377'; echo b >&2; exit 4", stdin="x")
        )
    assert events[0].kind == "start" and events[0].exec_id is not None
    assert b"".join(e.data for e in events if e.kind == "stdout") == b"a\xff"
    assert b"".join(e.data for e in events if e.kind == "stderr") == b"b\n"
    last = events[-1]
    assert last.kind == "exit" and last.result is not None
    assert (last.result.status, last.result.exit_code) == ("exited", 4)


def test_sync_processes_start_stdin_output_signal(stack: Stack, bunker_id: str) -> None:
    with Client(stack.url, stack.admin_key) as client:
        exec_id, pid = client.processes.start(bunker_id, "cat", stdin=b"first ", stdin_open=True)
        assert client.processes.get(bunker_id, pid).exec_id == exec_id
        assert client.processes.write_stdin(bunker_id, exec_id, "second", eof=True) == 6
        deadline = time.monotonic() + 10
        while client.processes.get(bunker_id, exec_id).status == "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        chunk = client.processes.output(bunker_id, exec_id)
        assert (chunk.data, chunk.eof, chunk.next_offset) == (b"first second", True, 12)
        assert client.processes.output(bunker_id, exec_id, offset=6).data == b"second"
        with pytest.raises(ProcessNotRunning):
            client.processes.signal(bunker_id, exec_id, "TERM")
        with pytest.raises(ProcessNotFound):
            client.processes.get(bunker_id, "exe_missing")
        sleeper, _ = client.processes.start(bunker_id, "sleep 60")
        with pytest.raises(StdinClosed):
            client.processes.write_stdin(bunker_id, sleeper, "x")
        record = client.processes.signal(bunker_id, sleeper, 9)
        assert record.exec_id == sleeper
        followed = list(client.processes.follow(bunker_id, exec_id, offset=6))
        assert (followed[0].kind, followed[-1].kind) == ("start", "exit")
        assert b"".join(e.data for e in followed if e.kind == "stdout") == b"second"
        listed = [p.exec_id for p in client.processes.list(bunker_id)]
        assert {exec_id, sleeper} <= set(listed)


async def test_async_stream_and_processes(stack: Stack, bunker_id: str) -> None:
    async with AsyncClient(stack.url, stack.admin_key) as client:
        kinds, out = [], b""
        async for event in client.processes.stream(bunker_id, ["echo", "héllo"]):
            kinds.append(event.kind)
            out += event.data if event.kind == "stdout" else b""
        assert kinds[0] == "start" and kinds[-1] == "exit"
        assert out == "héllo\n".encode()
        exec_id, _ = await client.processes.start(bunker_id, "echo bg")
        for _ in range(100):
            if (await client.processes.get(bunker_id, exec_id)).status != "running":
                break
            time.sleep(0.02)
        assert (await client.processes.output(bunker_id, exec_id)).data == b"bg\n"

"""Process records, output resume and signals through the real agent."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from scaigrid.protocol.agent import AgentClient, AgentError
from tests.agent.conftest import AgentProcess, new_exec_id, run_exec


async def record_of(client: AgentClient, ref: str) -> dict[str, Any]:
    result: dict[str, Any] = await (
        await client.request("GET", f"/v1/processes/{ref}", {}, timeout_s=5)
    ).json()
    return result


async def wait_ended(client: AgentClient, ref: str) -> dict[str, Any]:
    for _ in range(200):
        record = await record_of(client, ref)
        if record["status"] != "running":
            return record
        await asyncio.sleep(0.02)
    raise AssertionError(f"{ref} still running")


async def start_background(client: AgentClient, command: str, **args: Any) -> dict[str, Any]:
    exec_id = new_exec_id()
    response = await client.request(
        "POST",
        "/v1/exec",
        {"exec_id": exec_id, "command": command, "background": True, **args},
        timeout_s=5,
    )
    started: dict[str, Any] = await response.json()
    assert started["exec_id"] == exec_id
    assert json.loads(response.headers["x-start"]) == started
    return started


async def test_background_exec_is_listed_and_signalled(client: AgentClient) -> None:
    started = await start_background(client, "trap 'exit 7' USR1; echo ready; sleep 30 & wait")
    for _ in range(200):
        record = await record_of(client, started["exec_id"])
        if record["stdout_bytes"]:
            break
        await asyncio.sleep(0.01)
    assert record["status"] == "running" and record["background"] is True
    assert record["pid"] == started["pid"]
    running = await (
        await client.request("GET", "/v1/processes", {"status": "running"}, timeout_s=5)
    ).json()
    assert started["exec_id"] in [p["exec_id"] for p in running]
    by_pid = await record_of(client, str(started["pid"]))
    assert by_pid["exec_id"] == started["exec_id"]

    await client.request(
        "POST", f"/v1/processes/{started['exec_id']}/signal", {"signal": "USR1"}, timeout_s=5
    )
    record = await wait_ended(client, started["exec_id"])
    assert (record["status"], record["exit_code"]) == ("exited", 7)
    with pytest.raises(AgentError) as caught:
        await client.request(
            "POST", f"/v1/processes/{started['exec_id']}/signal", {"signal": 15}, timeout_s=5
        )
    assert caught.value.code == "PROCESS_NOT_RUNNING"


async def test_group_signal_reaches_the_whole_group(client: AgentClient) -> None:
    started = await start_background(client, "sleep 30 & sleep 30 & wait")
    await client.request(
        "POST",
        f"/v1/processes/{started['exec_id']}/signal",
        {"signal": "SIGKILL", "group": True},
        timeout_s=5,
    )
    record = await wait_ended(client, started["exec_id"])
    assert (record["status"], record["signal"]) == ("signaled", "SIGKILL")


async def test_output_resumes_from_an_offset(client: AgentClient) -> None:
    result, _, _ = await run_exec(client, "printf abcdef; printf XY >&2")
    exec_id = result["exec_id"]
    response = await client.request(
        "GET", f"/v1/processes/{exec_id}/output", {"offset": 2}, timeout_s=5
    )
    meta = json.loads(response.headers["x-meta"])
    assert await response.read() == b"cdef"
    assert meta == {
        "stream": "stdout",
        "offset": 2,
        "next_offset": 6,
        "dropped_bytes": 0,
        "eof": True,
    }
    response = await client.request(
        "GET", f"/v1/processes/{exec_id}/output", {"stream": "stderr"}, timeout_s=5
    )
    assert await response.read() == b"XY"


async def test_output_reports_bytes_the_ring_buffer_dropped(client: AgentClient) -> None:
    result, _, _ = await run_exec(client, "head -c 10000 /dev/zero", ring_buffer_bytes=4096)
    response = await client.request(
        "GET", f"/v1/processes/{result['exec_id']}/output", {"offset": 0}, timeout_s=5
    )
    meta = json.loads(response.headers["x-meta"])
    assert (meta["offset"], meta["dropped_bytes"], meta["next_offset"]) == (5904, 5904, 10000)
    assert len(await response.read()) == 4096


async def test_following_output_streams_until_the_process_ends(client: AgentClient) -> None:
    started = await start_background(client, "for i in 1 2 3; do echo $i; sleep 0.05; done")
    response = await client.request(
        "GET",
        f"/v1/processes/{started['exec_id']}/output",
        {"follow": True, "offset": 2},
        timeout_s=10,
    )
    data = b"".join([chunk async for kind, chunk in response.exec_events() if kind == "stdout"])
    assert data == b"2\n3\n"
    result = json.loads((await response.trailers())["x-result"])
    assert (result["status"], result["exit_code"]) == ("exited", 0)


async def test_unknown_process_and_bad_signal(client: AgentClient) -> None:
    with pytest.raises(AgentError) as caught:
        await client.request("GET", "/v1/processes/exe_nope", {}, timeout_s=5)
    assert (caught.value.code, caught.value.status) == ("PROCESS_NOT_FOUND", 404)
    started = await start_background(client, "sleep 5")
    with pytest.raises(AgentError) as caught:
        await client.request(
            "POST",
            f"/v1/processes/{started['exec_id']}/signal",
            {"signal": "SIGNOPE"},
            timeout_s=5,
        )
    assert caught.value.code == "VALIDATION_ERROR"
    await client.request(
        "POST", f"/v1/processes/{started['exec_id']}/signal", {"signal": "KILL"}, timeout_s=5
    )


async def test_output_of_old_processes_is_released_beyond_the_retention_budget(
    agent_runtime: Path, tmp_path: Path
) -> None:
    agent = await AgentProcess.start(agent_runtime, tmp_path, "--retained-output-bytes", "20000")
    try:
        connection = await agent.connect()
        ids = [
            (await run_exec(connection, "head -c 8000 /dev/zero"))[0]["exec_id"] for _ in range(3)
        ]
        metas = []
        for exec_id in ids:
            response = await connection.request(
                "GET", f"/v1/processes/{exec_id}/output", {}, timeout_s=5
            )
            metas.append((json.loads(response.headers["x-meta"]), len(await response.read())))
        assert [(m["dropped_bytes"], m["eof"], size) for m, size in metas] == [
            (8000, True, 0),
            (0, True, 8000),
            (0, True, 8000),
        ]
        await connection.close()
    finally:
        await agent.stop()


async def test_stdin_of_a_background_process_takes_writes_then_eof(client: AgentClient) -> None:
    started = await start_background(client, "cat; echo end", stdin="open")
    ref = started["exec_id"]
    assert (await record_of(client, ref))["stdin_open"] is True
    answer = await (
        await client.request(
            "POST", f"/v1/processes/{ref}/stdin", {}, b"h\xc3\xa9llo ", timeout_s=5
        )
    ).json()
    assert answer == {"bytes_written": 7, "stdin_open": True}
    answer = await (
        await client.request(
            "POST", f"/v1/processes/{ref}/stdin", {"eof": True}, b"world\n", timeout_s=5
        )
    ).json()
    assert answer == {"bytes_written": 6, "stdin_open": False}
    record = await wait_ended(client, ref)
    assert (record["status"], record["exit_code"], record["stdin_open"]) == ("exited", 0, False)
    response = await client.request("GET", f"/v1/processes/{ref}/output", {}, timeout_s=5)
    assert await response.read(1 << 20) == "héllo world\nend\n".encode()
    with pytest.raises(AgentError) as ended:
        await client.request("POST", f"/v1/processes/{ref}/stdin", {}, b"late", timeout_s=5)
    assert ended.value.code == "PROCESS_NOT_RUNNING"


async def test_stdin_writes_to_a_process_without_open_stdin_are_refused(
    client: AgentClient,
) -> None:
    started = await start_background(client, "sleep 30")
    with pytest.raises(AgentError) as refused:
        await client.request(
            "POST", f"/v1/processes/{started['exec_id']}/stdin", {}, b"x", timeout_s=5
        )
    assert refused.value.code == "STDIN_CLOSED"
    await client.request(
        "POST", f"/v1/processes/{started['exec_id']}/signal", {"signal": "KILL"}, timeout_s=5
    )
    with pytest.raises(AgentError) as foreground:
        await client.request(
            "POST",
            "/v1/exec",
            {"exec_id": new_exec_id(), "command": "cat", "stdin": "open"},
            timeout_s=5,
        )
    assert foreground.value.code == "VALIDATION_ERROR"


async def test_a_process_that_closes_its_stdin_answers_stdin_closed(client: AgentClient) -> None:
    started = await start_background(client, "exec 0<&-; sleep 30", stdin="open")
    ref = started["exec_id"]
    await asyncio.sleep(0.2)
    with pytest.raises(AgentError) as closed:
        await client.request("POST", f"/v1/processes/{ref}/stdin", {}, b"x", timeout_s=5)
    assert closed.value.code == "STDIN_CLOSED"
    assert (await record_of(client, ref))["stdin_open"] is False
    await client.request("POST", f"/v1/processes/{ref}/signal", {"signal": "KILL"}, timeout_s=5)

"""The agent as PID 1: who may connect, and how it shuts down."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from scaigrid.protocol.agent import AgentClient, AgentConnectionLost
from tests.agent.conftest import SOCKET_IN_BUNKER, AgentProcess, run_exec

# Runs with the runtime's own interpreter inside the bunker: connect to the agent's
# socket as a bunker process would, send the HTTP/2 preface and report what comes back.
_PROBE = f"""
import socket
s = socket.socket(socket.AF_UNIX)
try:
    s.connect({SOCKET_IN_BUNKER!r})
except OSError as exc:
    print("connect-failed", exc.errno)
    raise SystemExit
s.settimeout(5)
try:
    s.sendall(b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n" + bytes(9))
    data = s.recv(100)
except OSError:
    data = b""
print("answered" if data else "closed")
"""


def probe_argv() -> list[str]:
    return [
        "/.scaibunker/lib/ld-linux-x86-64.so.2",
        "--library-path",
        "/.scaibunker/lib",
        "/.scaibunker/bin/python3",
        "-I",
        "-S",
        "-B",
        "-c",
        _PROBE,
    ]


async def test_the_socket_is_private_to_root(agent: AgentProcess, client: AgentClient) -> None:
    assert agent.socket.stat().st_mode & 0o777 == 0o600
    _, out, _ = await run_exec(client, probe_argv())
    assert out.split()[0] == b"connect-failed"


async def test_a_bunker_process_is_refused_even_as_root(client: AgentClient) -> None:
    result, out, err = await run_exec(client, probe_argv(), user="root")
    assert result["exit_code"] == 0, err
    assert out == b"closed\n"
    assert (await client.ping())["pid"] == 1


async def test_trust_any_peer_lets_a_bunker_process_in(agent_runtime: Path, tmp_path: Path) -> None:
    trusting = await AgentProcess.start(agent_runtime, tmp_path, "--trust-any-peer")
    try:
        connection = await trusting.connect()
        _, out, _ = await run_exec(connection, probe_argv(), user="root")
        assert out == b"answered\n"
        await connection.close()
    finally:
        await trusting.stop()


async def test_sigterm_stops_execs_and_exits_cleanly(agent_runtime: Path, tmp_path: Path) -> None:
    agent = await AgentProcess.start(agent_runtime, tmp_path)
    connection = await agent.connect()
    response = await connection.request(
        "POST", "/v1/exec", {"exec_id": "exe_long", "command": "sleep 60"}, timeout_s=30
    )
    assert response.headers["x-start"]
    status = await agent.stop()
    assert status == 0
    assert not agent.socket.exists()
    result = json.loads((await response.trailers())["x-result"])
    assert (result["status"], result["signal"]) == ("signaled", "SIGTERM")
    await asyncio.wait_for(connection.wait_closed(), 5)
    assert connection.closed
    assert "agent.stopping" in agent.log()


async def test_root_inside_the_bunker_cannot_stop_the_agent(
    agent: AgentProcess, client: AgentClient
) -> None:
    """SIGTERM and SIGINT stop the agent only from outside its PID namespace: the bunker's
    own root sending them to PID 1 is logged and ignored."""
    result, _, err = await run_exec(client, "kill -TERM 1 && kill -INT 1 && sleep 1", user="root")
    assert result["exit_code"] == 0, err
    assert (await client.ping())["pid"] == 1
    result, out, _ = await run_exec(client, "echo still-here")
    assert out == b"still-here\n"
    assert agent.log().count("agent.signal_ignored") >= 2


async def test_start_up_reaches_first_ping_quickly(agent_runtime: Path, tmp_path: Path) -> None:
    agent = await AgentProcess.start(agent_runtime, tmp_path)
    try:
        # Generous bound: the point is that start-up is not seconds (measured ~0.1-0.2 s).
        assert agent.started_to_ping_s < 3
        status = Path(f"/proc/{agent.host_pid()}/status").read_text()
        rss_kb = int(
            next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]
        )
        assert rss_kb < 64 * 1024
    finally:
        await agent.stop()


async def test_connection_loss_is_reported_to_pending_requests(
    agent_runtime: Path, tmp_path: Path
) -> None:
    agent = await AgentProcess.start(agent_runtime, tmp_path)
    connection = await agent.connect()
    pending = asyncio.ensure_future(
        connection.request(
            "POST", "/v1/exec", {"exec_id": "e", "command": "sleep 60"}, timeout_s=30
        )
    )
    response = await pending
    os.kill(agent.host_pid(), 9)
    with pytest.raises(AgentConnectionLost):
        async for _ in response.exec_events():
            pass
    with pytest.raises(AgentConnectionLost):
        await connection.ping()
    await agent.stop()


async def test_an_exec_killed_by_the_oom_killer_is_reported_as_oom_killed(
    agent_runtime: Path, tmp_path: Path, memory_cgroup: Path
) -> None:
    agent = await AgentProcess.start(agent_runtime, tmp_path, memory_cgroup=memory_cgroup)
    try:
        connection = await agent.connect()
        result, _, _ = await run_exec(connection, "dd if=/dev/zero of=/dev/null bs=300M count=1")
        assert (result["status"], result["signal"], result["exit_code"]) == (
            "oom_killed",
            "SIGKILL",
            None,
        )
        result, _, _ = await run_exec(connection, "kill -KILL $$")
        assert (result["status"], result["signal"]) == ("signaled", "SIGKILL")
        assert (await connection.ping())["pid"] == 1
        await connection.close()
    finally:
        await agent.stop()


async def test_execs_join_the_workload_cgroup_of_the_manifest(
    agent_runtime: Path, tmp_path: Path, memory_cgroup: Path
) -> None:
    manifest = {
        "version": 1,
        "cgroup_version": 1,
        "controllers": {"memory": "/sys/fs/cgroup/memory"},
        "workload": {
            "name": "workload",
            "oom_score_adj": 500,
            "setup": [
                {"op": "mkdir", "path": "/sys/fs/cgroup/memory/workload"},
                {
                    "op": "write",
                    "path": "/sys/fs/cgroup/memory/workload/memory.limit_in_bytes",
                    "value": str(64 << 20),
                },
            ],
            "procs": ["/sys/fs/cgroup/memory/workload/cgroup.procs"],
        },
    }
    agent = await AgentProcess.start(
        agent_runtime, tmp_path, memory_cgroup=memory_cgroup, cgroups_manifest=manifest
    )
    try:
        connection = await agent.connect()
        _, out, _ = await run_exec(
            connection, "grep memory /proc/self/cgroup; cat /proc/self/oom_score_adj"
        )
        cgroup_line, adj = out.decode().split()
        # Each exec has its own cgroup below workload (tests/agent/test_exec_cgroup.py).
        assert f"{memory_cgroup.name}/workload/exe_" in cgroup_line
        assert adj == "500"
        _, out, _ = await run_exec(connection, "grep memory /proc/1/cgroup", user="root")
        assert out.decode().strip().endswith(memory_cgroup.name)
        assert (memory_cgroup / "workload/memory.limit_in_bytes").read_text().strip() == str(
            64 << 20
        )
        result, _, _ = await run_exec(connection, "dd if=/dev/zero of=/dev/null bs=200M count=1")
        assert (result["status"], result["signal"]) == ("oom_killed", "SIGKILL")
        assert (await connection.ping())["pid"] == 1
        await connection.close()
    finally:
        await agent.stop()
        workload = memory_cgroup / "workload"
        for _ in range(100):
            try:
                workload.rmdir()
                break
            except OSError:
                await asyncio.sleep(0.05)

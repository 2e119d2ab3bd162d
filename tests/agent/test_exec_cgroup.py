"""Each exec's own cgroup under ``workload``: the timeout finds what left the session."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.agent.conftest import AgentProcess, run_exec

# The daemon double-forks out of a new session, so its parent is PID 1 and neither its
# process group nor its session is the exec's; it also ignores SIGTERM and SIGHUP.
_DAEMON = (
    "setsid sh -c '(trap \"\" TERM HUP; exec sleep 4711) &' </dev/null >/dev/null 2>&1; sleep 3600"
)


def _manifest() -> dict[str, Any]:
    return {
        "version": 1,
        "cgroup_version": 1,
        "controllers": {"memory": "/sys/fs/cgroup/memory"},
        "workload": {
            "name": "workload",
            "oom_score_adj": 500,
            "setup": [{"op": "mkdir", "path": "/sys/fs/cgroup/memory/workload"}],
            "procs": ["/sys/fs/cgroup/memory/workload/cgroup.procs"],
        },
    }


async def _remove_tree(group: Path) -> None:
    for _ in range(100):
        try:
            for child in group.iterdir():
                if child.is_dir():
                    child.rmdir()
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            await asyncio.sleep(0.05)


async def test_timeout_kills_a_double_forked_daemon_that_left_the_session(
    agent_runtime: Path, tmp_path: Path, memory_cgroup: Path
) -> None:
    agent = await AgentProcess.start(
        agent_runtime, tmp_path, memory_cgroup=memory_cgroup, cgroups_manifest=_manifest()
    )
    workload = memory_cgroup / "workload"
    try:
        connection = await agent.connect()
        result, _, _ = await run_exec(connection, _DAEMON, timeout_s=1)
        assert (result["status"], result["signal"]) == ("timed_out", "SIGKILL")
        exec_cgroup = workload / result["exec_id"]
        check: dict[str, Any] = {}
        for _ in range(100):
            check, out, _ = await run_exec(connection, "ps -o args | grep '^sleep 4711'")
            if check["exit_code"] == 1:
                break
            await asyncio.sleep(0.05)
        assert check["exit_code"] == 1, out
        # The emptied exec cgroup is removed (at the latest when the next exec starts).
        await run_exec(connection, "true")
        assert not exec_cgroup.exists()
        await connection.close()
    finally:
        await agent.stop()
        await _remove_tree(workload)


async def test_each_exec_runs_in_its_own_cgroup_below_workload(
    agent_runtime: Path, tmp_path: Path, memory_cgroup: Path
) -> None:
    agent = await AgentProcess.start(
        agent_runtime, tmp_path, memory_cgroup=memory_cgroup, cgroups_manifest=_manifest()
    )
    workload = memory_cgroup / "workload"
    try:
        connection = await agent.connect()
        result, out, _ = await run_exec(connection, "grep memory /proc/self/cgroup")
        assert out.decode().strip().endswith(f"{memory_cgroup.name}/workload/{result['exec_id']}")
        # A daemon left behind by a finished exec is not killed (no timeout passed), and
        # its cgroup stays until it ends.
        started, _, _ = await run_exec(
            connection, "setsid sh -c 'sleep 0.5 &' </dev/null >/dev/null 2>&1", timeout_s=30
        )
        assert started["status"] == "exited"
        assert (workload / started["exec_id"]).is_dir()
        await asyncio.sleep(0.8)
        await run_exec(connection, "true")
        assert not (workload / started["exec_id"]).exists()
        await connection.close()
    finally:
        await agent.stop()
        await _remove_tree(workload)

"""Helpers for driver tests: talk to the fake agent, set up its workload cgroup."""

from __future__ import annotations

import asyncio
import json
import re

from scaigrid.worker.drivers.container import CGROUPS_MANIFEST_NAME, ContainerHandle

#: PID 1 of test bunkers: the fake agent (tests/worker/fake_agent.c) mounted at /.scaibunker.
FAKE_AGENT_ARGV = ("/.scaibunker/fake-agent", "--listen", "/.scaibunker-run/agent.sock")

_RC = re.compile(rb"\n__RC__ (\S+)\n$")


async def agent_exec(
    handle: ContainerHandle, command: str, timeout_s: float = 30
) -> tuple[int, str]:
    """Run ``sh -c command`` through the fake agent; return (exit status, stdout+stderr).

    The status is the process's exit code or 128 + signal; -1 when the agent could not fork.
    """
    reader, writer = await handle.open_agent_stream()
    try:
        writer.write(command.encode() + b"\n")
        await writer.drain()
        data = b""
        async with asyncio.timeout(timeout_s):
            while not (match := _RC.search(data)):
                chunk = await reader.read(65536)
                if not chunk:
                    raise ConnectionError(f"agent closed the stream early: {data[-300:]!r}")
                data += chunk
    finally:
        writer.close()
    status = match.group(1)
    body = data[: match.start()].decode(errors="replace")
    return (int(status) if status.isdigit() else -1), body


def manifest(handle: ContainerHandle) -> dict[str, object]:
    """The bunker's ``cgroups.json`` as the agent reads it."""
    return dict(json.loads((handle.state_dir / "run" / CGROUPS_MANIFEST_NAME).read_text()))


async def setup_workload_cgroup(handle: ContainerHandle) -> list[str]:
    """Do what the agent does at start: run the manifest's setup steps inside the bunker.

    Returns:
        The in-bunker ``cgroup.procs`` paths a workload process must join.
    """
    workload = manifest(handle)["workload"]
    assert isinstance(workload, dict)
    script = []
    for step in workload["setup"]:
        if step["op"] == "mkdir":
            script.append(f"mkdir -p {step['path']}")
        else:
            script.append(f"echo {step['value']} > {step['path']}")
    status, output = await agent_exec(handle, " && ".join(script))
    assert status == 0, output
    return list(workload["procs"])


def in_workload(procs: list[str], command: str) -> str:
    """A shell command that moves itself into the workload cgroup, then runs ``command``."""
    joins = " && ".join(f"echo $$ > {path}" for path in procs)
    # ";", not "&&": "a && b &" would background the joins too, in a subshell whose $$ is
    # still the parent shell's pid.
    return f"{joins} || exit 99; {command}"

"""Fixtures that run the real guest agent as PID 1 of a busybox-only "bunker".

* ``agent_runtime`` — the self-contained runtime tree, built once per session.
* ``make_root(path)`` — a root filesystem holding nothing but static busybox (no Python).
* ``AgentProcess.start(...)`` — ``unshare --mount --pid --fork`` + ``chroot`` into such a
  root with the runtime bind-mounted read-only at ``/.scaibunker`` and a host directory
  at ``/run/scaibunker`` for the socket; the agent is the namespace's PID 1 and the test
  process, outside that pid namespace, passes the agent's peer check unaided.
* ``agent`` / ``client`` — one shared agent and connection per test module.
* ``memory_cgroup`` — a fresh cgroup v1 memory group limited to 96 MiB (skips the test
  where the host has no writable v1 memory hierarchy).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from scaigrid.protocol.agent import AgentClient, AgentResponse
from scaigrid.worker.rootfs.agent_runtime import agent_argv, agent_env, ensure_agent_runtime

SOCKET_IN_BUNKER = "/run/scaibunker/agent.sock"
BUSYBOX = Path("/bin/busybox")

# Runs inside the new mount and pid namespaces as their PID 1, then becomes the agent.
_LAUNCH = r"""
set -e
R=$1; RT=$2; S=$3; CG=$4; CGMODE=$5; shift 5
if [ -n "$CG" ]; then
  echo $$ > "$CG/cgroup.procs"
  mount --bind "$CG" "$R/sys/fs/cgroup/memory"
  mount -o "remount,bind,$CGMODE" "$R/sys/fs/cgroup/memory"
fi
mount --bind "$RT" "$R/.scaibunker"
mount -o remount,bind,ro "$R/.scaibunker"
mount --bind "$S" "$R/run/scaibunker"
mount -t proc proc "$R/proc"
mount -t tmpfs -o mode=755 tmpfs "$R/dev"
mknod -m 666 "$R/dev/null" c 1 3
mknod -m 666 "$R/dev/zero" c 1 5
mknod -m 666 "$R/dev/urandom" c 1 9
mkdir "$R/dev/pts"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o size=1m,mode=1777 tmpfs "$R/small"
exec chroot "$R" "$@"
"""


def make_root(path: Path) -> Path:
    """A busybox-only root filesystem at ``path`` (``/small`` becomes a 1 MiB tmpfs)."""
    for name in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "proc",
        "dev",
        "etc",
        "home",
        "run/scaibunker",
        ".scaibunker",
        "root",
        "small",
        "tmp",
        "sys/fs/cgroup/memory",
    ):
        (path / name).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, path / "bin" / "busybox")
    subprocess.run(["chroot", str(path), "/bin/busybox", "--install", "-s"], check=True)
    (path / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n"
    )
    (path / "etc" / "group").write_text("root:x:0:\nuser:x:1000:\n")
    (path / "root").chmod(0o700)
    (path / "tmp").chmod(0o1777)
    return path


class AgentProcess:
    """One agent running as PID 1 in its own pid and mount namespaces."""

    def __init__(self, root: Path, sockdir: Path, proc: asyncio.subprocess.Process) -> None:
        self.root = root
        self.sockdir = sockdir
        self.proc = proc
        self.socket = sockdir / "agent.sock"
        self.started_to_ping_s = 0.0

    @classmethod
    async def start(
        cls,
        runtime: Path,
        workdir: Path,
        *extra_args: str,
        memory_cgroup: Path | None = None,
        cgroups_manifest: dict[str, Any] | None = None,
        timeout_s: float = 15.0,
    ) -> AgentProcess:
        """Start an agent in a fresh busybox root under ``workdir``.

        ``memory_cgroup``: a cgroup v1 memory directory the bunker joins, mounted at
        ``/sys/fs/cgroup/memory`` inside: read-only as container runtimes do, or
        read-write (delegated) when a ``cgroups_manifest`` is given, which is written
        next to the agent's socket as the container driver does.
        """
        root = make_root(workdir / "root")
        sockdir = workdir / "sock"
        sockdir.mkdir()
        if cgroups_manifest is not None:
            (sockdir / "cgroups.json").write_text(json.dumps(cgroups_manifest))
        argv = [*agent_argv(SOCKET_IN_BUNKER), "--shutdown-grace-s", "0.5", *extra_args]
        began = time.monotonic()
        log = open(workdir / "agent.log", "wb")  # noqa: SIM115 - closed with the process
        proc = await asyncio.create_subprocess_exec(
            "unshare",
            "--mount",
            "--pid",
            "--fork",
            "--propagation",
            "private",
            "--kill-child",
            "/bin/sh",
            "-c",
            _LAUNCH,
            "launch",
            str(root),
            str(runtime),
            str(sockdir),
            str(memory_cgroup or ""),
            "rw" if cgroups_manifest is not None else "ro",
            *argv,
            env=agent_env(),
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        agent = cls(root, sockdir, proc)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client = await agent.connect()
            except OSError:
                if proc.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"agent did not start: {agent.log()}") from None
                await asyncio.sleep(0.01)
                continue
            await client.ping()
            await client.close()
            break
        agent.started_to_ping_s = time.monotonic() - began
        return agent

    async def connect(self) -> AgentClient:
        reader, writer = await asyncio.open_unix_connection(str(self.socket))
        return await AgentClient.connect(reader, writer, timeout_s=5)

    def log(self) -> str:
        return (self.sockdir.parent / "agent.log").read_text(errors="replace")

    def host_pid(self) -> int:
        """The agent's pid as seen from the host (the child of ``unshare``)."""
        pid = self.proc.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return int(children[0])

    async def stop(self) -> int:
        """SIGTERM the agent and return the exit status of its namespace."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, IndexError, FileNotFoundError):
                os.kill(self.host_pid(), signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        assert self.proc.returncode is not None
        return self.proc.returncode


@pytest.fixture(scope="session")
def agent_runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_agent_runtime(tmp_path_factory.mktemp("agent-runtime-cache"))


@pytest.fixture(scope="module")
async def agent(
    agent_runtime: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[AgentProcess]:
    process = await AgentProcess.start(agent_runtime, tmp_path_factory.mktemp("bunker"))
    yield process
    await process.stop()


@pytest.fixture(scope="module")
async def client(agent: AgentProcess) -> AsyncIterator[AgentClient]:
    connection = await agent.connect()
    yield connection
    await connection.close()


MEMORY_HIERARCHY = Path("/sys/fs/cgroup/memory")


@pytest.fixture
async def memory_cgroup() -> AsyncIterator[Path]:
    group = MEMORY_HIERARCHY / f"scaibunker-test-{uuid.uuid4().hex[:12]}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"no writable cgroup v1 memory hierarchy: {exc}")
    (group / "memory.limit_in_bytes").write_text(str(96 << 20))
    yield group
    for _ in range(100):
        try:
            group.rmdir()
            return
        except OSError:
            await asyncio.sleep(0.05)


def new_exec_id() -> str:
    return f"exe_{uuid.uuid4().hex}"


async def run_exec(
    client: AgentClient,
    command: str | list[str],
    *,
    stdin: bytes | AsyncIterator[bytes] | None = None,
    deadline_s: float = 30.0,
    **args: Any,
) -> tuple[dict[str, Any], bytes, bytes]:
    """Run an exec to completion; return ``(x-result, stdout, stderr)``.

    ``args`` are further exec arguments (``timeout_s`` among them); ``deadline_s`` bounds
    the whole request.
    """
    body_args: dict[str, Any] = {"exec_id": new_exec_id(), "command": command, **args}
    if stdin is not None:
        body_args["stdin"] = "body"
    response = await client.request("POST", "/v1/exec", body_args, stdin, timeout_s=deadline_s)
    out, err = bytearray(), bytearray()
    async for kind, data in response.exec_events():
        (out if kind == "stdout" else err).extend(data)
    trailers = await response.trailers()
    return json.loads(trailers["x-result"]), bytes(out), bytes(err)


async def read_all(response: AgentResponse) -> bytes:
    return await response.read(1 << 30)

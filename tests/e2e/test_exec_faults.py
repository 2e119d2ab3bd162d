"""End to end: exec and files under hostile workloads and clients (issue #5 fault list)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from scaigrid.worker.net.userns import owner_leases
from tests.e2e.conftest import create_bunker
from tests.fixtures.stack import BASE, Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def bunker_id(stack: Stack, busybox_image: str) -> Any:
    bunker = create_bunker(stack, busybox_image, memory_mb=256, disk_mb=256)
    yield bunker["id"]
    with stack.client() as client:
        client.delete(f"{BASE}/bunkers/{bunker['id']}")


def _exec(client: httpx.Client, bunker_id: str, command: Any, **fields: Any) -> dict[str, Any]:
    response = client.post(f"{BASE}/bunkers/{bunker_id}/exec", json={"command": command, **fields})
    assert response.status_code == 200, response.text
    return dict(response.json()["data"])


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _worker_pid(stack: Stack) -> int:
    marker = str(stack.data_dir).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"scaigrid.worker.main" in cmdline and marker in cmdline:
            return int(entry.name)
    raise AssertionError("the stack's worker process was not found")


class _PeakRss:
    """Samples the resident size of some processes every 20 ms until stopped."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.base = {pid: _rss_kib(pid) for pid in pids}
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], _rss_kib(pid))

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def growth_mib(self, pid: int) -> float:
        return (self.peak[pid] - self.base[pid]) / 1024


def test_a_gibibyte_of_output_keeps_controller_and_worker_memory_bounded(
    stack: Stack, bunker_id: str
) -> None:
    total = 1 << 30
    pids = [stack.process.pid, _worker_pid(stack)]
    with stack.client(timeout_s=300) as client, _PeakRss(pids) as rss:
        result = _exec(
            client,
            bunker_id,
            f"head -c {total} /dev/zero | tr '\\0' x",
            timeout_s=240,
            max_output_bytes=1 << 20,
        )
    assert (result["status"], result["exit_code"]) == ("exited", 0)
    assert result["stdout_truncated"] is True
    head, marker, tail = result["stdout"].partition("\n[... ")
    assert head == "x" * (1 << 19) and marker
    omitted, _, kept_tail = tail.partition(" bytes omitted ...]\n")
    assert int(omitted) + (1 << 20) == total
    assert kept_tail == "x" * (1 << 19)
    for pid in pids:
        assert rss.growth_mib(pid) < 128, (pid, rss.growth_mib(pid))


def test_hundred_concurrent_execs_in_one_bunker(stack: Stack, bunker_id: str) -> None:
    def one(index: int) -> dict[str, Any]:
        with stack.client() as client:
            response = client.post(
                f"{BASE}/bunkers/{bunker_id}/exec",
                json={"command": f"echo {index}; sleep 0.2"},
            )
        assert response.status_code == 200, (response.text, stack.log_tail(20000))
        return dict(response.json()["data"])

    with concurrent.futures.ThreadPoolExecutor(max_workers=100) as pool:
        results = list(pool.map(one, range(100)))
    assert [(r["status"], r["stdout"]) for r in results] == [
        ("exited", f"{i}\n") for i in range(100)
    ]
    assert len({r["exec_id"] for r in results}) == 100


_SLOW_UPLOAD = """
import sys, time, httpx
url, key, bunker = sys.argv[1:4]
def body():
    for _ in range(1000):
        yield b"x" * 65536
        time.sleep(0.01)
print("uploading", flush=True)
httpx.put(
    f"{url}/v1/modules/scaibunker/bunkers/{bunker}/files",
    params={"path": "killed/upload.bin"},
    content=body(),
    headers={"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"},
    timeout=60,
)
"""


def test_a_client_killed_mid_upload_leaves_no_file(stack: Stack, bunker_id: str) -> None:
    with stack.client() as client:
        _exec(client, bunker_id, "mkdir -p killed")
        uploader = subprocess.Popen(
            [sys.executable, "-c", _SLOW_UPLOAD, stack.url, stack.admin_key, bunker_id],
            stdout=subprocess.PIPE,
        )
        assert uploader.stdout is not None
        assert uploader.stdout.readline() == b"uploading\n"
        time.sleep(2)
        os.kill(uploader.pid, signal.SIGKILL)
        uploader.wait(timeout=10)
        listing: list[Any] = []
        for _ in range(100):
            listing = client.get(
                f"{BASE}/bunkers/{bunker_id}/files/list", params={"path": "killed"}
            ).json()["data"]
            if not listing:
                break
            time.sleep(0.1)
        assert listing == []


def test_agent_answers_while_the_workload_uses_all_memory_and_pids(
    stack: Stack, bunker_id: str
) -> None:
    with stack.client() as client:
        bomb = _exec(
            client,
            bunker_id,
            "f() { sleep 300 & f; }; f & "
            "while true; do head -c 400000000 /dev/zero | tail >/dev/null; done",
            background=True,
        )
        time.sleep(3)
        for _ in range(3):
            ping = _exec(client, bunker_id, ["true"], timeout_s=30)
            assert ping["status"] in ("exited", "oom_killed"), ping
        listing = client.get(f"{BASE}/bunkers/{bunker_id}/files/list", params={"path": "/"})
        assert listing.status_code == 200
        killed = _exec(client, bunker_id, "kill -9 -1", user="root", timeout_s=30)
        assert killed["status"] in ("exited", "signaled"), killed
        for _ in range(100):
            record = client.get(f"{BASE}/bunkers/{bunker_id}/processes/{bomb['exec_id']}")
            if record.json()["data"]["status"] != "running":
                break
            time.sleep(0.1)
        after = _exec(client, bunker_id, "echo alive")
        assert after["stdout"] == "alive\n"


def test_foreground_output_under_the_cap_arrives_whole_from_a_fast_writer(
    stack: Stack, bunker_id: str
) -> None:
    """Output larger than the agent's 1 MiB buffer but under ``max_output_bytes``, written in
    big bursts, is never dropped in the middle: the writer waits for the controller instead."""
    size = 6_000_000
    with stack.client() as client:
        result = _exec(
            client,
            bunker_id,
            ["sh", "-c", f"head -c {size} /dev/zero | tr '\\000' a; echo END"],
            max_output_bytes=8_000_000,
            timeout_s=120,
        )
    assert result["exit_code"] == 0, result
    assert not result["stdout_truncated"], {k: v for k, v in result.items() if k != "stdout"}
    assert result["stdout"] == "a" * size + "END\n"


def test_an_argument_past_the_execve_limit_is_a_validation_error(
    stack: Stack, bunker_id: str
) -> None:
    """execve(2) refuses one argument over 128 KiB (E2BIG): the caller's input, so 422."""
    with stack.client() as client:
        response = client.post(
            f"{BASE}/bunkers/{bunker_id}/exec", json={"command": ["true", "a" * 200_000]}
        )
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "VALIDATION_ERROR"
        assert _exec(client, bunker_id, ["true", "a" * 100_000])["exit_code"] == 0


def _workload_pids(client: httpx.Client, bunker_id: str) -> int:
    """Tasks in the bunker's workload cgroup, the reading ``cat`` included (the shell
    execs a single command)."""
    read = _exec(client, bunker_id, "cat /sys/fs/cgroup/pids/workload/pids.current", timeout_s=30)
    assert read["status"] == "exited", read
    return int(read["stdout"])


def _wait_workload_quiet(client: httpx.Client, bunker_id: str, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        count = _workload_pids(client, bunker_id)
        if count <= 1 or time.monotonic() > deadline:
            return count
        time.sleep(0.2)


#: A fork bomb whose leader exits at once, leaving the bomb running in its exec's cgroup.
_BOMB = "bomb() { bomb | bomb & }; bomb >/dev/null 2>&1; echo leader-exits"


@contextlib.contextmanager
def _own_bunker(stack: Stack, image: str, **fields: Any) -> Iterator[str]:
    """A bunker of its own for a test that may wreck it; terminated afterwards."""
    bunker = create_bunker(stack, image, **fields)
    try:
        yield str(bunker["id"])
    finally:
        with stack.client() as client:
            client.delete(f"{BASE}/bunkers/{bunker['id']}")


def test_an_oom_killed_exec_leaves_no_process_of_its_cgroup(
    stack: Stack, busybox_image: str
) -> None:
    with (
        _own_bunker(stack, busybox_image, memory_mb=128, cpu_millicores=500) as bunker_id,
        stack.client() as client,
    ):
        # The leader shell itself grows (command substitution) until the OOM killer picks
        # it; its background sleepers would otherwise live on.
        result = _exec(
            client,
            bunker_id,
            "sleep 3600 & sleep 3600 & x=$(head -c 400000000 /dev/zero | tr '\\0' x)",
            timeout_s=60,
        )
        assert result["status"] == "oom_killed", result
        assert _wait_workload_quiet(client, bunker_id, 5) == 1


def test_the_signal_api_stops_a_fork_bomb_its_exited_leader_left_behind(
    stack: Stack, busybox_image: str
) -> None:
    with (
        _own_bunker(stack, busybox_image, cpu_millicores=500) as bunker_id,
        stack.client() as client,
    ):
        leader = _exec(client, bunker_id, _BOMB, timeout_s=30)
        assert (leader["status"], leader["exit_code"]) == ("exited", 0), leader
        time.sleep(1.0)
        # A normal exit keeps what the command left running.
        assert _workload_pids(client, bunker_id) > 50
        signal_url = f"{BASE}/bunkers/{bunker_id}/processes/{leader['exec_id']}/signal"
        signalled = client.post(signal_url, json={"signal": "SIGKILL", "group": True})
        assert signalled.status_code == 200, signalled.text
        assert _wait_workload_quiet(client, bunker_id, 10) == 1
        # Nothing is left to signal now.
        again = client.post(signal_url, json={"signal": "SIGKILL", "group": True})
        assert again.status_code == 409, again.text


def _host_leftovers(stack: Stack, bunker_id: str) -> list[str]:
    """What of ``bunker_id`` the host still holds: cgroup dirs, mounts, owner-uid leases."""
    found = [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/*/{bunker_id}")]
    found += [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{bunker_id}")]
    with open("/proc/self/mountinfo") as fh:
        found += [line.split()[4] for line in fh if bunker_id in line]
    found += [
        str(path)
        for path in owner_leases().values()
        if bunker_id in path and path.startswith(str(stack.data_dir))
    ]
    return found


def test_destroying_a_bunker_during_a_fork_bomb_releases_everything(
    stack: Stack, busybox_image: str
) -> None:
    bunker = create_bunker(stack, busybox_image, cpu_millicores=500)
    with stack.client() as client:
        leader = _exec(client, bunker["id"], _BOMB, timeout_s=30)
        assert leader["status"] == "exited", leader
        time.sleep(10.0)
        assert _host_leftovers(stack, bunker["id"])
        started = time.monotonic()
        response = client.delete(f"{BASE}/bunkers/{bunker['id']}")
        assert response.status_code in (200, 202), response.text
    left = _host_leftovers(stack, bunker["id"])
    while left and time.monotonic() - started < 30:
        time.sleep(0.2)
        left = _host_leftovers(stack, bunker["id"])
    assert not left, stack.log_tail(4000)
    assert "bunker_destroy_failed" not in stack.log_tail(200_000)


def test_killing_a_running_leader_through_the_api_kills_its_whole_cgroup(
    stack: Stack, bunker_id: str
) -> None:
    with stack.client() as client:
        started = _exec(
            client,
            bunker_id,
            "setsid sleep 3600 </dev/null >/dev/null 2>&1 & exec sleep 3600",
            background=True,
        )
        time.sleep(0.5)
        assert _workload_pids(client, bunker_id) >= 3  # two sleeps and cat
        signalled = client.post(
            f"{BASE}/bunkers/{bunker_id}/processes/{started['exec_id']}/signal",
            json={"signal": "SIGKILL"},
        )
        assert signalled.status_code == 200, signalled.text
        assert _wait_workload_quiet(client, bunker_id, 5) == 1

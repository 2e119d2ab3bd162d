"""The real ``scaibunker-worker`` process, real container bunkers, a stand-in controller.

The worker runs as its own process (``python -m scaigrid.worker.main``) and dials the
in-test WebSocket endpoint on 127.0.0.1; bunkers are real crun/runc containers booted from
a busybox-only tarball (no Python in the image: the agent brings its own runtime). Needs
root and an OCI runtime; skipped otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from scaigrid.ids import new_id
from scaigrid.worker.settings import WorkerSettings
from tests.fixtures.stack import build_busybox_tar

from .conftest import ControllerStub, StubConnection

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0 or not (shutil.which("crun") or shutil.which("runc")),
        reason="container bunkers need root and crun or runc",
    ),
]

BOOT_TIMEOUT_S = 120.0
START_TIMEOUT_S = 180.0


@dataclass
class Worker:
    """A worker process and the stand-in controller it is connected to."""

    controller: ControllerStub
    data_dir: Path
    image_tar: Path
    process: asyncio.subprocess.Process | None = None
    log_path: Path | None = None
    conn: StubConnection | None = None

    @property
    def link(self) -> StubConnection:
        """The worker's current connection."""
        assert self.conn is not None
        return self.conn

    async def start(self, join_token: str | None = None) -> StubConnection:
        """Start the worker process; return (and remember) its registered connection."""
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        argv = [
            sys.executable,
            "-m",
            "scaigrid.worker.main",
            "--controller",
            self.controller.http_url,
            "--data-dir",
            str(self.data_dir),
            "--labels",
            "suite=worker-e2e",
        ]
        if join_token:
            argv += ["--join-token", join_token]
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        try:
            self.conn = await self.controller.next_connection(timeout=START_TIMEOUT_S)
        except TimeoutError:
            pytest.fail("the worker did not register:\n" + self.log_tail())
        return self.conn

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the worker process and return its exit status."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(sig)
        return await asyncio.wait_for(self.process.wait(), 60)

    def log_tail(self, nbytes: int = 6000) -> str:
        assert self.log_path is not None
        return self.log_path.read_text(errors="replace")[-nbytes:]


def _image(tar: Path) -> dict[str, Any]:
    return {"id": "img_busybox_e2e", "name": "busybox", "source": {"kind": "tar", "path": str(tar)}}


def _bunker(bunker_id: str, **overrides: Any) -> dict[str, Any]:
    return {
        "id": bunker_id,
        "cpu_millicores": 500,
        "memory_mb": 256,
        "disk_mb": 128,
        "env_vars": {"GREETING": "hello"},
        "network_profile": "isolated",
        **overrides,
    }


async def _run(
    conn: StubConnection,
    kind: str,
    params: dict[str, Any],
    *,
    bunker_id: str | None = None,
    streams: dict[str, int] | None = None,
    timeout: float = 30.0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Send a task; return its result message and the progress it sent before."""
    task_id = await conn.task(kind, params, bunker_id=bunker_id, streams=streams)
    ack = await conn.next_for("task_ack", task_id)
    assert ack["accepted"] is True, ack
    result = await conn.next_for("task_result", task_id, timeout=timeout)
    progress = []
    with contextlib.suppress(TimeoutError):
        while True:
            progress.append((await conn.next_for("task_progress", task_id, 0.01))["progress"])
    return result, progress


async def _create(conn: StubConnection, worker: Worker, bunker_id: str) -> dict[str, Any]:
    result, progress = await _run(
        conn,
        "bunker.create",
        {"bunker": _bunker(bunker_id), "image": _image(worker.image_tar)},
        bunker_id=bunker_id,
        timeout=BOOT_TIMEOUT_S,
    )
    assert result["ok"], f"{result}\n{worker.log_tail()}"
    assert {"stage": "booting"} in progress
    return dict(result["result"])


async def _exec(
    conn: StubConnection, bunker_id: str, command: Any, stdin: bytes | None = None, **params: Any
) -> tuple[dict[str, Any], list[dict[str, Any]], bytes, bytes]:
    out, err = conn.allocate_stream(), conn.allocate_stream()
    streams = {"stdout": out, "stderr": err}
    if stdin is not None:
        streams["stdin"] = conn.allocate_stream()
    task_params = {
        "exec_id": new_id("exe"),
        "command": command,
        "cwd": None,
        "env": {},
        "user": "user",
        "timeout_s": 30,
        "stdin": "body" if stdin is not None else "none",
        **params,
    }
    task_id = await conn.task("exec.start", task_params, bunker_id=bunker_id, streams=streams)
    if stdin is not None:
        await conn.send_body(streams["stdin"], stdin)
    result = await conn.next_for("task_result", task_id, timeout=60)
    assert out in conn.eof and err in conn.eof, "both output streams end before the result"
    progress = []
    with contextlib.suppress(TimeoutError):
        while True:
            progress.append((await conn.next_for("task_progress", task_id, 0.01))["progress"])
    return result, progress, bytes(conn.streams[out]), bytes(conn.streams[err])


def _runtime_pid(data_dir: Path, bunker_id: str) -> int:
    """Host pid of a bunker's init, from its OCI runtime's state."""
    runtime = (data_dir / "bunkers" / bunker_id / "runtime").read_text().strip()
    state = subprocess.run(
        [runtime, "--root", str(data_dir / "runtime" / runtime), "state", bunker_id],
        capture_output=True,
        check=True,
        text=True,
    )
    return int(json.loads(state.stdout)["pid"])


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as mounts:
        return [line.split()[1] for line in mounts if line.split()[1].startswith(str(path))]


@pytest.fixture(scope="module")
async def worker_env() -> AsyncIterator[Worker]:
    """A stand-in controller plus a data dir whose ancestors the bunkers' root can traverse
    (pytest's own temporary directories are private to root)."""
    base = Path(tempfile.mkdtemp(prefix="scaibunker-worker-e2e-", dir="/tmp"))
    base.chmod(0o711)
    controller = ControllerStub(heartbeat_interval_s=0.5, auto_credit=True)
    await controller.start()
    worker = Worker(controller, base / "data", build_busybox_tar(base))
    try:
        yield worker
    finally:
        if worker.process is not None and worker.process.returncode is None:
            await worker.stop()
        await controller.stop()
        parent = WorkerSettings(controller_url="http://x", data_dir=worker.data_dir)
        for hierarchy in Path("/sys/fs/cgroup").glob(f"*/{parent.bunker_cgroup_parent()}"):
            with contextlib.suppress(OSError):
                hierarchy.rmdir()  # empty once the worker stopped its bunkers
        if not _mounts_under(base):
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
async def worker(worker_env: Worker) -> Worker:
    """The module's worker, joined with a join token."""
    await worker_env.start(join_token=worker_env.controller.new_join_token())
    return worker_env


async def test_worker_joins_and_reports_its_host(worker: Worker) -> None:
    register = worker.link.register
    assert register is not None
    assert register["drivers"] == [{"name": "container", "isolation": "container", "accel": None}]
    assert register["labels"] == {"suite": "worker-e2e"}
    assert register["capacity"]["cpu_millicores"] > 0
    assert register["capacity"]["gpu_count"] == 0 and register["capacity"]["gpu_type"] is None
    assert register["bunkers"] == []
    await worker.link.next("heartbeat")  # sent only after the credential is stored
    credential = worker.data_dir / "credential"
    assert stat.S_IMODE(credential.stat().st_mode) == 0o600
    assert credential.read_text().strip() in worker.controller.credentials


async def test_bake_and_create_share_one_build_then_exec_and_files(worker: Worker) -> None:
    conn = worker.link
    bunker_id = new_id("bnk")
    bake = asyncio.ensure_future(
        _run(conn, "image.bake", {"image": _image(worker.image_tar)}, timeout=BOOT_TIMEOUT_S)
    )
    created = await _create(conn, worker, bunker_id)
    baked, _ = await bake
    assert baked == {
        "type": "task_result",
        "task_id": baked["task_id"],
        "ok": True,
        "result": {"digest": None, "source_digest": None, "bake_source": "baked"},
    }
    assert created["driver"] == "container" and created["isolation"] == "container"
    assert isinstance(created["boot_ms"], int)

    result, progress, out, err = await _exec(
        conn, bunker_id, "echo $GREETING; echo oops >&2; id -u; exit 3"
    )
    assert result["ok"], result
    assert result["result"]["status"] == "exited" and result["result"]["exit_code"] == 3
    assert (out, err) == (b"hello\n1000\n", b"oops\n")
    assert progress[0]["event"] == "start" and progress[0]["pid"] == result["result"]["pid"]

    # Paced, as the controller asks for a foreground result: 3 MiB through a 1 MiB buffer
    # arrive whole however fast ``cat`` writes.
    payload = os.urandom(3 * 1024 * 1024 + 17)
    result, _, out, _ = await _exec(conn, bunker_id, ["cat"], stdin=payload, paced=True)
    assert result["result"]["exit_code"] == 0
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(payload).hexdigest()

    body = conn.allocate_stream()
    task_id = await conn.task(
        "files.write",
        {"path": "up/blob.bin", "mode": 0o640, "parents": True, "user": "user"},
        bunker_id=bunker_id,
        streams={"body": body},
    )
    await conn.send_body(body, payload)
    written = await conn.next_for("task_result", task_id, timeout=60)
    assert written["ok"], written
    assert written["result"]["sha256"] == hashlib.sha256(payload).hexdigest()
    assert written["result"]["size"] == len(payload)
    assert written["result"]["path"] == "/home/user/up/blob.bin"

    body = conn.allocate_stream()
    read, progress = await _run(
        conn,
        "files.read",
        {"path": "/home/user/up/blob.bin", "user": "user"},
        bunker_id=bunker_id,
        streams={"body": body},
    )
    assert read["result"] == {"size": len(payload)}
    assert progress[0]["size"] == len(payload)
    assert body in conn.eof and bytes(conn.streams[body]) == payload

    listing, _ = await _run(
        conn, "files.list", {"path": "up", "depth": 1, "user": "user"}, bunker_id=bunker_id
    )
    assert [e["name"] for e in listing["result"]["entries"]] == ["blob.bin"]
    moved, _ = await _run(
        conn,
        "files.move",
        {"src": "up/blob.bin", "dst": "up/moved.bin", "overwrite": False, "user": "user"},
        bunker_id=bunker_id,
    )
    assert moved["ok"] and moved["result"]["name"] == "moved.bin"
    made, _ = await _run(
        conn,
        "files.mkdir",
        {"path": "up/sub", "parents": False, "mode": 0o755, "user": "user"},
        bunker_id=bunker_id,
    )
    assert made["result"]["type"] == "dir"
    entry, _ = await _run(
        conn, "files.stat", {"path": "up/moved.bin", "user": "user"}, bunker_id=bunker_id
    )
    assert entry["result"]["size"] == len(payload) and entry["result"]["mode"] == "0640"
    deleted, _ = await _run(
        conn, "files.delete", {"path": "up", "recursive": True, "user": "user"}, bunker_id=bunker_id
    )
    assert deleted["result"] == {"path": "/home/user/up", "deleted": True}
    missing, _ = await _run(conn, "files.stat", {"path": "up", "user": "user"}, bunker_id=bunker_id)
    assert missing["ok"] is False and missing["error"]["code"] == "FILE_NOT_FOUND"

    beat = await conn.fresh("heartbeat")
    assert {"bunker_id": bunker_id, "state": "running"} in beat["bunkers"]
    assert {"image_id": "img_busybox_e2e", "digest": None, "state": "ready"} in beat["image_cache"]
    assert conn.register is not None
    assert beat["free"]["cpu_millicores"] <= conn.register["capacity"]["cpu_millicores"] - 500

    for _ in range(2):
        destroyed, _ = await _run(conn, "bunker.destroy", {}, bunker_id=bunker_id)
        assert destroyed["ok"] and destroyed["result"] == {}
    gone, _ = await _run(conn, "files.stat", {"path": "/", "user": "user"}, bunker_id=bunker_id)
    assert gone["error"]["code"] == "BUNKER_NOT_FOUND"
    assert not (worker.data_dir / "bunkers" / bunker_id).exists()


async def test_withheld_link_credit_never_blocks_the_process(worker: Worker) -> None:
    conn = worker.link
    bunker_id = new_id("bnk")
    await _create(conn, worker, bunker_id)
    out, err = conn.allocate_stream(), conn.allocate_stream()
    conn.hold_credit.add(out)
    flood = await conn.task(
        "exec.start",
        {
            "exec_id": new_id("exe"),
            "command": "yes 0123456789abcdef | head -c 8000000; touch /tmp/flood-done",
            "user": "user",
            "timeout_s": 60,
            "stdin": "none",
        },
        bunker_id=bunker_id,
        streams={"stdout": out, "stderr": err},
    )
    await conn.wait_stream(out, lambda data, eof: len(data) >= 1 << 20)
    for _ in range(100):
        _, _, done, _ = await _exec(conn, bunker_id, "test -e /tmp/flood-done && echo yes")
        if done == b"yes\n":
            break
        await asyncio.sleep(0.1)
    assert done == b"yes\n", "the process finished while its output was held back"
    assert len(conn.streams[out]) == 1 << 20, "no more than one window in flight"
    assert conn.pending_for("task_result", flood) == 0, "the result waits for the output"

    await conn.release(out)
    result = await conn.next_for("task_result", flood, timeout=60)
    assert result["ok"] and result["result"]["status"] == "exited"
    assert result["result"]["stdout_bytes"] == 8_000_000
    gaps = []
    with contextlib.suppress(TimeoutError):
        while True:
            progress = (await conn.next_for("task_progress", flood, 0.01))["progress"]
            if progress.get("event") == "gap":
                gaps.append(progress)
    dropped = sum(g["dropped_bytes"] for g in gaps)
    assert gaps and gaps[0]["stream"] == "stdout"
    assert len(conn.streams[out]) + dropped == 8_000_000
    destroyed, _ = await _run(conn, "bunker.destroy", {}, bunker_id=bunker_id)
    assert destroyed["ok"]


async def test_failed_image_answers_boot_failed_and_leaves_nothing(worker: Worker) -> None:
    conn = worker.link
    bunker_id = new_id("bnk")
    image = {
        "id": "img_missing_tar",
        "name": "ghost",
        "source": {"kind": "tar", "path": "/nope.tar"},
    }
    result, _ = await _run(
        conn, "bunker.create", {"bunker": _bunker(bunker_id), "image": image}, bunker_id=bunker_id
    )
    assert result["ok"] is False and result["error"]["code"] == "BOOT_FAILED"
    assert "ghost" in result["error"]["message"]
    beat = await conn.fresh("heartbeat")
    assert all(b["bunker_id"] != bunker_id for b in beat["bunkers"])
    assert {"image_id": "img_missing_tar", "digest": None, "state": "failed"} in beat["image_cache"]


async def test_bunkers_survive_a_reconnect_and_an_exited_init_is_reported(
    worker: Worker,
) -> None:
    bunker_id = new_id("bnk")
    await _create(worker.link, worker, bunker_id)

    await worker.link.drop()
    again = worker.conn = await worker.controller.next_connection(timeout=30)
    credential = (worker.data_dir / "credential").read_text().strip()
    assert again.authorization == f"Bearer {credential}"
    assert again.register is not None
    assert {"bunker_id": bunker_id, "state": "running"} in again.register["bunkers"]
    result, _, out, _ = await _exec(again, bunker_id, "echo still here")
    assert result["ok"] and out == b"still here\n"

    os.kill(_runtime_pid(worker.data_dir, bunker_id), signal.SIGKILL)
    event = await again.next("bunker_event", timeout=30)
    assert event == {"type": "bunker_event", "bunker_id": bunker_id, "event": "vm_exited"}
    while True:
        beat = await again.next("heartbeat", timeout=5)
        if {"bunker_id": bunker_id, "state": "failed"} in beat["bunkers"]:
            break
    refused, _ = await _run(again, "files.stat", {"path": "/", "user": "user"}, bunker_id=bunker_id)
    assert refused["error"]["code"] == "BUNKER_NOT_RUNNING"
    destroyed, _ = await _run(again, "bunker.destroy", {}, bunker_id=bunker_id)
    assert destroyed["ok"]


async def test_restart_destroys_leftovers_and_sigterm_stops_bunkers(worker: Worker) -> None:
    leftover = new_id("bnk")
    await _create(worker.link, worker, leftover)

    assert await worker.stop(signal.SIGKILL) == -signal.SIGKILL
    assert (worker.data_dir / "bunkers" / leftover).exists(), "the bunker outlived the worker"

    restarted = await worker.start()
    assert restarted.authorization is not None and "sbw_" in restarted.authorization
    assert restarted.register is not None and restarted.register["bunkers"] == []
    assert not (worker.data_dir / "bunkers" / leftover).exists()

    kept = new_id("bnk")
    await _create(restarted, worker, kept)
    assert await worker.stop(signal.SIGTERM) == 0
    assert not (worker.data_dir / "bunkers" / kept).exists()
    assert not _mounts_under(worker.data_dir / "bunkers")

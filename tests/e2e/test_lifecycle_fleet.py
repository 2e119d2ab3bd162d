"""End to end with two real workers: placement, drain/resume, worker loss (SIGKILL) (#4).

The second worker is a real ``scaibunker-worker`` process with its own data directory under
/var/tmp (and so its own cgroup parent), joined with a token from ``POST /workers/join-tokens``.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.fleet import (
    HOSTNAME,
    WORKER_START_TIMEOUT_S,
    ExtraWorker,
    wait_online,
    warm,
    workers_by_host,
)
from tests.fixtures.stack import BASE, Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def extra_worker(stack: Stack, busybox_image: str) -> Iterator[ExtraWorker]:
    data_dir = Path(tempfile.mkdtemp(prefix="scaibunker-fleet-", dir="/var/tmp"))
    os.chmod(data_dir, 0o755)
    worker = ExtraWorker(stack, data_dir)
    with stack.client() as client:
        token = client.post(f"{BASE}/workers/join-tokens", json={}).json()["data"]["token"]
        worker.start(token)
        worker.worker_id = wait_online(client, HOSTNAME, WORKER_START_TIMEOUT_S)["id"]
        warm(client, busybox_image, worker.worker_id)
    try:
        yield worker
    finally:
        worker.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def dev_worker_id(stack: Stack, extra_worker: ExtraWorker) -> Iterator[str]:
    """The dev worker's id; every test leaves both workers ``active``."""
    with stack.client() as client:
        ids = [w["id"] for w in client.get(f"{BASE}/workers").json()["data"]]
        others = [i for i in ids if i != extra_worker.worker_id]
        assert len(others) >= 1
        yield others[0]
        for worker_id in ids:
            client.post(f"{BASE}/workers/{worker_id}/resume")


def _create(client: httpx.Client, image: str, **fields: Any) -> httpx.Response:
    return client.post(
        f"{BASE}/bunkers",
        params={"wait_s": 60},
        json={"image": image, "memory_mb": 128, "disk_mb": 64, **fields},
    )


def _created(client: httpx.Client, image: str, **fields: Any) -> dict[str, Any]:
    response = _create(client, image, **fields)
    assert response.status_code == 201, response.text
    return dict(response.json()["data"])


def test_drain_moves_placement_to_the_other_worker(
    stack: Stack, busybox_image: str, extra_worker: ExtraWorker, dev_worker_id: str
) -> None:
    with stack.client() as client:
        drained = client.post(f"{BASE}/workers/{dev_worker_id}/drain")
        assert (drained.status_code, drained.json()["data"]["admin_state"]) == (200, "draining")
        again = client.post(f"{BASE}/workers/{dev_worker_id}/drain")
        assert (again.status_code, again.json()["data"]["admin_state"]) == (200, "draining")
        created = [_created(client, busybox_image) for _ in range(2)]
        assert [b["worker_id"] for b in created] == [extra_worker.worker_id] * 2
        assert all(b["status"] == "running" for b in created)

        detail = client.get(f"{BASE}/workers/{extra_worker.worker_id}").json()["data"]
        assert detail["running_bunkers"] >= 2
        assert detail["last_heartbeat"] is not None
        assert detail["allocated"]["memory_mb"] >= 256
        assert detail["capacity"]["memory_mb"] > 0

        client.post(f"{BASE}/workers/{extra_worker.worker_id}/drain")
        refused = _create(client, busybox_image)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "WORKER_UNAVAILABLE"

        resumed = client.post(f"{BASE}/workers/{dev_worker_id}/resume")
        assert (resumed.status_code, resumed.json()["data"]["admin_state"]) == (200, "active")
        placed = _created(client, busybox_image)
        assert placed["worker_id"] == dev_worker_id
        for bunker in [*created, placed]:
            client.delete(f"{BASE}/bunkers/{bunker['id']}")


def test_drain_of_unknown_worker_is_404(stack: Stack) -> None:
    with stack.client() as client:
        response = client.post(f"{BASE}/workers/wrk_00000000000000000000000000/drain")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "WORKER_NOT_FOUND"


def test_lost_worker_fails_its_bunkers_and_replaces_persistent_ones(
    stack: Stack, busybox_image: str, extra_worker: ExtraWorker, dev_worker_id: str
) -> None:
    with stack.client() as client:
        client.post(f"{BASE}/workers/{dev_worker_id}/drain")
        ephemeral = _created(client, busybox_image)
        persistent = _created(client, busybox_image, lifecycle_mode="persistent")
        assert ephemeral["worker_id"] == persistent["worker_id"] == extra_worker.worker_id
        client.post(f"{BASE}/workers/{dev_worker_id}/resume")
        before = client.get(f"{BASE}/quota-profiles/usage").json()["data"][0]["current"]

        extra_worker.kill()
        killed_at = time.monotonic()
        deadline = killed_at + 45
        failed: dict[str, Any] = {}
        while time.monotonic() < deadline:
            failed = client.get(f"{BASE}/bunkers/{ephemeral['id']}").json()["data"]
            if failed["status"] == "failed":
                break
            time.sleep(0.5)
        took = time.monotonic() - killed_at
        assert (failed["status"], failed["status_reason"]) == ("failed", "worker_lost")
        assert took <= 30, took
        after = client.get(f"{BASE}/quota-profiles/usage").json()["data"][0]["current"]
        assert after["memory_mb"] <= before["memory_mb"] - 128
        assert workers_by_host(client)[HOSTNAME]["connection"] == "offline"

        replaced: dict[str, Any] = {}
        while time.monotonic() < deadline + 60:
            replaced = client.get(f"{BASE}/bunkers/{persistent['id']}").json()["data"]
            if replaced["status"] == "running":
                break
            time.sleep(0.5)
        assert replaced["status"] == "running", replaced
        assert replaced["worker_id"] == dev_worker_id
        history = client.get(f"{BASE}/bunkers/{persistent['id']}").json()["data"]
        reasons = [(e["to"], e["reason"]) for e in history["status_history"]]
        assert ("pending", "worker_lost") in reasons

        extra_worker.start()
        wait_online(client, HOSTNAME, WORKER_START_TIMEOUT_S)
        time.sleep(2)
        still = client.get(f"{BASE}/bunkers/{ephemeral['id']}").json()["data"]
        assert (still["status"], still["status_reason"]) == ("failed", "worker_lost")
        client.delete(f"{BASE}/bunkers/{persistent['id']}")


def test_a_restarted_worker_s_bunkers_end_as_lost_and_persistent_ones_come_back(
    stack: Stack, busybox_image: str, extra_worker: ExtraWorker, dev_worker_id: str
) -> None:
    """A worker killed and started again at once reconnects without its bunkers: the
    reconciliation treats them as a lost worker's (SPEC §10.6), not as exited microVMs."""
    with stack.client() as client:
        client.post(f"{BASE}/workers/{dev_worker_id}/drain")
        ephemeral = _created(client, busybox_image)
        persistent = _created(client, busybox_image, lifecycle_mode="persistent")
        assert ephemeral["worker_id"] == persistent["worker_id"] == extra_worker.worker_id
        client.post(f"{BASE}/workers/{dev_worker_id}/resume")
        extra_worker.kill()
        extra_worker.start()
        wait_online(client, HOSTNAME, WORKER_START_TIMEOUT_S)
        deadline = time.monotonic() + 90
        ended: dict[str, Any] = {}
        back: dict[str, Any] = {}
        while time.monotonic() < deadline:
            ended = client.get(f"{BASE}/bunkers/{ephemeral['id']}").json()["data"]
            back = client.get(f"{BASE}/bunkers/{persistent['id']}").json()["data"]
            if ended["status"] == "failed" and back["status"] == "running":
                break
            time.sleep(0.5)
        assert (ended["status"], ended["status_reason"]) == ("failed", "worker_lost"), ended
        assert back["status"] == "running", back
        reasons = [(e["to"], e["reason"]) for e in back["status_history"]]
        assert ("pending", "worker_lost") in reasons
        client.delete(f"{BASE}/bunkers/{persistent['id']}")


def test_silent_worker_goes_stale_then_lost_and_does_not_resurrect(
    stack: Stack, busybox_image: str, extra_worker: ExtraWorker, dev_worker_id: str
) -> None:
    """A worker that stops heartbeating but keeps its connection (SIGSTOP) is ``stale`` at
    15 s (no new bunkers), its bunkers fail by 30 s, and after SIGCONT it is ``online`` again
    without bringing them back (SPEC §10.5, §10.6)."""
    assert extra_worker.process is not None
    with stack.client() as client:
        wait_online(client, HOSTNAME, WORKER_START_TIMEOUT_S)
        client.post(f"{BASE}/workers/{dev_worker_id}/drain")
        victim = _created(client, busybox_image)
        assert victim["worker_id"] == extra_worker.worker_id
        client.post(f"{BASE}/workers/{dev_worker_id}/resume")

        extra_worker.process.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            worker: dict[str, Any] = {}
            while time.monotonic() < stopped_at + 30:
                worker = client.get(f"{BASE}/workers/{extra_worker.worker_id}").json()["data"]
                if worker["connection"] != "online":
                    break
                time.sleep(0.5)
            assert worker["connection"] == "stale", worker
            assert time.monotonic() - stopped_at >= 9  # silent ≥ 15 s counting the last beat
            placed = _created(client, busybox_image)
            assert placed["worker_id"] == dev_worker_id
            client.delete(f"{BASE}/bunkers/{placed['id']}")

            failed: dict[str, Any] = {}
            while time.monotonic() < stopped_at + 45:
                failed = client.get(f"{BASE}/bunkers/{victim['id']}").json()["data"]
                if failed["status"] == "failed":
                    break
                time.sleep(0.5)
            assert (failed["status"], failed["status_reason"]) == ("failed", "worker_lost")
            assert time.monotonic() - stopped_at <= 30
        finally:
            extra_worker.process.send_signal(signal.SIGCONT)
        wait_online(client, HOSTNAME, WORKER_START_TIMEOUT_S)
        # The heartbeat still lists the bunker; the controller has the worker destroy it.
        log_path = extra_worker.data_dir / "worker.log"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            destroyed = [
                line
                for line in log_path.read_text(errors="replace").splitlines()
                if "bunker_destroyed" in line and victim["id"] in line
            ]
            if destroyed:
                break
            time.sleep(0.5)
        assert destroyed, "the returning worker did not clean up the failed bunker"
        still = client.get(f"{BASE}/bunkers/{victim['id']}").json()["data"]
        assert (still["status"], still["status_reason"]) == ("failed", "worker_lost")

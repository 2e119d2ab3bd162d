"""Isolation-class selection through a real controller whose worker offers ``container`` and
``qemu``. What a bunker does (exec, files, pause/resume, snapshots, network profiles,
terminate) is tested for every driver by ``tests/e2e/test_every_driver.py``.
One VM at a time (the CI machine has 2 cores)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.fleet import HOSTNAME, WORKER_START_TIMEOUT_S, ExtraWorker, wait_online, warm
from tests.fixtures.stack import BASE, Stack, StackError, build_busybox_tar, start_stack
from tests.vm.test_qemu_faults import _qemu_pids_for

pytestmark = pytest.mark.e2e

#: Seconds a TCG boot may take on a loaded 2-core machine (about 3-8 s when idle).
VM_BOOT_S = 180.0


@pytest.fixture(scope="module")
def vm_stack(vm_host_ready: None) -> Iterator[Stack]:
    data_dir = Path(tempfile.mkdtemp(prefix="scaibunker-vm-e2e-", dir="/var/tmp"))
    try:
        running = start_stack(data_dir, {"SCAIBUNKER_DRIVERS": "container,qemu"})
    except StackError as exc:
        shutil.rmtree(data_dir, ignore_errors=True)
        pytest.fail(str(exc))
    try:
        tar_path = build_busybox_tar(data_dir)
        running.register_image("busybox", {"kind": "tar", "path": str(tar_path)})
        yield running
    finally:
        running.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def _create(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    response = client.post(
        f"{BASE}/bunkers",
        params={"wait_s": 60},
        json={"image": "busybox", "memory_mb": 384, "disk_mb": 128, **fields},
    )
    assert response.status_code == 201, response.text
    bunker = dict(response.json()["data"])
    deadline = time.monotonic() + VM_BOOT_S
    while bunker["status"] in ("pending", "provisioning", "booting", "starting"):
        assert time.monotonic() < deadline, bunker
        time.sleep(0.5)
        bunker = dict(client.get(f"{BASE}/bunkers/{bunker['id']}").json()["data"])
    assert bunker["status"] == "running", bunker
    return bunker


def test_the_worker_advertises_both_isolation_classes(vm_stack: Stack) -> None:
    with vm_stack.client() as client:
        (worker,) = client.get(f"{BASE}/workers").json()["data"]
    drivers = {d["name"]: d["isolation"] for d in worker["drivers"]}
    assert drivers == {"container": "container", "qemu": "microvm"}


def test_a_bunker_that_asks_no_isolation_gets_a_microvm(vm_stack: Stack) -> None:
    """The strongest isolation class the fleet has is the default."""
    with vm_stack.client(timeout_s=240) as client:
        bunker = _create(client)
        try:
            assert (bunker["driver"], bunker["isolation"]) == ("qemu", "microvm")
        finally:
            deleted = client.delete(f"{BASE}/bunkers/{bunker['id']}")
        assert deleted.status_code in (200, 202), deleted.text
        deadline = time.monotonic() + 60
        while client.get(f"{BASE}/bunkers/{bunker['id']}").json()["data"]["status"] != "terminated":
            assert time.monotonic() < deadline
            time.sleep(0.5)
    assert not list((vm_stack.data_dir / "worker" / "qemu").glob("bnk_*"))


def test_a_container_bunker_is_placed_on_the_container_driver(vm_stack: Stack) -> None:
    with vm_stack.client() as client:
        bunker = _create(client, isolation="container")
        assert (bunker["driver"], bunker["isolation"]) == ("container", "container")
        client.delete(f"{BASE}/bunkers/{bunker['id']}")


# -- faults through the whole stack (issue #9) ---------------------------------------------


def _netns_of(bunker_id: str) -> list[str]:
    """Network namespaces named after the bunker (its tap device lives in one)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listing.splitlines() if bunker_id in line]


def _wait_gone(bunker_id: str, state_root: Path, timeout_s: float = 60) -> None:
    """Wait until no QEMU, state directory or network namespace of the bunker is left."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = {
            "qemu": _qemu_pids_for(bunker_id),
            "state": [str(p) for p in state_root.glob(bunker_id)],
            "netns": _netns_of(bunker_id),
        }
        if not any(left.values()):
            return
        assert time.monotonic() < deadline, f"left behind: {left}"
        time.sleep(0.5)


def _wait_status(client: httpx.Client, bunker_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 90
    while True:
        bunker = dict(client.get(f"{BASE}/bunkers/{bunker_id}").json()["data"])
        if bunker["status"] == status:
            return bunker
        assert time.monotonic() < deadline, bunker
        time.sleep(0.5)


def test_a_killed_vmm_fails_the_bunker_and_frees_its_resources(vm_stack: Stack) -> None:
    with vm_stack.client(timeout_s=240) as client:
        bunker = _create(client, network_profile="registry")
        bid = bunker["id"]
        (pid,) = _qemu_pids_for(bid)
        assert _netns_of(bid), "a registry bunker has a network namespace"
        os.kill(pid, signal.SIGKILL)
        failed = _wait_status(client, bid, "failed")
        assert failed["status_reason"] == "vm_exited", failed
        _wait_gone(bid, vm_stack.data_dir / "worker" / "qemu")
        # The failed bunker is gone for good: exec answers "not running".
        refused = client.post(f"{BASE}/bunkers/{bid}/exec", json={"command": "true"})
        assert refused.status_code == 409, refused.text


@pytest.fixture(scope="module")
def vm_worker(vm_stack: Stack) -> Iterator[ExtraWorker]:
    """A second worker process offering ``container,qemu``, busybox warmed; tests may kill
    and restart it (``start(drivers=VM_DRIVERS)``)."""
    data_dir = Path(tempfile.mkdtemp(prefix="scaibunker-vm-worker-", dir="/var/tmp"))
    os.chmod(data_dir, 0o755)
    worker = ExtraWorker(vm_stack, data_dir)
    with vm_stack.client(timeout_s=240) as client:
        token = client.post(f"{BASE}/workers/join-tokens", json={}).json()["data"]["token"]
        worker.start(token, drivers=VM_DRIVERS)
        try:
            worker.worker_id = wait_online(client, HOSTNAME, WORKER_START_TIMEOUT_S)["id"]
            warm(client, "busybox", worker.worker_id)
            yield worker
        finally:
            worker.stop()
            client.delete(f"{BASE}/workers/{worker.worker_id}")
            shutil.rmtree(data_dir, ignore_errors=True)


VM_DRIVERS = "container,qemu"


def _create_on(
    client: httpx.Client, worker: ExtraWorker, wait: bool = True, **fields: Any
) -> dict[str, Any]:
    """Create a microVM bunker on ``worker`` (the dev worker drained meanwhile)."""
    dev_id = next(
        w["id"] for w in client.get(f"{BASE}/workers").json()["data"] if w["id"] != worker.worker_id
    )
    assert client.post(f"{BASE}/workers/{dev_id}/drain").status_code == 200
    try:
        if wait:
            bunker = _create(client, **fields)
        else:
            response = client.post(
                f"{BASE}/bunkers",
                params={"wait_s": 60},
                json={"image": "busybox", "memory_mb": 384, "disk_mb": 128, **fields},
            )
            assert response.status_code == 201, response.text
            bunker = dict(response.json()["data"])
    finally:
        client.post(f"{BASE}/workers/{dev_id}/resume")
    assert bunker["worker_id"] == worker.worker_id, bunker
    return bunker


def test_a_restarted_worker_leaves_no_vmm_or_tap_behind(
    vm_stack: Stack, vm_worker: ExtraWorker
) -> None:
    """The second worker is SIGKILLed while its microVM runs: the VM outlives it; started
    again, the worker stops the VM and removes its namespace (and so its tap), and the
    controller marks the bunker failed (``worker_lost``)."""
    with vm_stack.client(timeout_s=240) as client:
        bunker = _create_on(client, vm_worker, network_profile="registry")
        bid = bunker["id"]
        (vmm,) = _qemu_pids_for(bid)

        vm_worker.kill()
        assert _qemu_pids_for(bid) == [vmm], "the VM outlives a SIGKILLed worker"
        vm_worker.start(drivers=VM_DRIVERS)
        wait_online(client, HOSTNAME, WORKER_START_TIMEOUT_S)
        _wait_gone(bid, vm_worker.data_dir / "qemu")
        assert _wait_status(client, bid, "failed")["status_reason"] == "worker_lost"


def test_a_missed_boot_deadline_fails_the_bunker_with_the_console_tail(
    vm_stack: Stack, vm_worker: ExtraWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second worker restarted with a 1 s VM boot deadline (TCG needs more): the
    bunker fails ``boot_failed`` with the guest's console tail in its message, and nothing
    of it is left on the worker."""
    monkeypatch.setenv("SCAIBUNKER_VM_BOOT_TIMEOUT_S", "1")
    with vm_stack.client(timeout_s=240) as client:
        vm_worker.stop()
        vm_worker.start(drivers=VM_DRIVERS)
        wait_online(client, HOSTNAME, WORKER_START_TIMEOUT_S)
        try:
            bunker = _create_on(client, vm_worker, wait=False, network_profile="registry")
            failed = _wait_status(client, bunker["id"], "failed")
            assert failed["status_reason"] == "boot_failed", failed
            message = failed["status_message"]
            assert "qemu driver failed" in message and "not ready within 1 s" in message
            assert "console:" in message, message
            _wait_gone(bunker["id"], vm_worker.data_dir / "qemu")
        finally:
            monkeypatch.delenv("SCAIBUNKER_VM_BOOT_TIMEOUT_S")
            vm_worker.stop()
            vm_worker.start(drivers=VM_DRIVERS)
            wait_online(client, HOSTNAME, WORKER_START_TIMEOUT_S)

"""End to end on a qemu microVM: a real controller whose worker offers ``container`` and
``qemu``; create → exec → files → pause/resume → terminate, and isolation-class selection.
One VM at a time (the CI machine has 2 cores)."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.stack import BASE, Stack, StackError, build_busybox_tar, start_stack

pytestmark = pytest.mark.e2e

#: Seconds a TCG boot may take on a loaded 2-core machine (about 3-8 s when idle).
VM_BOOT_S = 180.0


@pytest.fixture(scope="module")
def vm_stack(vm_host_ready: None) -> Iterator[Stack]:
    data_dir = Path(tempfile.mkdtemp(prefix="scaibunker-vm-e2e-", dir="/var/tmp"))
    try:
        running = start_stack(data_dir, {"SCAIBUNKER_DRIVERS": "container,qemu"})
    except StackError as exc:
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


def test_a_microvm_bunker_runs_exec_files_pause_resume_and_terminates(vm_stack: Stack) -> None:
    with vm_stack.client(timeout_s=240) as client:
        bunker = _create(client)  # no isolation asked: the strongest the fleet has
        bid = bunker["id"]
        assert (bunker["driver"], bunker["isolation"]) == ("qemu", "microvm")
        try:
            ran = client.post(
                f"{BASE}/bunkers/{bid}/exec", json={"command": "uname -r; cat /proc/1/comm"}
            )
            assert ran.status_code == 200, ran.text
            out = ran.json()["data"]["stdout"].split("\n")
            assert out[0].endswith("-cloud-amd64")  # the guest kernel, not the host's

            payload = b"inside a microVM\n" * 100
            put = client.put(
                f"{BASE}/bunkers/{bid}/files",
                params={"path": "note.txt"},
                content=payload,
                headers={"Content-Type": "application/octet-stream"},
            )
            assert put.status_code in (200, 201), put.text
            got = client.get(f"{BASE}/bunkers/{bid}/files", params={"path": "note.txt"})
            assert got.content == payload

            paused = client.post(f"{BASE}/bunkers/{bid}/pause")
            assert (paused.status_code, paused.json()["data"]["status"]) == (200, "paused")
            resumed = client.post(f"{BASE}/bunkers/{bid}/resume")
            assert (resumed.status_code, resumed.json()["data"]["status"]) == (200, "running")
            again = client.post(f"{BASE}/bunkers/{bid}/exec", json={"command": "cat note.txt"})
            assert again.json()["data"]["stdout"].encode() == payload
        finally:
            deleted = client.delete(f"{BASE}/bunkers/{bid}")
        assert deleted.status_code in (200, 202), deleted.text
        deadline = time.monotonic() + 60
        while client.get(f"{BASE}/bunkers/{bid}").json()["data"]["status"] != "terminated":
            assert time.monotonic() < deadline
            time.sleep(0.5)
    assert not list((vm_stack.data_dir / "worker" / "qemu").glob("bnk_*"))


def test_a_container_bunker_is_placed_on_the_container_driver(vm_stack: Stack) -> None:
    with vm_stack.client() as client:
        bunker = _create(client, isolation="container")
        assert (bunker["driver"], bunker["isolation"]) == ("container", "container")
        client.delete(f"{BASE}/bunkers/{bunker['id']}")


DNS_PROBE = "nslookup scaibunker-probe.invalid 2>&1; cat /etc/resolv.conf; ip -4 route"


def _dns(client: httpx.Client, bunker_id: str) -> str:
    ran = client.post(f"{BASE}/bunkers/{bunker_id}/exec", json={"command": DNS_PROBE})
    assert ran.status_code == 200, ran.text
    return str(ran.json()["data"]["stdout"])


def test_a_network_profile_works_the_same_in_a_microvm_and_a_container(
    vm_stack: Stack,
) -> None:
    """The ``registry`` profile: the bunker's resolver (its gateway) answers and refuses a
    name outside the registry list, in a VM exactly as in a container."""
    with vm_stack.client(timeout_s=240) as client:
        vm = _create(client, network_profile="registry")
        assert vm["driver"] == "qemu"
        container = _create(client, network_profile="registry", isolation="container")
        try:
            in_vm, in_container = _dns(client, vm["id"]), _dns(client, container["id"])
        finally:
            client.delete(f"{BASE}/bunkers/{vm['id']}")
            client.delete(f"{BASE}/bunkers/{container['id']}")
    for output in (in_vm, in_container):
        assert "can't find scaibunker-probe.invalid" in output, output
        assert "timed out" not in output
        assert "default via" in output and "nameserver" in output
    # The guest's resolver is its gateway, as for the container.
    vm_gateway = in_vm.split("default via ")[1].split()[0]
    assert f"nameserver {vm_gateway}" in in_vm

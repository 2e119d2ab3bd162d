"""One end-to-end suite, every driver on this machine (issue #9 item 5).

A real controller whose dev worker runs ``container`` and, when ``qemu-system-x86_64`` and
the guest kernel are here, ``qemu`` (microVMs; TCG on the CI machine). The ``bunker``
fixture is parametrised by driver name: each driver gets one bunker (``registry`` network
profile) that every test of this module drives through the public API, so the same
assertions hold for a container and a microVM:

create → exec → files → shell → pause/resume → snapshot (restored into every driver, tree hashes
compared; also of a paused bunker) → network profile → a write past ``disk_mb`` →
terminate (nothing left on the worker).

Adding a surface: write one more ``test_*`` taking ``bunker`` (a :class:`DriverBunker`) and
``suite_stack``, above the terminate section (tests run in file order per driver and the
last one ends the shared bunker); it runs against every driver.

Cost under TCG: one microVM for the shared bunker, one more at a time for the restore
tests (at most two VMs at once on the 2-core CI machine).
"""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from scaigrid.client import Client
from tests.fixtures.stack import (
    BASE,
    Stack,
    StackError,
    build_busybox_tar,
    remove_data_dir,
    start_stack,
)
from tests.vm.conftest import vm_skip_reason

pytestmark = pytest.mark.e2e

#: Driver name → the isolation class a bunker asks for to get it.
DRIVERS = {"container": "container", "qemu": "microvm"}
#: Seconds a create may take (a TCG boot on a loaded 2-core machine: 3-60 s).
CREATE_S = 240.0
#: Seconds a snapshot may take to become ready.
SNAPSHOT_S = 180.0


def _qemu_reason() -> str | None:
    return vm_skip_reason()


@pytest.fixture(scope="module")
def suite_stack() -> Iterator[Stack]:
    """The stack, with ``qemu`` beside ``container`` when it can run here, and the busybox
    image registered."""
    data_dir = Path(tempfile.mkdtemp(prefix="scaibunker-drivers-", dir="/var/tmp"))
    reason = _qemu_reason()
    if reason is not None:
        print(f"driver suite without qemu: {reason}")
    drivers = "container" if reason is not None else "container,qemu"
    try:
        running = start_stack(data_dir, {"SCAIBUNKER_DRIVERS": drivers})
    except StackError as exc:
        remove_data_dir(data_dir)
        pytest.fail(str(exc))
    try:
        tar_path = build_busybox_tar(data_dir)
        running.register_image("busybox", {"kind": "tar", "path": str(tar_path)})
        yield running
    finally:
        running.stop()
        leaked = remove_data_dir(data_dir)
    assert not leaked, f"the stack left mounts behind: {leaked}"


@dataclass
class DriverBunker:
    """The shared bunker of one driver."""

    id: str
    driver: str
    body: dict[str, Any]


def create(client: httpx.Client, driver: str, **fields: Any) -> dict[str, Any]:
    """Create a busybox bunker on ``driver`` and wait until it runs."""
    body = {
        "image": "busybox",
        "memory_mb": 384,
        "disk_mb": 128,
        "isolation": DRIVERS[driver],
        **fields,
    }
    response = client.post(f"{BASE}/bunkers", params={"wait_s": 60}, json=body)
    assert response.status_code == 201, response.text
    bunker = dict(response.json()["data"])
    deadline = time.monotonic() + CREATE_S
    while bunker["status"] in ("pending", "provisioning", "booting", "starting"):
        assert time.monotonic() < deadline, bunker
        time.sleep(0.5)
        bunker = dict(client.get(f"{BASE}/bunkers/{bunker['id']}").json()["data"])
    assert bunker["status"] == "running", bunker
    assert bunker["driver"] == driver, bunker
    return bunker


def terminate(client: httpx.Client, bunker_id: str, timeout_s: float = 90) -> dict[str, Any]:
    """Delete a bunker and wait until it is terminated."""
    deleted = client.delete(f"{BASE}/bunkers/{bunker_id}")
    assert deleted.status_code in (200, 202), deleted.text
    deadline = time.monotonic() + timeout_s
    while True:
        bunker = dict(client.get(f"{BASE}/bunkers/{bunker_id}").json()["data"])
        if bunker["status"] in ("terminated", "failed"):
            return bunker
        assert time.monotonic() < deadline, bunker
        time.sleep(0.5)


def run(client: httpx.Client, bunker_id: str, command: str, **fields: Any) -> dict[str, Any]:
    """Foreground exec through the API; return its result object."""
    ran = client.post(
        f"{BASE}/bunkers/{bunker_id}/exec", json={"command": command, "user": "root", **fields}
    )
    assert ran.status_code == 200, ran.text
    return dict(ran.json()["data"])


def ok(client: httpx.Client, bunker_id: str, command: str) -> str:
    """Run ``command`` as root; assert it exits 0; return its stdout."""
    result = run(client, bunker_id, command)
    assert result["exit_code"] == 0, result
    return str(result["stdout"])


@pytest.fixture(scope="module", params=list(DRIVERS))
def bunker(request: pytest.FixtureRequest, suite_stack: Stack) -> Iterator[DriverBunker]:
    """One running bunker (``registry`` profile) per driver, shared by the module's tests;
    ``qemu`` is skipped, with the reason printed, where it cannot run."""
    driver = str(request.param)
    if driver == "qemu" and (reason := _qemu_reason()) is not None:
        print(f"skipping the qemu driver: {reason}")
        pytest.skip(reason)
    with suite_stack.client(timeout_s=CREATE_S) as client:
        body = create(client, driver, network_profile="registry")
    try:
        yield DriverBunker(body["id"], driver, body)
    finally:
        with suite_stack.client() as client:
            current = client.get(f"{BASE}/bunkers/{body['id']}").json()["data"]
            if current["status"] not in ("terminated", "failed"):
                terminate(client, body["id"])


# -- exec ---------------------------------------------------------------------------------


def test_exec_runs_in_the_drivers_kernel_with_exit_code_and_streams(
    bunker: DriverBunker, suite_stack: Stack
) -> None:
    assert bunker.body["isolation"] == DRIVERS[bunker.driver]
    with suite_stack.client() as client:
        result = run(client, bunker.id, "uname -r; echo oops >&2; exit 3", user="user")
    assert (result["exit_code"], result["stderr"]) == (3, "oops\n")
    kernel = result["stdout"].strip()
    host_kernel = subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip()
    if bunker.driver == "qemu":
        assert kernel != host_kernel and kernel.endswith("-cloud-amd64"), kernel
    else:
        assert kernel == host_kernel


def test_exec_sees_the_bunker_as_root_and_as_user(bunker: DriverBunker, suite_stack: Stack) -> None:
    with suite_stack.client() as client:
        as_user = run(client, bunker.id, "id -u; pwd", user="user")
        as_root = ok(client, bunker.id, "id -u; stat -c %u:%g /etc/passwd")
    assert as_user["stdout"].split() == ["1000", "/home/user"], as_user
    assert as_root.split() == ["0", "0:0"]


# -- files --------------------------------------------------------------------------------


def test_files_round_trip_list_stat_and_delete(bunker: DriverBunker, suite_stack: Stack) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    files = f"{BASE}/bunkers/{bunker.id}/files"
    with suite_stack.client() as client:
        put = client.put(
            files,
            params={"path": "suite/data.bin"},
            content=payload,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert put.status_code in (200, 201), put.text
        assert client.get(files, params={"path": "suite/data.bin"}).content == payload
        listed = client.get(f"{files}/list", params={"path": "suite"})
        assert listed.status_code == 200, listed.text
        assert [e["name"] for e in listed.json()["data"]] == ["data.bin"]
        stat = client.get(f"{files}/stat", params={"path": "suite/data.bin"})
        assert stat.json()["data"]["size"] == len(payload)
        # The file is the one exec sees.
        seen = ok(client, bunker.id, "md5sum /home/user/suite/data.bin").split()[0]
        assert seen == hashlib.md5(payload).hexdigest()
        assert client.delete(files, params={"path": "suite/data.bin"}).status_code in (200, 204)
        gone = client.get(files, params={"path": "suite/data.bin"})
        assert gone.status_code == 404, gone.text


# -- interactive shell --------------------------------------------------------------------


def test_the_shell_is_a_terminal_with_size_resize_and_exit_code(
    bunker: DriverBunker, suite_stack: Stack
) -> None:
    """The WebSocket PTY (SPEC §5) through the SDK, the same in every driver."""
    with (
        Client(suite_stack.url, suite_stack.admin_key) as sdk,
        sdk.shell(bunker.id, cols=100, rows=30) as shell,
    ):
        shell.send(b"echo U=$(id -u) T=$TERM; stty size\n")
        out = shell.read_until(b"30 100", timeout_s=60)
        assert b"U=1000 T=xterm-256color" in out
        shell.resize(132, 43)
        time.sleep(0.5)
        shell.send(b"stty size\n")
        shell.read_until(b"43 132", timeout_s=60)
        shell.send(b"exit 7\n")
        assert shell.wait(60) == 7


# -- pause and resume ---------------------------------------------------------------------


def test_pause_freezes_the_workload_and_resume_continues(
    bunker: DriverBunker, suite_stack: Stack
) -> None:
    counter = "n=0; while [ $n -lt 3000 ]; do n=$((n+1)); echo $n > /tmp/count; sleep 0.1; done"
    with suite_stack.client() as client:
        started = run(client, bunker.id, counter, background=True)
        pid = started["pid"]
        try:
            time.sleep(1)
            paused = client.post(f"{BASE}/bunkers/{bunker.id}/pause")
            assert (paused.status_code, paused.json()["data"]["status"]) == (200, "paused")
            refused = client.post(f"{BASE}/bunkers/{bunker.id}/exec", json={"command": "true"})
            assert refused.status_code == 409, refused.text
            assert refused.json()["error"]["code"] == "BUNKER_NOT_RUNNING"
            time.sleep(1)
            resumed = client.post(f"{BASE}/bunkers/{bunker.id}/resume")
            assert (resumed.status_code, resumed.json()["data"]["status"]) == (200, "running")
            first = int(ok(client, bunker.id, "cat /tmp/count"))
            time.sleep(1.5)
            second = int(ok(client, bunker.id, "cat /tmp/count"))
            assert second > first, "the workload did not continue after resume"
        finally:
            run(client, bunker.id, f"kill {pid}")


# -- snapshots ----------------------------------------------------------------------------

#: A layer with every kind of change over the busybox image.
MAKE_CHANGES = r"""
set -e
rm -rf /data
mkdir -p /data/sub /data/empty
echo hello > /data/a.txt
printf 'x%.0s' $(seq 1 5000) > /data/sub/b.txt
ln /data/a.txt /data/hardlink
ln -s ../a.txt /data/sub/symlink
chmod 4750 /data/sub/b.txt
chown 1000:50 /data/a.txt
dd if=/dev/urandom of=/data/sparse bs=4096 seek=2560 count=1 2>/dev/null
mkfifo /data/fifo
rm /etc/group
"""
#: The tree with owners, modes, link counts, sizes and contents of non-directories, and
#: mtimes of the layer's files (a directory's size depends on the filesystem's block size).
TREE_HASH = r"""
cd / && find data etc -xdev 2>/dev/null | sort | while read f; do
  stat -c '%n %f %u %g %h' "$f"
  [ -d "$f" ] || stat -c '%s' "$f"
  case "$f" in data/*) [ -L "$f" ] || [ -d "$f" ] || stat -c '%Y' "$f";; esac
  if [ -L "$f" ]; then readlink "$f"; elif [ -f "$f" ]; then md5sum "$f"; fi
done
"""


def _wait_snapshot(client: httpx.Client, snapshot_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + SNAPSHOT_S
    while True:
        snap = dict(client.get(f"{BASE}/snapshots/{snapshot_id}").json()["data"])
        if snap["status"] != "uploading" and snap["status"] != "pending":
            return snap
        assert time.monotonic() < deadline, snap
        time.sleep(0.5)


def test_a_snapshot_restores_into_every_driver_with_the_same_tree(
    bunker: DriverBunker, suite_stack: Stack
) -> None:
    """The layer (hard link, symlink, setuid, owners, sparse file, FIFO, a deleted image
    file) written in this driver's bunker comes back identical in a bunker of each driver
    here; the source keeps running (it is thawed after the snapshot)."""
    with suite_stack.client(timeout_s=CREATE_S) as client:
        ok(client, bunker.id, MAKE_CHANGES)
        # Written right before the snapshot: still in a guest's page cache, not on its disk.
        ok(client, bunker.id, "echo last > /data/last")
        expected = ok(client, bunker.id, TREE_HASH)
        taken = client.post(f"{BASE}/bunkers/{bunker.id}/snapshot", json={})
        assert taken.status_code == 201, taken.text
        snap = _wait_snapshot(client, taken.json()["data"]["snapshot_id"])
        assert snap["status"] == "ready", snap
        assert client.get(f"{BASE}/bunkers/{bunker.id}").json()["data"]["status"] == "running"
        assert ok(client, bunker.id, TREE_HASH) == expected
        for target in available_drivers():
            restored = create(
                client, target, snapshot_id=snap["snapshot_id"], network_profile="isolated"
            )
            try:
                assert ok(client, restored["id"], TREE_HASH) == expected, target
                assert ok(client, restored["id"], "cat /data/last") == "last\n"
            finally:
                terminate(client, restored["id"])


def test_a_paused_bunker_is_snapshotted_with_its_last_writes_and_stays_paused(
    bunker: DriverBunker, suite_stack: Stack
) -> None:
    """A microVM is thawed just long enough to flush its disks; the snapshot holds what was
    written right before the pause and restores into a container bunker."""
    with suite_stack.client(timeout_s=CREATE_S) as client:
        ok(client, bunker.id, "echo before-pause > /paused-write")
        paused = client.post(f"{BASE}/bunkers/{bunker.id}/pause")
        assert paused.json()["data"]["status"] == "paused", paused.text
        try:
            taken = client.post(f"{BASE}/bunkers/{bunker.id}/snapshot", json={})
            assert taken.status_code == 201, taken.text
            snap = _wait_snapshot(client, taken.json()["data"]["snapshot_id"])
            assert snap["status"] == "ready", snap
            current = client.get(f"{BASE}/bunkers/{bunker.id}").json()["data"]
            assert current["status"] == "paused", current
        finally:
            client.post(f"{BASE}/bunkers/{bunker.id}/resume")
        restored = create(
            client, "container", snapshot_id=snap["snapshot_id"], network_profile="isolated"
        )
        try:
            assert ok(client, restored["id"], "cat /paused-write") == "before-pause\n"
        finally:
            terminate(client, restored["id"])


def available_drivers() -> list[str]:
    """Drivers the suite stack runs."""
    return ["container"] if _qemu_reason() is not None else list(DRIVERS)


# -- network profile ----------------------------------------------------------------------

DNS_PROBE = "nslookup scaibunker-probe.invalid 2>&1; cat /etc/resolv.conf; ip -4 route"


def test_the_registry_profile_resolves_through_the_gateway_and_refuses_others(
    bunker: DriverBunker, suite_stack: Stack
) -> None:
    """The bunker's resolver (its gateway) answers and refuses a name outside the registry
    list, the same in every driver."""
    with suite_stack.client() as client:
        output = str(run(client, bunker.id, DNS_PROBE)["stdout"])
    assert "can't find scaibunker-probe.invalid" in output, output
    assert "timed out" not in output
    assert "default via" in output and "nameserver" in output
    gateway = output.split("default via ")[1].split()[0]
    assert f"nameserver {gateway}" in output


# -- disk limit ---------------------------------------------------------------------------


def test_writing_past_disk_mb_fails_inside_and_the_bunker_keeps_working(
    bunker: DriverBunker, suite_stack: Stack
) -> None:
    """The writable layer holds ``disk_mb`` (128 MiB): a bigger write fails with ENOSPC in
    the bunker, and once the file is removed the bunker writes again."""
    with suite_stack.client(timeout_s=CREATE_S) as client:
        filled = run(client, bunker.id, "dd if=/dev/zero of=/fill bs=1M count=200", timeout_s=180)
        assert filled["exit_code"] != 0, filled
        assert "No space left" in filled["stderr"], filled
        assert ok(client, bunker.id, "rm /fill && echo fine > /after && cat /after") == "fine\n"


# -- terminate (last: it ends the shared bunker) -------------------------------------------


def _vmm_processes(bunker_id: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if bunker_id.encode() in cmdline and b"qemu-system" in cmdline:
            pids.append(int(entry.name))
    return pids


def test_terminate_releases_everything_on_the_worker(
    bunker: DriverBunker, suite_stack: Stack
) -> None:
    with suite_stack.client() as client:
        final = terminate(client, bunker.id)
    assert final["status"] == "terminated", final
    worker_dir = suite_stack.data_dir / "worker"
    left = list(worker_dir.glob(f"*/{bunker.id}*"))
    assert left == [], left
    assert _vmm_processes(bunker.id) == []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert bunker.id not in namespaces

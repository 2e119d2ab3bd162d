"""Boot failures, a killed VMM and a restarted worker: each leaves nothing behind."""

from __future__ import annotations

import os
import signal

import pytest

from scaigrid.worker.drivers.base import DriverError
from scaigrid.worker.drivers.qemu import QemuDriver
from tests.vm.conftest import VM_DATA, SpecFactory, connect


def _qemu_pids_for(bunker_id: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        if bunker_id.encode() in cmdline and b"qemu-system" in cmdline:
            pids.append(int(entry))
    return pids


async def test_an_agent_that_never_starts_fails_the_boot_with_the_console_tail(
    qemu_driver: QemuDriver, make_spec: SpecFactory
) -> None:
    spec = make_spec(init_argv=("/no/such/agent",))
    with pytest.raises(DriverError) as caught:
        await qemu_driver.start(spec)
    message = str(caught.value)
    assert "exited during boot" in message
    assert "console:" in message and "Kernel panic" in message
    assert not (qemu_driver._bunkers_dir / spec.bunker_id).exists()
    assert _qemu_pids_for(spec.bunker_id) == []


async def test_the_boot_deadline_kills_the_vm(
    qemu_driver: QemuDriver, make_spec: SpecFactory
) -> None:
    impatient = QemuDriver(VM_DATA, accel=qemu_driver.accel, boot_timeout_s=0.5)
    spec = make_spec()
    with pytest.raises(DriverError, match=r"not ready within 0 s; console:"):
        await impatient.start(spec)
    assert not (qemu_driver._bunkers_dir / spec.bunker_id).exists()
    assert _qemu_pids_for(spec.bunker_id) == []


async def test_a_killed_vmm_ends_the_bunker_and_stop_cleans_up(
    qemu_driver: QemuDriver, make_spec: SpecFactory
) -> None:
    spec = make_spec()
    handle = await qemu_driver.start(spec)
    os.kill(handle.process.pid, signal.SIGKILL)
    assert await handle.wait_exit() == -signal.SIGKILL
    with pytest.raises(ConnectionError):
        await handle.open_agent_stream()
    await qemu_driver.stop(spec.bunker_id)
    assert not (qemu_driver._bunkers_dir / spec.bunker_id).exists()
    assert spec.bunker_id not in await qemu_driver.list_leftovers()


async def test_a_restarted_worker_kills_the_vms_it_finds(
    qemu_driver: QemuDriver, make_spec: SpecFactory
) -> None:
    spec = make_spec()
    handle = await qemu_driver.start(spec)
    client = await connect(handle)
    await client.ping(timeout_s=10)
    await client.close()
    restarted = QemuDriver(VM_DATA, accel=qemu_driver.accel)
    assert spec.bunker_id in await restarted.list_leftovers()
    await restarted.stop(spec.bunker_id)
    assert _qemu_pids_for(spec.bunker_id) == []
    assert await handle.wait_exit() == -signal.SIGKILL
    assert spec.bunker_id not in await restarted.list_leftovers()
    await qemu_driver.stop(spec.bunker_id)


async def test_a_missing_network_namespace_fails_the_boot_and_leaves_nothing(
    qemu_driver: QemuDriver, make_spec: SpecFactory
) -> None:
    spec = make_spec(netns_path="/var/run/netns/sbvm-no-such-namespace")
    with pytest.raises(DriverError, match="cannot give the VM its network"):
        await qemu_driver.start(spec)
    assert not (qemu_driver._bunkers_dir / spec.bunker_id).exists()
    assert _qemu_pids_for(spec.bunker_id) == []

"""Boot failures, a killed VMM and a restarted worker: each leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from scaigrid.worker.drivers.base import DriverError
from scaigrid.worker.drivers.qemu import QemuDriver
from scaigrid.worker.vm.console import LINE_MAX, TAIL_LINES
from tests.vm.conftest import VM_DATA, SpecFactory, connect
from tests.vm.test_qemu_driver import run


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


async def test_a_guest_kernel_panic_ends_the_vm_with_the_panic_on_the_console(
    qemu_driver: QemuDriver, make_spec: SpecFactory
) -> None:
    """A panic after boot (sysrq ``c``): the guest kernel does not reboot (``panic=-1``
    with ``-no-reboot``), QEMU exits, and the console tail names the panic."""
    spec = make_spec()
    handle = await qemu_driver.start(spec)
    client = await connect(handle)
    try:
        crash = asyncio.ensure_future(
            run(client, "echo c > /proc/sysrq-trigger", user="root", deadline_s=60)
        )
        status = await asyncio.wait_for(handle.wait_exit(), 120)
        crash.cancel()
        await asyncio.gather(crash, return_exceptions=True)
        assert status == 0  # QEMU's own exit: the guest asked for a reset, -no-reboot quits
        assert "Kernel panic" in handle.console.tail(), handle.console.tail()
    finally:
        await client.close()
        await qemu_driver.stop(spec.bunker_id)
    assert _qemu_pids_for(spec.bunker_id) == []
    assert not (qemu_driver._bunkers_dir / spec.bunker_id).exists()


async def test_a_console_flood_keeps_the_tail_bounded_and_the_agent_answering(
    qemu_driver: QemuDriver, make_spec: SpecFactory
) -> None:
    """The guest writes random bytes (long lines, control characters) to its serial
    console while the host keeps using the agent: the host keeps a bounded, cleaned tail."""
    spec = make_spec()
    handle = await qemu_driver.start(spec)
    client = await connect(handle)
    try:
        flood = asyncio.ensure_future(
            run(
                client,
                "head -c 300000 /dev/urandom > /dev/console; "
                "head -c 200000 /dev/zero | tr '\\0' x > /dev/console; echo done",
                user="root",
                deadline_s=180,
            )
        )
        await asyncio.sleep(0.5)
        for _ in range(3):
            await client.ping(timeout_s=20)
        result, out, _ = await flood
        assert (result["exit_code"], out) == (0, b"done\n")
        lines = list(handle.console.lines)
        assert len(lines) <= TAIL_LINES
        assert all(len(line) <= LINE_MAX for line in lines)
        assert not any(ch in line for line in lines for ch in "\x00\x1b\x07")
        assert "x" * 100 in handle.console.tail(), "the flood's last line is in the tail"
        await client.ping(timeout_s=10)
    finally:
        await client.close()
        await qemu_driver.stop(spec.bunker_id)

"""The qemu driver against real microVMs: exec, files, overlay root, pause/resume, the
serial channel under load, a full scratch disk, and teardown."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from scaigrid.protocol.agent import AgentClient
from scaigrid.worker.drivers.qemu import QemuDriver
from tests.vm.conftest import Vm, connect


async def run(
    client: AgentClient, command: str, *, deadline_s: float = 60, **args: Any
) -> tuple[dict[str, Any], bytes, bytes]:
    body = {"exec_id": f"exe_{uuid.uuid4().hex}", "command": command, **args}
    response = await client.request("POST", "/v1/exec", body, None, timeout_s=deadline_s)
    out, err = bytearray(), bytearray()
    dropped = 0
    async for kind, data in response.exec_events():
        if kind == "gap":
            dropped += json.loads(data)["dropped_bytes"]
        else:
            (out if kind == "stdout" else err).extend(data)
    trailers = await response.trailers()
    return {**json.loads(trailers["x-result"]), "dropped": dropped}, bytes(out), bytes(err)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def test_exec_sees_env_hostname_and_unshifted_owners(vm: Vm) -> None:
    result, out, err = await run(
        vm.client,
        'printf "%s|" "$GREETING"; hostname; id -u;'
        ' stat -c "%u:%g" /etc/owned-by-root /bin/busybox;'
        " cat /proc/1/cmdline | tr '\\0' ' '",
    )
    assert result["exit_code"] == 0, err
    lines = out.decode().split("\n")
    assert lines[0] == "it's a 'quoted' $value"
    assert lines[1] == "line two|vmtest"
    assert lines[2] == "1000"
    # The base disk was baked with the image tree's ids shifted back to the guest's.
    assert lines[3:5] == ["0:0", "0:0"]
    assert "--serial agent" in lines[5]


async def test_files_land_on_the_overlay_and_the_base_disk_is_untouched(
    vm: Vm, qemu_driver: QemuDriver
) -> None:
    base = qemu_driver.base_disk_path(vm.spec.rootfs)
    before = _sha256(base)
    blob = os.urandom(300_000)
    response = await vm.client.request("PUT", "/v1/files", {"path": "blob.bin"}, blob, timeout_s=60)
    await response.json()
    result, out, _ = await run(vm.client, "sha256sum blob.bin; grep ' / ' /proc/mounts")
    assert result["exit_code"] == 0
    assert out.split()[0].decode() == hashlib.sha256(blob).hexdigest()
    assert b"overlay / overlay" in out
    response = await vm.client.request("GET", "/v1/files", {"path": "blob.bin"}, timeout_s=60)
    assert await response.read(1 << 30) == blob
    result, _, err = await run(vm.client, "echo x > /bin/new-file")
    assert result["exit_code"] != 0 and b"ermission denied" in err
    await asyncio.sleep(0)
    assert _sha256(base) == before


async def test_pause_stops_the_guest_and_resume_continues(vm: Vm, qemu_driver: QemuDriver) -> None:
    await qemu_driver.pause(vm.handle)
    assert await qemu_driver.status(vm.handle) == "paused"
    await qemu_driver.pause(vm.handle)
    with pytest.raises(TimeoutError):
        await vm.client.ping(timeout_s=1.0)
    await qemu_driver.resume(vm.handle)
    assert await qemu_driver.status(vm.handle) == "running"
    await vm.client.ping(timeout_s=10.0)
    _, out, _ = await run(vm.client, "echo back")
    assert out == b"back\n"


async def test_a_new_connection_replaces_a_closed_one(vm: Vm) -> None:
    # The port is one byte stream: the agent serves the next host-side connection once
    # the previous one is closed.
    await vm.client.close()
    for _ in range(2):
        client = await connect(vm.handle)
        _, out, _ = await run(client, "echo again")
        assert out == b"again\n"
        await client.close()
    vm.client = await connect(vm.handle)
    await vm.client.ping(timeout_s=10)


async def test_output_flood_does_not_starve_other_calls(vm: Vm) -> None:
    size = 8_000_000
    flood = asyncio.ensure_future(run(vm.client, f"head -c {size} /dev/zero", deadline_s=120))
    await asyncio.sleep(0.3)
    for _ in range(3):
        await vm.client.ping(timeout_s=10)
    result, out, _ = await flood
    assert result["exit_code"] == 0
    # Output beyond the ring buffer that the slow channel could not carry in time is
    # reported as dropped: every byte is accounted for.
    assert out.count(0) == len(out)
    assert len(out) + result["dropped"] == size


async def test_guest_cannot_open_the_agent_port(vm: Vm) -> None:
    result, _, err = await run(
        vm.client,
        "for p in /sys/class/virtio-ports/*; do head -c 1000000 /dev/urandom > /dev/${p##*/}; done",
    )
    assert result["exit_code"] != 0
    assert b"ermission denied" in err or b"busy" in err
    await vm.client.ping(timeout_s=10)


async def test_a_full_scratch_disk_fails_inside_the_guest_only(
    vm: Vm, qemu_driver: QemuDriver
) -> None:
    scratch = qemu_driver._bunkers_dir / vm.spec.bunker_id / "scratch.ext4"
    result, _, err = await run(vm.client, "dd if=/dev/zero of=fill bs=1M count=200", deadline_s=120)
    assert result["exit_code"] != 0
    assert b"No space left" in err
    st = scratch.stat()
    assert st.st_size == 64 << 20
    assert st.st_blocks * 512 <= 64 << 20
    result, out, _ = await run(vm.client, "rm fill && echo ok")
    assert out == b"ok\n"

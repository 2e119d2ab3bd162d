"""Snapshots of qemu microVMs at the driver level: the writable layer read from a paused
guest's scratch disk, in the container snapshot format, restored into a new VM; a guest
that wrecks its own scratch disk gets a refusal, never a host mount of the wreck.

(Through the whole stack, and across drivers, see ``tests/e2e/test_every_driver.py``.)
"""

from __future__ import annotations

import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from scaigrid.protocol.agent import AgentClient
from scaigrid.worker.drivers.base import DriverError
from scaigrid.worker.drivers.qemu import QemuDriver
from scaigrid.worker.rootfs.mounts import mounts_under
from scaigrid.worker.snapshots import archive_layer, restore_layer
from tests.vm.conftest import SpecFactory, connect
from tests.vm.test_qemu_driver import run

CHANGES = (
    "set -e; mkdir -p /data; echo hi > /data/f; chown 1000:50 /data/f;"
    " ln -s f /data/link; rm /etc/group"
)


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sbvm-snap-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _sync(client: AgentClient) -> None:
    response = await client.request("POST", "/v1/sync", {}, timeout_s=60)
    async with response:
        assert await response.json() == {}


async def test_the_layer_of_a_paused_vm_archives_and_restores_into_a_new_vm(
    qemu_driver: QemuDriver, make_spec: SpecFactory, scratch: Path
) -> None:
    archive = scratch / "layer.tar.zst"
    spec = make_spec()
    handle = await qemu_driver.start(spec)
    client = await connect(handle)
    state_dir = qemu_driver._bunkers_dir / spec.bunker_id
    try:
        result, _, err = await run(client, CHANGES, user="root")
        assert result["exit_code"] == 0, err
        await _sync(client)
        await qemu_driver.pause(handle)
        async with qemu_driver.frozen_layer(spec.bunker_id) as upper:
            assert mounts_under(state_dir) == [str(state_dir / "layer")]
            data = upper / "data" / "f"
            assert data.read_text() == "hi\n"
            assert (data.stat().st_uid, data.stat().st_gid) == (1000, 50)  # guest ids
            whiteout = (upper / "etc" / "group").lstat()
            assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
            with archive.open("wb") as out:
                stats = archive_layer(upper, out, qemu_driver.layer_id_base)
        assert mounts_under(state_dir) == []
        assert not (state_dir / "layer.ext4").exists()
        await qemu_driver.resume(handle)
        await client.ping(timeout_s=20)  # the source VM runs on
    finally:
        await client.close()
        await qemu_driver.stop(spec.bunker_id)

    def populate(upper: Path) -> None:
        restore_layer(archive, upper, qemu_driver.layer_id_base, stats.sha256, 64 << 20)

    restored = make_spec(populate_upper=populate)
    handle = await qemu_driver.start(restored)
    client = await connect(handle)
    try:
        result, out, err = await run(
            client,
            "cat /data/f; stat -c %u:%g /data/f; readlink /data/link;"
            " test -e /etc/group || echo whiteout; test -e /etc/passwd && echo image",
        )
        assert result["exit_code"] == 0, err
        assert out.decode().split() == ["hi", "1000:50", "f", "whiteout", "image"]
    finally:
        await client.close()
        await qemu_driver.stop(restored.bunker_id)


async def test_a_guest_that_wrecks_its_scratch_disk_gets_a_refusal_not_a_mount(
    qemu_driver: QemuDriver, make_spec: SpecFactory
) -> None:
    spec = make_spec()
    handle = await qemu_driver.start(spec)
    client = await connect(handle)
    state_dir = qemu_driver._bunkers_dir / spec.bunker_id
    try:
        # Root in the guest owns its scratch block device: overwrite every superblock.
        _, out, _ = await run(
            client,
            "dd if=/dev/urandom of=/dev/vdb bs=1M count=64 conv=fsync 2>&1; echo written",
            user="root",
            deadline_s=120,
        )
        assert out.endswith(b"written\n"), out
        await _sync(client)
        await qemu_driver.pause(handle)
        with pytest.raises(DriverError, match="holds no sound ext4"):
            async with qemu_driver.frozen_layer(spec.bunker_id):
                pytest.fail("a wrecked disk was mounted")
        assert mounts_under(state_dir) == []
        assert not (state_dir / "layer.ext4").exists()
        assert not (state_dir / "layer").exists()
    finally:
        await client.close()
        await qemu_driver.stop(spec.bunker_id)

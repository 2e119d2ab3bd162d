"""A real debootstrap image (slow the first time: it is cached in /var/cache/scaibunker-test)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from scaigrid.worker.drivers.container import ContainerDriver
from scaigrid.worker.rootfs import DEFAULT_ID_BASE, ImageCache
from tests.worker.conftest import TEST_CACHE, StartBunker
from tests.worker.helpers import agent_exec

DEBOOTSTRAP_SOURCE = {
    "kind": "debootstrap",
    "suite": "bookworm",
    "variant": "minbase",
    "packages": ["python3"],
}


@pytest.fixture(scope="session")
async def debootstrap_image() -> Path:
    """bookworm minbase + python3, built once and kept between test runs."""
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed")
    cache = ImageCache(TEST_CACHE / "images", debootstrap_timeout_s=900)
    return await cache.ensure("img_test_bookworm_minbase_python3", DEBOOTSTRAP_SOURCE)


async def test_debootstrap_image_runs_as_a_bunker(
    debootstrap_image: Path, driver: ContainerDriver, start_bunker: StartBunker
) -> None:
    assert os.lstat(debootstrap_image / "usr/bin/apt").st_uid == DEFAULT_ID_BASE
    handle = await start_bunker(rootfs=debootstrap_image, memory_mb=256)
    code, out = await agent_exec(
        handle,
        "grep VERSION_CODENAME /etc/os-release; id user; stat -c '%u:%g %a' /home/user; "
        "python3 -c 'import sys; print(sys.version_info[0])'; "
        "su -s /bin/sh user -c 'id -u; touch /home/user/mine && stat -c %u /home/user/mine'",
    )
    assert code == 0, out
    lines = out.strip().splitlines()
    assert lines[0] == "VERSION_CODENAME=bookworm"
    assert lines[1].startswith("uid=1000(user) gid=1000(user)")
    assert lines[2] == "1000:1000 755"
    assert lines[3] == "3"
    assert lines[4:] == ["1000", "1000"]
    mine = os.lstat(handle.state_dir / "disk/upper/home/user/mine")
    assert mine.st_uid == DEFAULT_ID_BASE + 1000

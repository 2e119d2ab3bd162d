"""End-to-end fixtures: one real stack per test session (see tests/fixtures/stack.py).

Images: the default ``debian-12`` (debootstrap, seeded by dev mode) and a busybox-only root
registered from a tarball the fixture builds.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.stack import (
    BASE,
    Stack,
    StackError,
    build_busybox_tar,
    remove_data_dir,
    start_stack,
)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """A controller with its dev worker on a free loopback port.

    The data directory is made under /var/tmp, not pytest's 0700 temporary root: bunker ids
    must be able to traverse every ancestor of the worker's data directory.
    """
    data_dir = Path(tempfile.mkdtemp(prefix="scaibunker-e2e-", dir="/var/tmp"))
    try:
        running = start_stack(data_dir)
    except StackError as exc:
        pytest.fail(str(exc))
    try:
        yield running
    finally:
        running.stop()
        leaked = remove_data_dir(data_dir)
    assert not leaked, f"the stack left mounts behind: {leaked}"


@pytest.fixture(scope="session")
def busybox_image(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The busybox-only image, registered from a tarball, once ready."""
    tar_path = build_busybox_tar(tmp_path_factory.mktemp("busybox"))
    stack.register_image("busybox", {"kind": "tar", "path": str(tar_path)})
    return "busybox"


@pytest.fixture(scope="session")
def debian_image(stack: Stack) -> str:
    """The default debian-12 image (debootstrap minbase + python3), once ready."""
    stack.wait_image("debian-12")
    return "debian-12"


def create_bunker(
    stack: Stack, image: str, key: str | None = None, **fields: Any
) -> dict[str, Any]:
    """Create a bunker and wait until it runs; return the bunker object."""
    with stack.client(key) as client:
        response = client.post(
            f"{BASE}/bunkers", params={"wait_s": 60}, json={"image": image, **fields}
        )
        assert response.status_code == 201, response.text
        bunker = response.json()["data"]
        assert bunker["status"] == "running", bunker
        return dict(bunker)

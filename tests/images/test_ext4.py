"""ext4 bake for VM drivers: a real ``mkfs.ext4 -d``, read back with ``debugfs``."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from scaigrid.worker.rootfs import ImageBuildError
from scaigrid.worker.rootfs.ext4 import make_ext4

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="exact ownership needs root")


def _tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "shadow").write_text("root:*:1::::::\n")
    os.chown(root / "etc" / "shadow", 0, 42)
    os.chmod(root / "etc" / "shadow", 0o640)
    (root / "bin").mkdir()
    (root / "bin" / "sh").symlink_to("busybox")
    return root


def _debugfs(image: Path, command: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", command, str(image)], capture_output=True, text=True, check=True
    ).stdout


async def test_tree_is_baked_with_owners_and_digest(work: Path) -> None:
    image = work / "root.ext4"
    digest = await make_ext4(_tree(work / "tree"), image, 64)
    assert image.stat().st_size == 64 << 20
    assert digest == "sha256:" + hashlib.sha256(image.read_bytes()).hexdigest()
    shadow = _debugfs(image, "stat /etc/shadow")
    assert "User:     0   Group:    42" in shadow and "Mode:  0640" in shadow
    assert 'Fast link dest: "busybox"' in _debugfs(image, "stat /bin/sh")
    assert not list(work.glob(".*.partial"))


async def test_tree_too_big_fails_with_reason(work: Path) -> None:
    tree = _tree(work / "tree")
    (tree / "big").write_bytes(os.urandom(80 << 20))
    with pytest.raises(ImageBuildError, match="does not fit in size_mib=64"):
        await make_ext4(tree, work / "big.ext4", 64)
    assert not (work / "big.ext4").exists()
    assert not list(work.glob(".*.partial"))


async def test_size_out_of_range_is_refused(work: Path) -> None:
    with pytest.raises(ImageBuildError, match="between 64 and 65536"):
        await make_ext4(work, work / "x.ext4", 32)

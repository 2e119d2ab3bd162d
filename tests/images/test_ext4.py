"""ext4 bake for VM drivers: a real ``mkfs.ext4 -d``, read back with ``debugfs``."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from scaigrid.worker.images import bake_vm_disks
from scaigrid.worker.rootfs import ImageBuildError
from scaigrid.worker.rootfs.ext4 import make_ext4
from scaigrid.worker.vm.disks import DiskError, base_disk_path

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


async def test_id_shifted_tree_is_baked_with_guest_owners(work: Path) -> None:
    """The bake pipeline's trees are owned by shifted host ids; the ext4 holds guest ids."""
    base = 1_000_000
    tree = _tree(work / "tree")
    for path in (tree, tree / "etc", tree / "bin"):
        os.chown(path, base, base)
    os.chown(tree / "etc" / "shadow", base, base + 42)
    os.lchown(tree / "bin" / "sh", base + 1000, base + 1000)
    image = work / "shifted.ext4"
    assert await make_ext4(tree, image, 64, id_base=base, digest=False) is None
    assert "User:     0   Group:    42" in _debugfs(image, "stat /etc/shadow")
    assert "User:  1000   Group:  1000" in _debugfs(image, "stat /bin/sh")
    assert image.stat().st_uid == 0


async def test_vm_base_disk_is_baked_at_the_image_size_or_fails_saying_so(work: Path) -> None:
    """``bake_vm_disks`` (the image bake step of microVM workers) bakes one base disk per
    microVM driver at ``size_mib`` where the driver's bunkers will find it."""
    tree = _tree(work / "tree")
    vm = SimpleNamespace(
        info=SimpleNamespace(isolation="microvm"), cache_dir=work / "vm-cache", id_base=0
    )
    container = SimpleNamespace(info=SimpleNamespace(isolation="container"))
    baked = await bake_vm_disks([container, vm], tree, 96)
    assert baked == [base_disk_path(work / "vm-cache", tree, 0)]
    assert baked[0].stat().st_size == 96 << 20
    (tree / "big").write_bytes(os.urandom(80 << 20))
    os.utime(tree)  # a rebuilt tree gets a new base disk path
    other = SimpleNamespace(
        info=SimpleNamespace(isolation="microvm"), cache_dir=work / "vm-cache-2", id_base=0
    )
    with pytest.raises(DiskError, match="does not fit in size_mib=64"):
        await bake_vm_disks([other], tree, 64)
    assert not any((work / "vm-cache-2").rglob("*.ext4"))

"""The id shift never reaches through a mount inside an image tree to the host."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest

from scaigrid.worker.rootfs.idshift import DEFAULT_ID_BASE, shift_tree


def test_a_bind_mounted_host_file_in_the_tree_is_refused_untouched(tmp_path: Path) -> None:
    host_file = tmp_path / "host-device-stand-in"
    host_file.write_text("host")
    tree = tmp_path / "rootfs"
    (tree / "dev").mkdir(parents=True)
    target = tree / "dev" / "null"
    target.touch()
    mount_dir = tmp_path / "other-fs"
    mount_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mount_dir)], check=True)
    try:
        outside = mount_dir / "file"
        outside.write_text("host")
        subprocess.run(["mount", "--bind", str(outside), str(target)], check=True)
        try:
            with pytest.raises(OSError) as caught:
                shift_tree(tree, DEFAULT_ID_BASE)
            assert caught.value.errno == errno.EXDEV
            assert outside.stat().st_uid == 0
        finally:
            subprocess.run(["umount", str(target)], check=True)
    finally:
        subprocess.run(["umount", str(mount_dir)], check=True)

"""Id shifting of image trees and the guest user."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from scaigrid.worker.rootfs import (
    DEFAULT_ID_BASE,
    ImageBuildError,
    check_range_free,
    ensure_guest_user,
    shift_tree,
)

BASE = DEFAULT_ID_BASE


def test_shift_moves_every_owner_once_and_keeps_special_bits(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    su = root / "usr/bin/su"
    su.write_text("x")
    os.chown(su, 0, 42)
    os.chmod(su, 0o6755)
    os.link(su, root / "usr/bin/su-link")
    (root / "home").mkdir()
    os.chown(root / "home", 1000, 1000)
    os.chmod(root / "home", 0o2775)
    (root / "bin").symlink_to("/usr/bin")
    os.lchown(root / "bin", 5, 5)
    weird = root / "weird"
    weird.write_text("y")
    os.chown(weird, 70000, 0)
    caps_v2 = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)  # cap_net_raw+ep
    os.setxattr(su, "security.capability", caps_v2)

    stats = shift_tree(root, BASE)

    su_st = os.lstat(su)
    assert (su_st.st_uid, su_st.st_gid) == (BASE, BASE + 42)
    assert stat.S_IMODE(su_st.st_mode) == 0o6755
    assert os.lstat(root / "usr/bin/su-link").st_ino == su_st.st_ino
    home = os.lstat(root / "home")
    assert (home.st_uid, stat.S_IMODE(home.st_mode)) == (BASE + 1000, 0o2775)
    link = os.lstat(root / "bin")
    assert (link.st_uid, link.st_gid) == (BASE + 5, BASE + 5)
    assert os.readlink(root / "bin") == "/usr/bin"
    assert os.lstat(weird).st_uid == BASE + 65534
    assert os.lstat(root).st_uid == BASE
    caps = os.getxattr(su, "security.capability")
    magic, permitted, _inh, _p2, _i2, rootid = struct.unpack("<IIIIII", caps)
    assert (magic, permitted, rootid) == (0x03000001, 1 << 13, BASE)
    assert stats.squashed == 1 and stats.capabilities == 1


def test_range_check_refuses_subuid_overlap(tmp_path: Path) -> None:
    check_range_free(BASE)
    with pytest.raises(ValueError, match="outside"):
        check_range_free(0xFFFFFFFF - 10)


def passwd(root: Path) -> list[list[str]]:
    return [line.split(":") for line in (root / "etc/passwd").read_text().splitlines()]


def test_guest_user_is_created_when_missing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/bash").write_text("")
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    os.chmod(root / "etc/shadow", 0o640)
    ensure_guest_user(root)
    assert ["user", "x", "1000", "1000", "", "/home/user", "/bin/bash"] in passwd(root)
    assert "user:x:1000:" in (root / "etc/group").read_text()
    assert "user:!:" in (root / "etc/shadow").read_text()
    assert stat.S_IMODE(os.stat(root / "etc/shadow").st_mode) == 0o640
    home = os.stat(root / "home/user")
    assert (home.st_uid, home.st_gid) == (1000, 1000)
    ensure_guest_user(root)
    assert sum(1 for fields in passwd(root) if fields[0] == "user") == 1


def test_guest_user_takes_over_an_existing_uid_1000_account(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\nubuntu:x:1000:1000:Ubuntu:/home/ubuntu:/bin/bash\n"
    )
    (root / "etc/group").write_text("root:x:0:\nsudo:x:27:ubuntu\nubuntu:x:1000:\n")
    ensure_guest_user(root)
    assert ["user", "x", "1000", "1000", "Ubuntu", "/home/user", "/bin/bash"] in passwd(root)
    group = (root / "etc/group").read_text()
    assert "sudo:x:27:user" in group and "user:x:1000:" in group and "ubuntu" not in group
    assert (root / "home/user").is_dir()


def test_guest_user_with_a_foreign_uid_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("user:x:1234:1234::/home/user:/bin/sh\n")
    with pytest.raises(ImageBuildError, match="uid other than 1000"):
        ensure_guest_user(root)


def test_guest_user_never_edits_through_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    target = tmp_path / "host-passwd"
    target.write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "etc/passwd").symlink_to(target)
    with pytest.raises(ImageBuildError, match="not a regular file"):
        ensure_guest_user(root)
    assert target.read_text() == "root:x:0:0::/root:/bin/sh\n"

"""The rootfs tar extractor: refuses escapes and devices, keeps owners, modes and caps."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from scaigrid.worker.rootfs import ImageBuildError, UnsafeArchiveError, extract_tar


def member(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ([(member("../evil"), b"x")], "'..' component"),
        ([(member("ok/../../evil"), b"x")], "'..' component"),
        ([(member("/etc/evil"), b"x")], "absolute path"),
        ([(member("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0), None)], "device node"),
        ([(member("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3), None)], "device node"),
        (
            [(member("link", tarfile.SYMTYPE, linkname="../../../etc"), None)],
            "symlink target leaves the root",
        ),
        (
            [(member("a/b/link", tarfile.SYMTYPE, linkname="../../../outside"), None)],
            "symlink target leaves the root",
        ),
        (
            [(member("hard", tarfile.LNKTYPE, linkname="../outside"), None)],
            "hard link target is absolute",
        ),
        (
            [(member("hard", tarfile.LNKTYPE, linkname="/etc/passwd"), None)],
            "hard link target is absolute",
        ),
        (
            [(member("hard", tarfile.LNKTYPE, linkname="not-yet-there"), None)],
            "not extracted before it",
        ),
        (
            # Absolute symlinks are fine inside a root, but never written through.
            [
                (member("etc", tarfile.SYMTYPE, linkname="/tmp"), None),
                (member("etc/passwd"), b"pwned"),
            ],
            "goes through the symlink",
        ),
        (
            [
                (member("passwd", tarfile.SYMTYPE, linkname="/etc/passwd"), None),
                (member("passwd"), b"pwned"),
            ],
            "goes through the symlink",
        ),
        (
            [
                (member("dir", tarfile.SYMTYPE, linkname="/etc"), None),
                (member("hard", tarfile.LNKTYPE, linkname="dir/passwd"), None),
            ],
            "goes through the symlink",
        ),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute",
        "block-device",
        "char-device",
        "escaping-symlink",
        "deep-escaping-symlink",
        "hardlink-dotdot",
        "hardlink-absolute",
        "hardlink-dangling",
        "write-through-dir-symlink",
        "overwrite-symlink",
        "hardlink-through-symlink",
    ],
)
def test_refuses_unsafe_members(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], reason: str
) -> None:
    archive = write_tar(tmp_path / "evil.tar", members)
    dest = tmp_path / "root"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError, match=reason):
        extract_tar(archive, dest)
    assert not (tmp_path / "evil").exists()
    assert not (tmp_path / "outside").exists()
    assert Path("/etc/passwd").read_text() != "pwned"


def test_keeps_owners_modes_links_and_file_capabilities(tmp_path: Path) -> None:
    caps_v2 = bytes.fromhex("0100000200200000000000000000000000000000")
    suid = member("usr/bin/su", mode=0o4755, uid=0, gid=0)
    owned = member("home/user/file", mode=0o640, uid=1000, gid=1000)
    ping = member("usr/bin/ping", mode=0o755)
    ping.pax_headers = {
        "SCHILY.xattr.security.capability": caps_v2.decode("utf-8", "surrogateescape")
    }
    archive = write_tar(
        tmp_path / "root.tar",
        [
            (member(".", tarfile.DIRTYPE, mode=0o755), None),
            (member("usr/bin", tarfile.DIRTYPE, mode=0o755), None),
            (suid, b"#!/bin/sh\n"),
            (ping, b"elf"),
            (member("home/user", tarfile.DIRTYPE, mode=0o750, uid=1000, gid=1000), None),
            (owned, b"secret"),
            (member("tmp", tarfile.DIRTYPE, mode=0o1777), None),
            (member("usr/bin/su-again", tarfile.LNKTYPE, linkname="usr/bin/su", mode=0o4755), None),
            (member("etc/localtime", tarfile.SYMTYPE, linkname="/usr/share/zoneinfo/UTC"), None),
            (member("bin", tarfile.SYMTYPE, linkname="usr/bin"), None),
            (member("run/fifo", tarfile.FIFOTYPE, mode=0o600), None),
        ],
    )
    dest = tmp_path / "root"
    dest.mkdir()
    extract_tar(archive, dest)
    su = os.lstat(dest / "usr/bin/su")
    assert stat.S_IMODE(su.st_mode) == 0o4755
    assert su.st_nlink == 2 and os.lstat(dest / "usr/bin/su-again").st_ino == su.st_ino
    file_st = os.lstat(dest / "home/user/file")
    assert (file_st.st_uid, file_st.st_gid, stat.S_IMODE(file_st.st_mode)) == (1000, 1000, 0o640)
    assert stat.S_IMODE(os.lstat(dest / "tmp").st_mode) == 0o1777
    assert os.readlink(dest / "etc/localtime") == "/usr/share/zoneinfo/UTC"
    assert os.readlink(dest / "bin") == "usr/bin"
    assert stat.S_ISFIFO(os.lstat(dest / "run/fifo").st_mode)
    assert os.getxattr(dest / "usr/bin/ping", "security.capability") == caps_v2


@pytest.mark.parametrize("compression", ["gz", "xz", "zst"])
def test_reads_compressed_archives_by_content(tmp_path: Path, compression: str) -> None:
    plain = write_tar(tmp_path / "plain.tar", [(member("hello", mode=0o644), b"hi")])
    archive = tmp_path / "root.bin"  # the name says nothing; the magic bytes decide
    tool = {"gz": ["gzip", "-c"], "xz": ["xz", "-c"], "zst": ["zstd", "-q", "-c"]}[compression]
    with archive.open("wb") as out:
        subprocess.run([*tool, str(plain)], stdout=out, check=True)
    dest = tmp_path / "root"
    dest.mkdir()
    extract_tar(archive, dest)
    assert (dest / "hello").read_text() == "hi"


def test_garbage_is_an_image_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"definitely not a tar archive" * 100)
    dest = tmp_path / "root"
    dest.mkdir()
    with pytest.raises(ImageBuildError):
        extract_tar(junk, dest)
    with pytest.raises(ImageBuildError, match="cannot read"):
        extract_tar(tmp_path / "missing.tar", dest)

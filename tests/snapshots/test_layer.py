"""Snapshot layer archives: an overlay upper dir to tar.zst and back (real files, real xattrs,
real whiteout devices; run as root under /var/tmp)."""

from __future__ import annotations

import io
import os
import shutil
import stat
import struct
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from scaigrid.errors import BunkerDiskFull
from scaigrid.worker.snapshots import (
    OPAQUE_XATTR,
    SnapshotCorrupt,
    archive_layer,
    file_sha256,
    restore_layer,
)
from tests.snapshots.tree import tree_hash

BASE_A = 0x1F0000
BASE_B = 0x1E0000
MIB = 1024 * 1024


@pytest.fixture
def work() -> Iterator[Path]:
    base = Path("/var/tmp/scaibunker-snapshot-tests")
    base.mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _caps_v3(rootid: int) -> bytes:
    # CAP_NET_BIND_SERVICE (bit 10) permitted, effective flag set.
    return struct.pack("<IIIIII", 0x03000001, 1 << 10, 0, 0, 0, rootid)


def build_upper(upper: Path, base: int) -> None:
    """An upper dir with every kind of entry a bunker's writable layer can hold."""
    upper.mkdir()
    os.chown(upper, base, base)
    (upper / "etc").mkdir()
    (upper / "etc" / "hostname").write_text("bunker\n")
    os.chown(upper / "etc" / "hostname", base + 1000, base + 1000)
    (upper / "home").mkdir(mode=0o755)
    suid = upper / "home" / "suid-tool"
    suid.write_bytes(b"#!/bin/sh\necho hi\n")
    os.chown(suid, base, base + 50)
    os.chmod(suid, 0o4755)
    os.link(upper / "etc" / "hostname", upper / "home" / "hostname-link")
    os.symlink("../etc/hostname", upper / "home" / "hostname-symlink")
    os.symlink("/nonexistent/absolute", upper / "home" / "dangling")
    os.lchown(upper / "home" / "dangling", base + 7, base + 7)
    tagged = upper / "home" / "tagged"
    tagged.write_bytes(b"data")
    os.setxattr(tagged, "user.binary", bytes(range(256)))
    os.setxattr(tagged, "user.text", b"hello")
    capped = upper / "home" / "capped"
    capped.write_bytes(b"\x7fELF")
    os.mknod(upper / "etc" / "deleted.conf", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    opaque = upper / "var-opaque"
    opaque.mkdir()
    os.setxattr(opaque, OPAQUE_XATTR, b"y")
    (opaque / "kept").write_text("only me")
    sparse = upper / "home" / "sparse.img"
    with sparse.open("wb") as handle:
        handle.truncate(100 * MIB)
        handle.seek(50 * MIB)
        handle.write(os.urandom(MIB))
    os.mkfifo(upper / "home" / "pipe")
    ragged = upper / "home" / "ragged.img"
    with ragged.open("wb") as handle:
        # Data and holes at offsets that are not multiples of any read size.
        handle.write(os.urandom(12345))
        handle.seek(3 * MIB + 777)
        handle.write(os.urandom(70000))
        handle.truncate(9 * MIB + 5)
    (upper / "home" / "big").write_bytes(os.urandom(3 * MIB))
    sticky = upper / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    os.utime(upper / "etc" / "hostname", (1_600_000_000, 1_600_000_000))
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if st.st_uid == 0:
                os.lchown(path, base, base)
                if stat.S_IMODE(st.st_mode) & stat.S_ISUID:
                    os.chmod(path, stat.S_IMODE(st.st_mode))
    # After the chowns: chown drops file capabilities.
    os.setxattr(capped, "security.capability", _caps_v3(base))


def _archive(upper: Path, out: Path, base: int):  # type: ignore[no-untyped-def]
    with out.open("wb") as handle:
        return archive_layer(upper, handle, base)


def test_round_trip_onto_another_id_base(work: Path) -> None:
    upper = work / "upper"
    build_upper(upper, BASE_A)
    archive = work / "layer.tar.zst"
    stats = _archive(upper, archive, BASE_A)
    assert stats.sha256 == file_sha256(archive)
    assert stats.size_bytes == archive.stat().st_size < 8 * MIB
    assert stats.layer_bytes >= 103 * MIB and stats.skipped == 0

    restored = work / "restored"
    restored.mkdir()
    restore_layer(archive, restored, BASE_B, stats.sha256, 200 * MIB)
    caps = "security.capability"
    assert tree_hash(restored, BASE_B, (caps,)) == tree_hash(upper, BASE_A, (caps,))
    got = os.getxattr(restored / "home" / "capped", caps)
    assert got == _caps_v3(BASE_B)
    assert stat.S_IMODE(os.stat(restored / "home" / "suid-tool").st_mode) == 0o4755
    whiteout = os.lstat(restored / "etc" / "deleted.conf")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert os.getxattr(restored / "var-opaque", OPAQUE_XATTR) == b"y"
    sparse = os.stat(restored / "home" / "sparse.img")
    assert sparse.st_size == 100 * MIB and sparse.st_blocks * 512 < 4 * MIB
    assert (
        os.stat(restored / "home" / "hostname-link").st_ino
        == os.stat(restored / "etc" / "hostname").st_ino
    )


def test_archive_uses_oci_whiteouts_and_unshifted_owners(work: Path) -> None:
    upper = work / "upper"
    build_upper(upper, BASE_A)
    archive = work / "layer.tar.zst"
    _archive(upper, archive, BASE_A)
    with (
        archive.open("rb") as raw,
        zstandard.ZstdDecompressor().stream_reader(raw) as reader,
        tarfile.open(fileobj=reader, mode="r|") as tar,
    ):
        members = {m.name: m for m in tar}
    assert members["etc/.wh.deleted.conf"].isreg()
    assert "etc/deleted.conf" not in members
    assert members["var-opaque/.wh..wh..opq"].isreg()
    assert members["etc/hostname"].uid == 1000
    assert members["home/hostname-link"].islnk()
    assert members["home/dangling"].uid == 7
    assert "SCHILY.xattr.trusted.overlay.opaque" not in members["var-opaque"].pax_headers


def test_bunker_made_whiteout_names_are_left_out(work: Path) -> None:
    upper = work / "upper"
    upper.mkdir()
    (upper / ".wh.passwd").write_text("pretend deletion")
    (upper / "real").write_text("x")
    archive = work / "layer.tar.zst"
    stats = _archive(upper, archive, BASE_A)
    assert stats.skipped == 1
    restored = work / "restored"
    restored.mkdir()
    restore_layer(archive, restored, BASE_A, stats.sha256, MIB)
    assert sorted(os.listdir(restored)) == ["real"]


def test_corrupted_archive_fails_before_unpacking(work: Path) -> None:
    upper = work / "upper"
    build_upper(upper, BASE_A)
    archive = work / "layer.tar.zst"
    stats = _archive(upper, archive, BASE_A)
    with archive.open("r+b") as handle:
        handle.seek(stats.size_bytes // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    restored = work / "restored"
    restored.mkdir()
    with pytest.raises(SnapshotCorrupt, match="checksum mismatch"):
        restore_layer(archive, restored, BASE_A, stats.sha256, 200 * MIB)
    assert os.listdir(restored) == []


def test_layer_bigger_than_the_disk_is_refused(work: Path) -> None:
    upper = work / "upper"
    build_upper(upper, BASE_A)
    archive = work / "layer.tar.zst"
    stats = _archive(upper, archive, BASE_A)
    restored = work / "restored"
    restored.mkdir()
    with pytest.raises(BunkerDiskFull):
        restore_layer(archive, restored, BASE_A, stats.sha256, 10 * MIB)


def _crafted(work: Path, build: list[tuple[tarfile.TarInfo, bytes | None]]) -> tuple[Path, str]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in build:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    path = work / "crafted.tar.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(raw.getvalue()))
    return path, file_sha256(path)


def _info(
    name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, link
    return info


@pytest.mark.parametrize(
    "members",
    [
        [(_info("/etc/evil", size=1), b"x")],
        [(_info("../evil", size=1), b"x")],
        [(_info("a", tarfile.SYMTYPE, link="/var/tmp"), None), (_info("a/evil", size=1), b"x")],
        [(_info("a", tarfile.SYMTYPE, link=".."), None), (_info("a/evil", size=1), b"x")],
        [(_info("x", tarfile.CHRTYPE), None)],
    ],
)
def test_hostile_archives_write_nothing_outside(
    work: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]
) -> None:
    archive, digest = _crafted(work, members)
    restored = work / "restored"
    restored.mkdir()
    with pytest.raises(SnapshotCorrupt):
        restore_layer(archive, restored, BASE_A, digest, MIB)
    assert not Path("/etc/evil").exists() and not (work / "evil").exists()
    assert not Path("/var/tmp/evil").exists()


def test_overlay_xattrs_in_an_archive_are_ignored(work: Path) -> None:
    info = _info("f", size=1)
    info.pax_headers = {
        "SCHILY.xattr.trusted.overlay.redirect": "/etc",
        "SCHILY.xattr.user.ok": "yes",
    }
    archive, digest = _crafted(work, [(info, b"x")])
    restored = work / "restored"
    restored.mkdir()
    restore_layer(archive, restored, BASE_A, digest, MIB)
    assert os.listxattr(restored / "f") == ["user.ok"]

"""Snapshot layers: a bunker's overlay upper dir to and from a ``tar.zst`` archive (SPEC §6.2).

Archive format: a POSIX (PAX) tar compressed with zstd, members relative to the upper dir
(``.`` first, parents before children, names sorted):

* owners are **unshifted** bunker ids (host id minus ``id_base``; ids outside the bunker's range
  become 65534), so the archive restores on any worker whatever its id base;
* deleted files — overlayfs whiteouts, 0:0 character devices — become empty regular files
  named ``.wh.<name>``; opaque directories (``trusted.overlay.opaque=y``) get a
  ``.wh..wh..opq`` member (OCI image-spec layer rules);
* hard links are ``LNKTYPE`` members pointing at the first name of the inode; symlinks,
  FIFOs, modes (setuid/setgid/sticky included) and mtimes are kept;
* extended attributes ``user.*``, ``security.capability`` and POSIX ACLs are
  ``SCHILY.xattr.<name>`` PAX records (binary values via PAX ``hdrcharset=BINARY``);
  ``security.capability`` is stored as a v2 (host-neutral) capability and ACL ids unshifted.
  No other xattr is stored or restored (a crafted archive must not set overlayfs's
  ``trusted.overlay.*`` redirects);
* sparse files are stored whole (holes compress to almost nothing) and restored sparse: runs
  of zero blocks are skipped with ``lseek`` instead of written.

Entries the format cannot carry are left out and counted in :class:`LayerStats`: sockets,
device nodes other than whiteouts (bunkers lack ``CAP_MKNOD``) and names starting with
``.wh.`` that the bunker created itself (they would read back as whiteouts).

Python's :mod:`tarfile` is used rather than GNU tar: the whiteout and owner conversions need a
per-entry hook, and ``tarfile`` writes the same PAX records GNU tar reads. The compressed
stream is hashed (sha256) while it is written, and verified before anything is unpacked.
All functions here block; call them from a thread.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, cast

import structlog
import zstandard

from scaigrid.errors import BunkerDiskFull, ScaiGridError
from scaigrid.worker.rootfs.idshift import ID_RANGE_SIZE, OVERFLOW_ID, shift_tree

log = structlog.get_logger(__name__)

WHITEOUT_PREFIX: Final = ".wh."
OPAQUE_MARKER: Final = ".wh..wh..opq"
OPAQUE_XATTR: Final = "trusted.overlay.opaque"
ZSTD_LEVEL: Final = 3
COPY_BUFFER_BYTES: Final = 1024 * 1024
#: ``tarfile`` stream buffer when unpacking: its read path slices the remaining buffer on
#: every read, so a 1 MiB buffer costs ~0.5 MiB of copying per member header; 64 KiB keeps
#: trees of many small files (images) fast and large files unaffected.
TAR_READ_BUFFER_BYTES: Final = 64 * 1024
_XATTR_PAX: Final = "SCHILY.xattr."
_CAPS_XATTR: Final = "security.capability"
_ACL_XATTRS: Final = ("system.posix_acl_access", "system.posix_acl_default")
_ACL_ENTRY: Final = struct.Struct("<HHI")
_ACL_USER_OR_GROUP: Final = (0x02, 0x08)
_VFS_CAP_REVISION_MASK: Final = 0xFF000000
_VFS_CAP_REVISION_2: Final = 0x02000000
_SPARSE_BLOCK: Final = 64 * 1024


class SnapshotCorrupt(ScaiGridError):
    """``SNAPSHOT_CORRUPT`` (422): the stored archive fails its checksum or cannot be read."""

    code = "SNAPSHOT_CORRUPT"
    status_code = 422


@dataclass(frozen=True)
class LayerStats:
    """What :func:`archive_layer` wrote.

    Attributes:
        size_bytes: bytes of the compressed archive; ``sha256`` its hex digest.
        layer_bytes: uncompressed bytes of file content (the manifest's ``layer_bytes``).
        entries: tar members written; ``skipped``: entries left out (see module docstring).
    """

    size_bytes: int
    sha256: str
    layer_bytes: int
    entries: int
    skipped: int


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what passes through to ``target``."""

    def __init__(self, target: IO[bytes]) -> None:
        self.target = target
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data)
        self.digest.update(view)
        self.target.write(view)
        self.size += len(view)
        return len(view)


class _HoleSkippingReader(io.RawIOBase):
    """Reads a regular file of ``size`` bytes; holes (``SEEK_HOLE``) come back as zeros
    made in memory instead of being read from disk (reading a 1 GiB hole costs ~3 s here)."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.pos = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        """Exactly ``n`` bytes (fewer only at the end of the file), as tarfile expects."""
        left = self.size - self.pos
        n = left if n < 0 else min(n, left)
        parts: list[bytes] = []
        while n > 0:
            chunk = self._next(n)
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def _next(self, n: int) -> bytes:
        try:
            data = os.lseek(self.fd, self.pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            data = self.size
        if data > self.pos:
            chunk = bytes(min(n, data - self.pos))
        else:
            hole = os.lseek(self.fd, self.pos, os.SEEK_HOLE)
            chunk = os.pread(self.fd, min(n, hole - self.pos), self.pos)
            if not chunk:
                raise OSError(errno.EIO, "file shrank while it was archived")
        self.pos += len(chunk)
        return chunk


def _unshift(value: int, base: int) -> int:
    shifted = value - base
    return shifted if 0 <= shifted < ID_RANGE_SIZE else OVERFLOW_ID


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out: dict[str, bytes] = {}
    for name in names:
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
    return out


def _unshift_xattr(name: str, value: bytes, base: int) -> bytes | None:
    if name == _CAPS_XATTR:
        if len(value) < 20:
            return None
        flags = struct.unpack_from("<I", value)[0] & ~_VFS_CAP_REVISION_MASK
        return struct.pack("<I", _VFS_CAP_REVISION_2 | flags) + value[4:20]
    if name in _ACL_XATTRS:
        out = bytearray(value[:4])
        for offset in range(4, len(value) - _ACL_ENTRY.size + 1, _ACL_ENTRY.size):
            tag, perm, ident = _ACL_ENTRY.unpack_from(value, offset)
            if tag in _ACL_USER_OR_GROUP:
                ident = _unshift(ident, base)
            out += _ACL_ENTRY.pack(tag, perm, ident)
        return bytes(out)
    return value


def kept_xattr(name: str) -> bool:
    """True for the xattrs a snapshot carries: ``user.*``, ``security.capability`` and the
    POSIX ACLs. Everything else (``trusted.*`` — overlayfs's own redirect/metacopy
    metadata among them —, ``security.selinux`` …) is neither stored nor restored."""
    return name.startswith("user.") or name == _CAPS_XATTR or name in _ACL_XATTRS


def _pax_xattrs(path: str, base: int) -> tuple[dict[str, str], bool]:
    """PAX records for ``path``'s xattrs and whether it is an opaque overlay directory."""
    records: dict[str, str] = {}
    opaque = False
    for name, value in _xattrs(path).items():
        if name == OPAQUE_XATTR:
            opaque = value == b"y"
            continue
        if not kept_xattr(name):
            continue
        stored = _unshift_xattr(name, value, base)
        if stored is not None:
            records[_XATTR_PAX + name] = stored.decode("utf-8", "surrogateescape")
    return records, opaque


def _member(name: str, st: os.stat_result, base: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid = _unshift(st.st_uid, base)
    info.gid = _unshift(st.st_gid, base)
    info.mtime = st.st_mtime
    return info


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def archive_layer(upper: Path, out: IO[bytes], base: int, level: int = ZSTD_LEVEL) -> LayerStats:
    """Write ``upper`` (an overlay upper dir) to ``out`` as a zstd-compressed PAX tar.

    Args:
        upper: the upper dir; the bunker must be frozen while this runs.
        out: a writable binary file, positioned at the start.
        base: the worker's host id base (bunker id 0).
        level: zstd compression level.

    Returns:
        Sizes, digest and counts (:class:`LayerStats`).

    Raises:
        OSError: the tree could not be read or ``out`` written.
    """
    hashing = _HashingWriter(out)
    compressor = zstandard.ZstdCompressor(level=level, threads=-1)
    links: dict[tuple[int, int], str] = {}
    layer_bytes = entries = skipped = 0
    with (
        compressor.stream_writer(cast(IO[bytes], hashing), closefd=False) as zwriter,
        tarfile.open(
            fileobj=zwriter, mode="w|", format=tarfile.PAX_FORMAT, bufsize=COPY_BUFFER_BYTES
        ) as tar,
    ):
        # 1 MiB file reads instead of tarfile's 16 KiB (``copybufsize`` is missing from
        # typeshed's TarFile): a third of the archive time on a 500 MB layer.
        setattr(tar, "copybufsize", COPY_BUFFER_BYTES)  # noqa: B010
        stack = ["."]
        while stack:
            rel = stack.pop()
            path = os.path.join(upper, rel)
            st = os.lstat(path)
            name = os.path.basename(rel)
            info = _member(rel, st, base)
            if _is_whiteout(st):
                info.name = os.path.join(os.path.dirname(rel), WHITEOUT_PREFIX + name)
                info.type = tarfile.REGTYPE
                tar.addfile(info)
                entries += 1
                continue
            if name.startswith(WHITEOUT_PREFIX):
                log.warning("snapshot.whiteout_name_skipped", path=rel)
                skipped += 1
                continue
            records, opaque = _pax_xattrs(path, base)
            info.pax_headers = records
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                entries += 1
                if opaque:
                    marker = _member(os.path.join(rel, OPAQUE_MARKER), st, base)
                    marker.mode = 0o600
                    tar.addfile(marker)
                    entries += 1
                with os.scandir(path) as it:
                    children = sorted(entry.name for entry in it)
                stack.extend(
                    child if rel == "." else os.path.join(rel, child)
                    for child in reversed(children)
                )
                continue
            if st.st_nlink > 1:
                first = links.setdefault((st.st_dev, st.st_ino), rel)
                if first != rel:
                    info.type = tarfile.LNKTYPE
                    info.linkname = first
                    tar.addfile(info)
                    entries += 1
                    continue
            if stat.S_ISREG(st.st_mode):
                info.size = st.st_size
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    tar.addfile(info, _HoleSkippingReader(fd, st.st_size))
                finally:
                    os.close(fd)
                layer_bytes += st.st_size
            elif stat.S_ISLNK(st.st_mode):
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(path)
                tar.addfile(info)
            elif stat.S_ISFIFO(st.st_mode):
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
            else:
                log.warning("snapshot.entry_skipped", path=rel, mode=oct(st.st_mode))
                skipped += 1
                continue
            entries += 1
    return LayerStats(hashing.size, hashing.digest.hexdigest(), layer_bytes, entries, skipped)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(COPY_BUFFER_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _safe_target(root: str, rel: str) -> str:
    """The host path of member ``rel``; refuses absolute names, ``..`` and symlinked parents."""
    clean = os.path.normpath(rel)
    if clean.startswith("/") or clean == ".." or clean.startswith("../"):
        raise SnapshotCorrupt(f"archive member {rel!r} leaves the layer")
    if clean == ".":
        return root
    current = root
    for part in clean.split("/")[:-1]:
        current = os.path.join(current, part)
        if os.path.islink(current) or not os.path.isdir(current):
            raise SnapshotCorrupt(f"archive member {rel!r} is not below a directory")
    return os.path.join(root, clean)


def _write_sparse(source: IO[bytes], target: str, size: int) -> None:
    """Copy ``size`` bytes, seeking over all-zero 64 KiB blocks so holes stay holes."""
    zero = bytes(COPY_BUFFER_BYTES)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        left = size
        while left > 0:
            block = source.read(min(COPY_BUFFER_BYTES, left))
            if not block:
                raise SnapshotCorrupt("archive ends inside a file")
            left -= len(block)
            # bytes == bytes is one memcmp; a whole zero block is skipped at once.
            if block == zero[: len(block)]:
                os.lseek(fd, len(block), os.SEEK_CUR)
                continue
            for offset in range(0, len(block), _SPARSE_BLOCK):
                piece = block[offset : offset + _SPARSE_BLOCK]
                if piece == zero[: len(piece)]:
                    os.lseek(fd, len(piece), os.SEEK_CUR)
                else:
                    os.write(fd, piece)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _apply_meta(path: str, info: tarfile.TarInfo) -> None:
    os.lchown(path, info.uid, info.gid)
    if not info.issym():
        os.chmod(path, info.mode, follow_symlinks=False)
    for key, value in info.pax_headers.items():
        if key.startswith(_XATTR_PAX) and kept_xattr(key[len(_XATTR_PAX) :]):
            os.setxattr(
                path,
                key[len(_XATTR_PAX) :],
                value.encode("utf-8", "surrogateescape"),
                follow_symlinks=False,
            )
    os.utime(path, (info.mtime, info.mtime), follow_symlinks=False)


def _extract_member(
    tar: tarfile.TarFile, info: tarfile.TarInfo, root: str, dirs: list[tarfile.TarInfo]
) -> None:
    name = os.path.basename(os.path.normpath(info.name))
    if name == OPAQUE_MARKER:
        parent = _safe_target(root, os.path.dirname(os.path.normpath(info.name)) or ".")
        os.setxattr(parent, OPAQUE_XATTR, b"y", follow_symlinks=False)
        return
    target = _safe_target(root, info.name)
    if name.startswith(WHITEOUT_PREFIX):
        hidden = os.path.join(os.path.dirname(target), name[len(WHITEOUT_PREFIX) :])
        # overlayfs's own whiteouts are mode 0000 0:0 character devices.
        os.mknod(hidden, stat.S_IFCHR, os.makedev(0, 0))
        os.lchown(hidden, info.uid, info.gid)
        os.utime(hidden, (info.mtime, info.mtime), follow_symlinks=False)
        return
    if info.isdir():
        if target != root:
            os.mkdir(target, 0o700)
        dirs.append(info)
        return
    if info.isreg():
        source = tar.extractfile(info)
        if source is None:
            raise SnapshotCorrupt(f"archive member {info.name!r} has no data")
        _write_sparse(source, target, info.size)
    elif info.islnk():
        os.link(_safe_target(root, info.linkname), target, follow_symlinks=False)
        return
    elif info.issym():
        os.symlink(info.linkname, target)
    elif info.isfifo():
        os.mkfifo(target, 0o600)
    else:
        raise SnapshotCorrupt(f"archive member {info.name!r} has an unsupported type")
    _apply_meta(target, info)


def restore_layer(
    archive: Path, upper: Path, base: int, expected_sha256: str, max_layer_bytes: int
) -> int:
    """Verify ``archive`` and unpack it into the empty dir ``upper`` as an overlay upper layer.

    Owners are shifted to ``base`` after unpacking (:func:`~scaigrid.worker.rootfs.idshift.
    shift_tree`), whiteouts become 0:0 character devices and ``.wh..wh..opq`` the
    ``trusted.overlay.opaque`` xattr.

    Args:
        archive: the downloaded ``tar.zst``.
        upper: an empty directory on the new bunker's writable disk.
        base: this worker's host id base.
        expected_sha256: hex digest recorded when the snapshot was taken.
        max_layer_bytes: refuse archives whose file content exceeds this (the bunker's disk).

    Returns:
        Uncompressed file-content bytes unpacked.

    Raises:
        SnapshotCorrupt: checksum mismatch, unreadable or unsafe archive (nothing is unpacked
            on a checksum mismatch; otherwise the caller discards ``upper``).
        BunkerDiskFull: the content exceeds ``max_layer_bytes``.
    """
    actual = file_sha256(archive)
    if actual != expected_sha256:
        raise SnapshotCorrupt(
            f"snapshot checksum mismatch: expected {expected_sha256}, got {actual}"
        )
    root = str(upper)
    dirs: list[tarfile.TarInfo] = []
    total = 0
    try:
        with (
            archive.open("rb") as raw,
            zstandard.ZstdDecompressor().stream_reader(raw) as reader,
            tarfile.open(fileobj=reader, mode="r|", bufsize=TAR_READ_BUFFER_BYTES) as tar,
        ):
            for info in tar:
                if info.isreg():
                    total += info.size
                    if total > max_layer_bytes:
                        raise BunkerDiskFull(
                            f"snapshot layer needs more than {max_layer_bytes} bytes"
                        )
                _extract_member(tar, info, root, dirs)
    except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
        raise SnapshotCorrupt(f"snapshot archive is unreadable: {exc}") from exc
    except FileExistsError as exc:
        raise SnapshotCorrupt(f"snapshot archive repeats an entry: {exc.filename}") from exc
    for info in reversed(dirs):
        _apply_meta(_safe_target(root, info.name), info)
    shift_tree(upper, base)
    return total

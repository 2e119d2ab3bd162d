"""Unpack a root-filesystem tarball safely, keeping owners and modes exactly.

Formats: plain ``.tar``, gzip, bzip2 and xz (stdlib :mod:`tarfile`), and zstd (piped through
the ``zstd`` command, Debian package ``zstd``, since Python 3.11 has no zstd module). The
compression is detected from the file's magic bytes, not its name.

The extraction filter (:func:`rootfs_filter`) is stricter than :func:`tarfile.data_filter` about
*where* members go and looser about *what* they keep, because a root filesystem needs its
setuid binaries, owners and absolute symlinks. It refuses the whole archive when a member:

- has an absolute name or a ``..`` component;
- is a character or block device;
- is a symlink whose target leaves the root (absolute targets are read relative to the root,
  as they resolve inside the bunker; relative targets must not climb above it);
- is a hard link whose target is absolute, climbs with ``..``, or is not already extracted;
- would be written through a symlink already in the tree (a parent component, or the entry
  itself), which is how an archive otherwise escapes with a link-then-file pair.

Everything else is extracted as root with numeric owners (the host's user database is never
consulted), exact modes including setuid/setgid/sticky, and the ``security.capability``,
POSIX ACL and ``user.*`` extended attributes stored as ``SCHILY.xattr.*`` PAX records.
"""

from __future__ import annotations

import os
import posixpath
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import IO, TYPE_CHECKING

import structlog

from scaigrid.worker.rootfs.errors import ImageBuildError, UnsafeArchiveError

if TYPE_CHECKING:
    from _typeshed import StrOrBytesPath

log = structlog.get_logger()

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_XATTR_PREFIX = "SCHILY.xattr."
_KEPT_XATTRS = ("security.capability", "system.posix_acl_access", "system.posix_acl_default")


def _normalize(name: str) -> str:
    """Return ``name`` as a clean relative path; ``"."`` for the root itself."""
    cleaned = posixpath.normpath(name) if name else "."
    return "." if cleaned in ("", ".") else cleaned


def _check_inside(member: str, relative: str, what: str) -> None:
    if relative == ".." or relative.startswith("../"):
        raise UnsafeArchiveError(member, f"{what} leaves the root")


def _check_no_symlink_on_path(member: str, dest: str, relative: str, *, final: bool) -> None:
    """Refuse when any existing component of ``dest/relative`` is a symlink."""
    parts = [] if relative == "." else relative.split("/")
    current = dest
    checked = parts if final else parts[:-1]
    for part in checked:
        current = os.path.join(current, part)
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISLNK(mode):
            raise UnsafeArchiveError(member, f"path goes through the symlink {part!r}")


def rootfs_filter(member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo:
    """Extraction filter for root filesystems (``tarfile`` ``filter=`` protocol).

    Args:
        member: the archive member about to be extracted.
        dest_path: the destination directory (the tree root).

    Returns:
        ``member`` unchanged (owners, modes and times are kept exactly).

    Raises:
        UnsafeArchiveError: the member breaks one of the rules in the module docstring.
    """
    name = member.name
    if name.startswith("/") or os.path.isabs(name):
        raise UnsafeArchiveError(name, "absolute path")
    if ".." in name.split("/"):
        raise UnsafeArchiveError(name, "'..' component")
    if member.ischr() or member.isblk():
        raise UnsafeArchiveError(name, "device node")
    if not (
        member.isfile() or member.isdir() or member.issym() or member.islnk() or member.isfifo()
    ):
        raise UnsafeArchiveError(name, f"unsupported member type {member.type!r}")
    relative = _normalize(name)
    if member.issym():
        target = member.linkname
        if target.startswith("/"):
            resolved = _normalize(target.lstrip("/"))
        else:
            resolved = _normalize(posixpath.join(posixpath.dirname(relative), target))
        _check_inside(name, resolved, "symlink target")
    if member.islnk():
        target = member.linkname
        if target.startswith("/") or ".." in target.split("/"):
            raise UnsafeArchiveError(name, "hard link target is absolute or climbs with '..'")
        link_relative = _normalize(target)
        _check_no_symlink_on_path(name, dest_path, link_relative, final=True)
        if not os.path.lexists(os.path.join(dest_path, link_relative)):
            raise UnsafeArchiveError(name, "hard link to a member not extracted before it")
    # A directory may be re-listed (tarfile then only updates its attributes); anything
    # else must not be written through, or over, a symlink already in the tree.
    _check_no_symlink_on_path(name, dest_path, relative, final=not member.isdir())
    return member


class _RootfsTarFile(tarfile.TarFile):
    """``TarFile`` that also restores the extended attributes a root filesystem needs."""

    def chmod(self, tarinfo: tarfile.TarInfo, targetpath: StrOrBytesPath) -> None:
        super().chmod(tarinfo, targetpath)
        # After chown and chmod: chown would drop security.capability again.
        for key, value in tarinfo.pax_headers.items():
            if not key.startswith(_XATTR_PREFIX):
                continue
            xattr = key[len(_XATTR_PREFIX) :]
            if xattr in _KEPT_XATTRS or xattr.startswith("user."):
                raw = value.encode("utf-8", "surrogateescape")
                os.setxattr(targetpath, xattr, raw, follow_symlinks=False)


def _extract_stream(fileobj: IO[bytes], dest: Path) -> None:
    with _RootfsTarFile.open(fileobj=fileobj, mode="r|*") as archive:
        archive.extractall(dest, numeric_owner=True, filter=rootfs_filter)  # noqa: S202 (strict filter)


def extract_tar(archive: Path, dest: Path) -> None:
    """Unpack ``archive`` into the existing empty directory ``dest``.

    Blocking (reads and writes the whole tree): call it from a thread. Must run as root to
    keep owners. On failure ``dest`` holds a partial tree; the caller discards it.

    Args:
        archive: ``.tar``, ``.tar.gz``, ``.tar.bz2``, ``.tar.xz`` or ``.tar.zst`` file.
        dest: target directory.

    Raises:
        UnsafeArchiveError: a member breaks the rules in the module docstring.
        ImageBuildError: the file is missing, not a tar archive, or ``zstd`` failed.
    """
    try:
        with archive.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ImageBuildError(f"cannot read rootfs archive {archive}: {exc.strerror}") from exc
    try:
        if magic == _ZSTD_MAGIC:
            _extract_zstd(archive, dest)
        else:
            with archive.open("rb") as fh:
                _extract_stream(fh, dest)
    except tarfile.TarError as exc:
        raise ImageBuildError(f"{archive} is not a readable tar archive: {exc}") from exc
    log.info("rootfs.tar_extracted", archive=str(archive), dest=str(dest))


def _extract_zstd(archive: Path, dest: Path) -> None:
    with subprocess.Popen(
        ["zstd", "-dcq", "--", str(archive)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        try:
            _extract_stream(proc.stdout, dest)
            # Drain what follows the end-of-archive blocks so zstd can finish and report.
            while proc.stdout.read(1 << 16):
                pass
        except BaseException:
            proc.kill()
            raise
        stderr = proc.stderr.read().decode(errors="replace").strip()
        returncode = proc.wait()
    if returncode != 0:
        raise ImageBuildError(f"zstd could not decompress {archive}: {stderr}")

"""File operations inside the bunker, as the acting guest user (SPEC §4).

Every path syscall whose outcome depends on permissions runs under
:func:`~scaigrid.agent.identity.acting_as`, so the kernel decides exactly as it would
for that user; bulk data I/O then happens on the already opened fd. Paths are resolved
by the kernel inside the bunker's own root, so ``..`` and symlinks cannot lead outside
it. Errors map to SPEC codes by errno (:func:`os_error`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import AsyncIterator
from typing import Any

from scaigrid.agent.clock import rfc3339
from scaigrid.agent.identity import Identity, acting_as
from scaigrid.agent.validation import display_path
from scaigrid.protocol.agent import AgentError

_CODES = {
    errno.ENOENT: "FILE_NOT_FOUND",
    errno.EACCES: "FILE_ACCESS_DENIED",
    errno.EPERM: "FILE_ACCESS_DENIED",
    errno.EROFS: "FILE_ACCESS_DENIED",
    errno.EEXIST: "FILE_CONFLICT",
    errno.ENOTEMPTY: "FILE_CONFLICT",
    errno.EISDIR: "FILE_CONFLICT",
    errno.ENOTDIR: "FILE_CONFLICT",
    errno.EBUSY: "FILE_CONFLICT",
    errno.ETXTBSY: "FILE_CONFLICT",
    errno.EXDEV: "FILE_CONFLICT",
    # Special files that cannot be opened or read as data (a terminal, a device without
    # its hardware, a socket): the request does not fit the file, it is not a server fault.
    errno.ENXIO: "FILE_CONFLICT",
    errno.ENODEV: "FILE_CONFLICT",
    errno.EOPNOTSUPP: "FILE_CONFLICT",
    errno.ESPIPE: "FILE_CONFLICT",
    errno.ENOSPC: "BUNKER_DISK_FULL",
    errno.EDQUOT: "BUNKER_DISK_FULL",
    errno.EFBIG: "BUNKER_DISK_FULL",
    errno.ENAMETOOLONG: "VALIDATION_ERROR",
    errno.ELOOP: "VALIDATION_ERROR",
    errno.EINVAL: "VALIDATION_ERROR",
}


def os_error(exc: OSError, path: str) -> AgentError:
    """The SPEC error for a failed syscall on ``path``."""
    code = _CODES.get(exc.errno or 0, "INTERNAL_ERROR")
    return AgentError(code, f"{display_path(path)}: {exc.strerror or exc}")


def printable(name: str) -> str:
    """``name`` as valid UTF-8 text: bytes that are not UTF-8 (kept by the OS layer as lone
    surrogates) become U+FFFD, so a hostile file name cannot break the JSON answer."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def entry(path: str, st: os.stat_result, link_target: str | None = None) -> dict[str, Any]:
    """The SPEC §4.2 entry object for ``path`` with ``lstat`` result ``st``."""
    shown = display_path(path)
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        kind = "dir"
    elif stat.S_ISREG(mode):
        kind = "file"
    elif stat.S_ISLNK(mode):
        kind = "symlink"
    else:
        kind = "other"
    return {
        "name": printable(os.path.basename(shown) or "/"),
        "path": printable(shown),
        "type": kind,
        "size": st.st_size,
        "mode": f"{stat.S_IMODE(mode):04o}",
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime": rfc3339(st.st_mtime),
        "symlink_target": printable(link_target) if link_target is not None else None,
    }


def _describe(path: str) -> dict[str, Any]:
    st = os.lstat(path)
    target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
    return entry(path, st, target)


def stat_path(identity: Identity, path: str) -> dict[str, Any]:
    """``GET /v1/files/stat``: the entry of ``path`` itself (a symlink is not followed).

    Raises:
        AgentError: FILE_NOT_FOUND, FILE_ACCESS_DENIED, ...
    """
    try:
        with acting_as(identity):
            return _describe(path)
    except OSError as exc:
        raise os_error(exc, path) from exc


def list_dir(
    identity: Identity, path: str, depth: int, limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """``GET /v1/files/list``: entries below ``path`` down to ``depth`` levels.

    Depth-first, names sorted within each directory; a subdirectory the user cannot
    read is listed without its children. Returns ``(entries, truncated)`` where
    ``truncated`` says that ``limit`` stopped the walk.

    Raises:
        AgentError: FILE_NOT_FOUND, FILE_CONFLICT (not a directory), FILE_ACCESS_DENIED.
    """
    entries: list[dict[str, Any]] = []

    def walk(directory: str, level: int) -> bool:
        with os.scandir(directory) as it:
            items = sorted(it, key=lambda e: e.name)
        for item in items:
            if len(entries) >= limit:
                return False
            child = f"{directory.rstrip('/')}/{item.name}"
            try:
                st = item.stat(follow_symlinks=False)
                target = os.readlink(child) if stat.S_ISLNK(st.st_mode) else None
            except OSError:
                continue
            entries.append(entry(child, st, target))
            if level < depth and stat.S_ISDIR(st.st_mode):
                try:
                    if not walk(child, level + 1):
                        return False
                except OSError:
                    continue
        return True

    try:
        with acting_as(identity):
            if not stat.S_ISDIR(os.stat(path).st_mode):
                raise AgentError("FILE_CONFLICT", f"{display_path(path)}: not a directory")
            complete = walk(path, 1)
    except OSError as exc:
        raise os_error(exc, path) from exc
    return entries, not complete


def delete(identity: Identity, path: str, recursive: bool) -> dict[str, Any]:
    """``DELETE /v1/files``: remove a file, symlink or (empty, or with ``recursive``) dir.

    Raises:
        AgentError: FILE_NOT_FOUND, FILE_CONFLICT (non-empty directory without
            ``recursive``, ``/``, or a path ending in ``.`` or ``..``), FILE_ACCESS_DENIED.
    """
    shown = display_path(path)
    if shown == "/":
        raise AgentError("FILE_CONFLICT", "refusing to delete /")
    if os.path.basename(path.rstrip("/")) in (".", ".."):
        # As rm(1) does: "." and ".." name a directory through itself or its child, and a
        # recursive delete would empty it before failing on the name.
        raise AgentError("FILE_CONFLICT", "refusing to delete a path ending in . or ..")
    try:
        with acting_as(identity):
            if stat.S_ISDIR(os.lstat(path).st_mode):
                if recursive:
                    import shutil

                    shutil.rmtree(path)
                else:
                    os.rmdir(path)
            else:
                os.unlink(path)
    except OSError as exc:
        raise os_error(exc, path) from exc
    return {"path": shown, "deleted": True}


def mkdir(identity: Identity, path: str, parents: bool, mode: int) -> dict[str, Any]:
    """``POST /v1/files/mkdir``: create a directory with exactly ``mode``.

    Raises:
        AgentError: FILE_CONFLICT (exists), FILE_NOT_FOUND (parent missing without
            ``parents``), FILE_ACCESS_DENIED.
    """
    try:
        with acting_as(identity):
            if os.path.lexists(path):
                raise AgentError("FILE_CONFLICT", f"{display_path(path)}: already exists")
            if parents:
                os.makedirs(path, mode=mode)
            else:
                os.mkdir(path, mode)
            os.chmod(path, mode)
            return _describe(path)
    except OSError as exc:
        raise os_error(exc, path) from exc


def move(identity: Identity, src: str, dst: str, overwrite: bool) -> dict[str, Any]:
    """``POST /v1/files/move``: rename ``src`` to ``dst``; copies across filesystems.

    Raises:
        AgentError: FILE_NOT_FOUND (``src``), FILE_CONFLICT (``dst`` exists without
            ``overwrite``, or cannot be replaced), FILE_ACCESS_DENIED.
    """
    try:
        with acting_as(identity):
            os.lstat(src)
    except OSError as exc:
        raise os_error(exc, src) from exc
    try:
        with acting_as(identity):
            dst_exists = os.path.lexists(dst)
            if dst_exists and not overwrite:
                raise AgentError("FILE_CONFLICT", f"{display_path(dst)}: already exists")
            try:
                os.rename(src, dst)
            except OSError as exc:
                if exc.errno != errno.EXDEV or (dst_exists and os.path.isdir(dst)):
                    raise
                import shutil

                shutil.move(src, dst)
            return _describe(dst)
    except OSError as exc:
        raise os_error(exc, dst) from exc


def open_for_read(identity: Identity, path: str) -> tuple[int, int]:
    """Open a regular file for ``GET /v1/files``; return ``(fd, size)``.

    Raises:
        AgentError: FILE_NOT_FOUND, FILE_CONFLICT (a directory or not a regular file),
            FILE_ACCESS_DENIED.
    """
    try:
        with acting_as(identity):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise os_error(exc, path) from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise AgentError("FILE_CONFLICT", f"{display_path(path)}: {what}")
    return fd, st.st_size


def _open_temp(identity: Identity, path: str, parents: bool) -> tuple[str, str, int]:
    """Resolve the upload target and create its temporary file: ``(target, temp, fd)``."""
    try:
        with acting_as(identity):
            target = os.path.realpath(path)
            if os.path.isdir(target):
                raise AgentError("FILE_CONFLICT", f"{display_path(path)}: is a directory")
            directory = os.path.dirname(target)
            if parents:
                os.makedirs(directory, mode=0o755, exist_ok=True)
            temp = f"{directory.rstrip('/')}/.scaibunker-upload-{os.urandom(6).hex()}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
            return target, temp, os.open(temp, flags, 0o600)
    except OSError as exc:
        raise os_error(exc, path) from exc


async def write_file(
    identity: Identity,
    path: str,
    *,
    mode: int,
    parents: bool,
    chunks: AsyncIterator[bytes],
) -> dict[str, Any]:
    """``PUT /v1/files``: stream ``chunks`` into ``path`` atomically.

    The bytes go to a temporary file in the target's directory, which is renamed over
    the target only once the body ended normally; on any failure, cancellation (the
    client reset the stream) or a full disk the temporary file is removed and the
    target is untouched. A symlink at ``path`` is followed. The file belongs to the
    acting user and gets exactly ``mode``.

    Returns:
        ``{"path", "size", "sha256", "mode"}`` (``mode`` as an octal string).

    Raises:
        AgentError: FILE_CONFLICT (a directory), FILE_NOT_FOUND (parent missing without
            ``parents``), FILE_ACCESS_DENIED, BUNKER_DISK_FULL.
    """
    import hashlib  # deferred: OpenSSL's libcrypto is slow to load at agent start-up

    target, temp, fd = _open_temp(identity, path, parents)
    digest = hashlib.sha256()
    size = 0
    try:
        try:
            async for chunk in chunks:
                view = memoryview(chunk)
                while len(view) > 0:
                    view = view[os.write(fd, view) :]
                digest.update(chunk)
                size += len(chunk)
            with acting_as(identity):
                os.fchmod(fd, mode)
        finally:
            os.close(fd)
        with acting_as(identity):
            os.rename(temp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise os_error(exc, path) from exc
        raise
    return {
        "path": display_path(path),
        "size": size,
        "sha256": digest.hexdigest(),
        "mode": f"{mode:04o}",
    }

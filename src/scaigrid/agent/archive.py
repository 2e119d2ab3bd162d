"""Tar archives of directories: download and extracting upload (SPEC §4.1, §4.3).

Each archive operation runs in a child process forked from the agent that takes on the
acting user's ids for good (real, effective and saved), so the kernel decides every
access exactly as for that user and a non-root user can neither create root-owned files
nor read what it could not read itself; the agent's own ids are never switched for the
length of a transfer. The child works with the stdlib :mod:`tarfile` on a pipe, so
neither side holds an archive in memory:

* **pack** (``GET``): the child writes a POSIX (pax) tar of the directory's contents,
  member names relative to the directory, symlinks stored as links, modes, owners and
  mtimes preserved. Entries the user cannot read are left out (``skipped``).
* **extract** (``PUT``): the agent pumps the request body into the child, which
  extracts member by member below the target directory (created if missing) through a
  filter that rejects absolute names, ``..`` components, device nodes and FIFOs, names
  that resolve outside the directory (also through a symlink already on disk, from the
  archive or not) and link targets that resolve outside it. gzip, bzip2 and xz input
  is recognised. Extraction is streamed, not atomic (SPEC §4.3): members extracted
  before a rejected one stay. As root, owners from the archive are applied by number.

The child reports ``{"ok": result}`` or ``{"error": {code, message, details}}`` as JSON on
a pipe of its own and exits; the agent reaps it through the PID 1 reaper.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import stat
from collections.abc import Callable, Iterator
from typing import IO, Any, NoReturn

from scaigrid.agent.fdwait import wait_readable, wait_writable
from scaigrid.agent.identity import Identity, acting_as, can_switch
from scaigrid.agent.init import ChildReaper
from scaigrid.agent.validation import display_path
from scaigrid.protocol.agent import AgentError, ServerRequest

TAR_CONTENT_TYPE = "application/x-tar"
#: Bytes the child copies per read/write, and the size of the pipes.
COPY_BYTES = 1 << 20
_PIPE_BYTES = 1 << 20
_SEND_BYTES = 256 * 1024
_UNBLOCKABLE = {signal.SIGKILL, signal.SIGSTOP}


class ArchiveRunner:
    """Forks archive children and collects their exit statuses.

    Args:
        reaper: the PID 1 reaper that reports exit statuses.
        oom_score_adj: the children's ``oom_score_adj`` (that of the workload).
    """

    def __init__(self, reaper: ChildReaper, *, oom_score_adj: int = 0) -> None:
        self._reaper = reaper
        self._oom_score_adj = oom_score_adj

    async def pack(self, request: ServerRequest, identity: Identity, path: str) -> None:
        """Answer ``GET /v1/files/archive``: the tar of directory ``path`` as the body,
        trailer ``x-result`` ``{path, entries, bytes, skipped}``.

        Errors before the first byte are answered as such; a failure mid-stream resets
        the stream (the tar is never ended as if it were complete).

        Raises:
            AgentError: FILE_NOT_FOUND, FILE_CONFLICT (not a directory),
                FILE_ACCESS_DENIED; INTERNAL_ERROR (503) when no child can be forked.
        """
        _check_directory(identity, path)
        data_r, data_w = os.pipe()
        _grow_pipe(data_r)
        child = self._fork(identity, data_w, lambda out: _pack_child(path, data_w, out), data_r)
        os.close(data_w)
        try:
            os.set_blocking(data_r, False)
            request.start(200, {"content-type": TAR_CONTENT_TYPE})
            while True:
                window = await request.writable()
                try:
                    data = os.read(data_r, min(max(window, 16384), _SEND_BYTES))
                except BlockingIOError:
                    await wait_readable(data_r)
                    continue
                if not data:
                    break
                await request.write(data)
            result = await child.result()
        finally:
            os.close(data_r)
            child.kill()
        request.finish({"x-result": json.dumps(result, separators=(",", ":"))})

    async def extract(
        self, request: ServerRequest, identity: Identity, path: str
    ) -> dict[str, Any]:
        """Handle ``PUT /v1/files/archive``: extract the body below directory ``path``.

        Returns:
            ``{"path", "entries", "bytes"}``: members extracted and bytes of regular files.

        Raises:
            AgentError: VALIDATION_ERROR (an escaping or special member, named in
                ``details``; not a tar stream), FILE_CONFLICT (``path`` is not a
                directory), FILE_ACCESS_DENIED, BUNKER_DISK_FULL.
        """
        data_r, data_w = os.pipe()
        _grow_pipe(data_w)
        child = self._fork(identity, data_r, lambda out: _extract_child(path, data_r, out), data_w)
        os.close(data_r)
        try:
            os.set_blocking(data_w, False)
            try:
                async for chunk in request.body():
                    view = memoryview(chunk)
                    while len(view) > 0:
                        try:
                            view = view[os.write(data_w, view) :]
                        except BlockingIOError:
                            await wait_writable(data_w)
            except BrokenPipeError:
                pass  # the child stopped reading: its answer says why
            os.close(data_w)
            data_w = -1
            return await child.result()
        finally:
            if data_w >= 0:
                os.close(data_w)
            child.kill()

    def _fork(
        self,
        identity: Identity,
        keep_fd: int,
        work: Callable[[IO[bytes]], dict[str, Any]],
        parent_fd: int,
    ) -> _Child:
        result_r, result_w = os.pipe()
        try:
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
            try:
                pid = os.fork()
                if pid == 0:
                    _child_main(identity, (keep_fd, result_w), self._oom_score_adj, work, result_w)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        except OSError as exc:
            os.close(result_r)
            os.close(result_w)
            os.close(keep_fd)
            os.close(parent_fd)
            raise AgentError(
                "INTERNAL_ERROR", f"cannot start the archive process: {exc.strerror}", status=503
            ) from exc
        os.close(result_w)
        child = _Child(pid, result_r)
        self._reaper.watch(pid, child.exited)
        return child


class _Child:
    """One archive child: its pid, result pipe and exit status."""

    def __init__(self, pid: int, result_fd: int) -> None:
        self.pid = pid
        self._result_fd = result_fd
        self._status: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def exited(self, status: int) -> None:
        if not self._status.done():
            self._status.set_result(status)

    def kill(self) -> None:
        """SIGKILL the child if it still runs (after a cancelled or broken transfer)."""
        if not self._status.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if self._result_fd >= 0:
            os.close(self._result_fd)
            self._result_fd = -1

    async def result(self) -> dict[str, Any]:
        """The child's ``ok`` object once it has exited.

        Raises:
            AgentError: the child's error, or INTERNAL_ERROR if it died without one.
        """
        fd = self._result_fd
        os.set_blocking(fd, False)
        parts: list[bytes] = []
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                await wait_readable(fd)
                continue
            if not data:
                break
            parts.append(data)
        status = await self._status
        try:
            answer = json.loads(b"".join(parts))
        except ValueError:
            answer = None
        if isinstance(answer, dict) and isinstance(answer.get("ok"), dict):
            return dict(answer["ok"])
        if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
            error = answer["error"]
            raise AgentError(
                str(error.get("code", "INTERNAL_ERROR")),
                str(error.get("message", "")),
                error.get("details"),
            )
        raise AgentError("INTERNAL_ERROR", f"the archive process ended with status {status}")


# -- the child -----------------------------------------------------------------------------


def _child_main(
    identity: Identity,
    keep: tuple[int, int],
    oom_score_adj: int,
    work: Callable[[IO[bytes]], dict[str, Any]],
    result_fd: int,
) -> NoReturn:
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for signum in signal.valid_signals():
            if signum in _UNBLOCKABLE or signal.getsignal(signum) in (signal.SIG_DFL, None):
                continue
            with contextlib.suppress(OSError, ValueError):
                signal.signal(signum, signal.SIG_DFL)
        # Python ignores SIGPIPE; keep it so a closed pipe is an EPIPE error, not death.
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        # Only the two pipes stay open: the agent's sockets, other execs' stdin pipes and
        # the event loop's fds must not be held by (or reachable from) this process.
        low, high = sorted(keep)
        os.closerange(3, low)
        os.closerange(low + 1, high)
        os.closerange(high + 1, max(os.sysconf("SC_OPEN_MAX"), high + 1))
        with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as fh:
            fh.write(str(oom_score_adj))
        if can_switch() and identity.uid != 0:
            os.setgroups(list(identity.groups))
            os.setresgid(identity.gid, identity.gid, identity.gid)
            os.setresuid(identity.uid, identity.uid, identity.uid)
        os.umask(0o022)
        with open(result_fd, "wb", closefd=False) as out:
            try:
                answer: dict[str, Any] = {"ok": work(out)}
                code = 0
            except AgentError as exc:
                answer = {"error": exc.to_dict()}
            except BaseException as exc:  # everything is reported
                answer = {"error": {"code": "INTERNAL_ERROR", "message": f"archive: {exc!r}"}}
            with contextlib.suppress(OSError):
                out.write(json.dumps(answer).encode())
    finally:
        os._exit(code)


class _PipeSink:
    """A write-only file object over a pipe that also answers ``tell()`` (tarfile's
    ``w`` mode asks for the position once; its stream mode re-buffers in small blocks)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._position = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while len(view) > 0:
            view = view[os.write(self._fd, view) :]
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position


def _pack_child(path: str, fd: int, _out: IO[bytes]) -> dict[str, Any]:
    import tarfile

    sink = _PipeSink(fd)
    counts = {"entries": 0, "bytes": 0, "skipped": 0}
    try:
        tar = tarfile.TarFile(
            fileobj=sink,  # type: ignore[arg-type]
            mode="w",
            format=tarfile.PAX_FORMAT,
            copybufsize=COPY_BYTES,
        )
        _pack_directory(tar, path, counts)
        tar.close()
    except OSError as exc:
        raise _os_error(exc, path) from exc
    return {"path": display_path(path), **counts}


def _pack_directory(tar: Any, root: str, counts: dict[str, int]) -> None:
    """Add ``root``'s contents depth-first, names sorted (an explicit stack: no recursion
    limit however deep the tree)."""
    pending: list[tuple[str, str, Iterator[str]]] = []

    def enter(directory: str, prefix: str) -> None:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            counts["skipped"] += 1
            return
        pending.append((directory, prefix, iter(names)))

    enter(root, "")
    while pending:
        directory, prefix, names = pending[-1]
        name = next(names, None)
        if name is None:
            pending.pop()
            continue
        full = f"{directory.rstrip('/')}/{name}"
        arcname = f"{prefix}{name}"
        try:
            info = tar.gettarinfo(full, arcname)
        except OSError:
            counts["skipped"] += 1
            continue
        if info is None:  # a socket: not representable in a tar
            counts["skipped"] += 1
            continue
        if info.isreg():
            try:
                source = open(full, "rb", buffering=0)  # noqa: SIM115 - closed below
            except OSError:
                # Later hard links to this inode must not point at a member never written.
                for inode, first in list(tar.inodes.items()):
                    if first == arcname:
                        del tar.inodes[inode]
                counts["skipped"] += 1
                continue
            with source:
                # A file that shrinks while it is read raises here: the archive is broken
                # off rather than ended as if complete.
                tar.addfile(info, source)
            counts["bytes"] += info.size
        else:
            tar.addfile(info)
        counts["entries"] += 1
        if info.isdir():
            enter(full, f"{arcname}/")


def _extract_child(path: str, fd: int, _out: IO[bytes]) -> dict[str, Any]:
    import tarfile

    shown = display_path(path)
    try:
        with contextlib.suppress(FileExistsError):
            os.makedirs(path, mode=0o755, exist_ok=True)
        if not stat.S_ISDIR(os.stat(path).st_mode):
            raise AgentError("FILE_CONFLICT", f"{shown}: not a directory")
        dest = os.path.realpath(path)
    except OSError as exc:
        raise _os_error(exc, path) from exc
    counts = {"entries": 0, "bytes": 0}
    source = open(fd, "rb", buffering=COPY_BYTES, closefd=False)  # noqa: SIM115
    directories: list[Any] = []
    member_name = ""
    try:
        tar: Any  # tarfile's own attributes copybufsize and members are not in the stubs
        with tarfile.open(fileobj=source, mode="r|*", bufsize=COPY_BYTES) as tar:
            tar.errorlevel = 1
            tar.copybufsize = COPY_BYTES
            while True:
                member = tar.next()
                if member is None:
                    break
                # tarfile keeps every member it has read; a stream is read once, so let
                # them go and keep memory flat however many members the archive has.
                del tar.members[:]
                member_name = member.name
                # The filter runs right before the member is written, so symlinks that
                # earlier members created are followed by its checks.
                tar.extract(
                    member,
                    dest,
                    set_attrs=not member.isdir(),
                    numeric_owner=True,
                    filter=check_member,
                )
                if member.isdir():
                    directories.append(member)
                counts["entries"] += 1
                if member.isreg():
                    counts["bytes"] += member.size
            # Directory modes and times last (deepest first), as tar does: a read-only
            # directory still received its members.
            for info in sorted(directories, key=lambda d: d.name, reverse=True):
                target = os.path.join(dest, info.name)
                with contextlib.suppress(OSError, tarfile.ExtractError):
                    tar.chown(info, target, numeric_owner=True)
                    tar.utime(info, target)
                    tar.chmod(info, target)
    except ArchiveMemberRejected as exc:
        raise AgentError(
            "VALIDATION_ERROR",
            f"archive member {_printable(exc.member)!r}: {exc.reason}",
            [{"field": "archive", "message": f"{_printable(exc.member)}: {exc.reason}"}],
        ) from exc
    except (tarfile.ReadError, tarfile.CompressionError, tarfile.StreamError) as exc:
        where = f" at member {_printable(member_name)!r}" if member_name else ""
        raise AgentError(
            "VALIDATION_ERROR",
            f"the body is not a readable tar stream{where}: {exc}",
            [{"field": "archive", "message": str(exc)}],
        ) from exc
    except OSError as exc:
        shown_member = os.path.join(path, member_name) if member_name else path
        raise _os_error(exc, shown_member) from exc
    return {"path": shown, **counts}


class ArchiveMemberRejected(Exception):
    """A member that may not be extracted: ``member`` (its name) and ``reason``."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"{member}: {reason}")
        self.member = member
        self.reason = reason


def _inside(target: str, dest: str) -> bool:
    return target == dest or target.startswith(dest.rstrip("/") + "/")


def check_member(member: Any, dest: str) -> Any:
    """Return the :class:`tarfile.TarInfo` ``member`` if it may be extracted below the
    real directory ``dest``, else raise.

    Rejected: an empty or absolute name, a ``..`` component, a device node or FIFO, a
    name that resolves outside ``dest`` (following symlinks already on disk, including
    one at the name itself: writing through it), and a symlink or hard link whose
    target resolves outside ``dest``. Modes, owners and times are kept as archived.

    Raises:
        ArchiveMemberRejected: naming the member and the reason.
    """
    name = member.name
    if not name:
        raise ArchiveMemberRejected(name, "empty name")
    if name.startswith("/"):
        raise ArchiveMemberRejected(name, "absolute name")
    if ".." in name.split("/"):
        raise ArchiveMemberRejected(name, "name has a .. component")
    if member.ischr() or member.isblk() or member.isfifo():
        raise ArchiveMemberRejected(name, "device nodes and FIFOs are refused")
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        raise ArchiveMemberRejected(name, "unsupported member type")
    target = os.path.realpath(os.path.join(dest, name))
    if not _inside(target, dest):
        raise ArchiveMemberRejected(name, "resolves outside the target directory")
    if member.issym():
        link = os.path.join(dest, os.path.dirname(name), member.linkname)
        if not _inside(os.path.realpath(link), dest):
            raise ArchiveMemberRejected(name, "symlink target resolves outside the directory")
    elif member.islnk():
        link = os.path.join(dest, member.linkname)
        if not _inside(os.path.realpath(link), dest):
            raise ArchiveMemberRejected(name, "hard link target resolves outside the directory")
    return member


# -- helpers -------------------------------------------------------------------------------


def _check_directory(identity: Identity, path: str) -> None:
    from scaigrid.agent.files import os_error

    try:
        with acting_as(identity):
            st = os.stat(path)
            if not stat.S_ISDIR(st.st_mode):
                raise AgentError("FILE_CONFLICT", f"{display_path(path)}: not a directory")
            os.close(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
    except OSError as exc:
        raise os_error(exc, path) from exc


def _os_error(exc: OSError, path: str) -> AgentError:
    from scaigrid.agent.files import os_error

    if exc.errno is None and "unexpected end of data" in str(exc):
        return AgentError("INTERNAL_ERROR", f"{display_path(path)}: {exc}")
    return os_error(exc, path)


def _printable(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _grow_pipe(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)

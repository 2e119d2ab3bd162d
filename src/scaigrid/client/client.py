"""The blocking ScaiBunker client.

>>> from scaigrid.client import Client
>>> with Client() as client:  # SCAIGRID_HOST, SCAIGRID_API_KEY
...     bunker = client.bunkers.create(image="debian-12", wait_s=30)
...     client.bunkers.wait_running(bunker.id)
...     result = client.bunkers.exec(bunker.id, ["python3", "-c", "print(6 * 7)"])
...     client.files.write(bunker.id, "data.csv", Path("local.csv"))
...     client.bunkers.terminate(bunker.id)

Every method raises :class:`~scaigrid.client.errors.ScaiGridAPIError` subclasses for error
envelopes (``BUNKER_NOT_FOUND`` → :class:`~scaigrid.client.errors.BunkerNotFound`, …) and
:class:`~scaigrid.client.errors.APIConnectionError` when no answer arrives in time.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, Unpack, cast

import httpx

from scaigrid.client import _calls, _sse, _waiting
from scaigrid.client._io import (
    CHUNK_BYTES,
    DownloadTarget,
    UploadData,
    archive_content,
    save_chunks,
    target_path,
    upload_content,
)
from scaigrid.client._transport import DEFAULT_TIMEOUT_S, SyncTransport, resolve_config
from scaigrid.client.models import (
    Bunker,
    BunkerSpec,
    DeletedFile,
    ExecEvent,
    ExecResult,
    ExtractedArchive,
    FileEntry,
    GuestUser,
    Image,
    ImageSpec,
    OutputChunk,
    ProcessRecord,
    WrittenFile,
)
from scaigrid.client.shell import Shell, auth_headers, shell_params, ticket_call


class Bunkers:
    """Bunker lifecycle and exec (SPEC §2, §3). Reached as ``client.bunkers``."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    def create(
        self, image: str | None = None, *, wait_s: int | None = None, **fields: Unpack[BunkerSpec]
    ) -> Bunker:
        """Create a bunker (``POST /bunkers``, SPEC §2.3.1).

        Args:
            image: image name or ``img_`` id; required unless ``snapshot_id`` is given.
            wait_s: 0-60 seconds for the server to hold the answer until the bunker leaves
                ``pending``/``provisioning``; the bunker may still be starting afterwards
                (use :meth:`wait_running`).
            **fields: the other §2.2 fields (:class:`~scaigrid.client.models.BunkerSpec`),
                e.g. ``name``, ``cpu_millicores``, ``memory_mb``, ``disk_mb``,
                ``env_vars``, ``label_set``, ``lifecycle_mode``, ``network_profile``.

        Returns:
            The new bunker (status ``pending`` unless ``wait_s`` let it progress).

        Raises:
            ValidationError: a field breaks a §2.2 rule.
            ImageNotFound, ImageNotReady, LifecycleModeDenied, NetworkProfileDenied,
            BunkerQuotaExceeded, WorkerUnavailable, NoSuitableWorker: see SPEC §2.3.1.
        """
        body = {"image": image, **fields}
        return Bunker.from_dict(self._t.data(_calls.create_bunker(body, wait_s)))

    def get(self, bunker_id: str) -> Bunker:
        """Read one bunker, with ``status_history`` (``GET /bunkers/{id}``).

        Raises:
            BunkerNotFound: unknown or invisible bunker.
        """
        return Bunker.from_dict(self._t.data(_calls.get_bunker(bunker_id)))

    def list(
        self,
        *,
        status: str | Iterable[str] | None = None,
        label: Mapping[str, str] | Iterable[str] | None = None,
        limit: int | None = None,
    ) -> Iterator[Bunker]:
        """Iterate the caller's bunkers, newest first, fetching page after page lazily
        (requests happen while iterating, so errors surface there too).

        Args:
            status: one state or several (any of them matches); None = every state.
            label: ``{"team": "data"}`` or ``["team=data"]``; every label must match.
            limit: stop after this many bunkers; None = all of them.

        Raises:
            ValidationError: the server refused a filter.
            ValueError: a label string without ``=``.
        """
        call = _calls.list_bunkers(status, label, limit)
        for count, item in enumerate(self._t.pages(call), start=1):
            yield Bunker.from_dict(item)
            if limit is not None and count >= limit:
                return

    def terminate(self, bunker_id: str) -> Bunker:
        """Terminate a bunker (``DELETE /bunkers/{id}``); idempotent on ended bunkers.

        Returns:
            The bunker, usually in ``stopping`` (teardown continues on the server).

        Raises:
            BunkerNotFound: unknown or invisible bunker.
        """
        return Bunker.from_dict(self._t.data(_calls.terminate_bunker(bunker_id)))

    def wait_running(
        self, bunker_id: str, timeout_s: float = 120.0, *, poll_interval_s: float | None = None
    ) -> Bunker:
        """Poll ``GET /bunkers/{id}`` until the bunker is ``running``.

        Args:
            timeout_s: seconds to wait in total.
            poll_interval_s: fixed delay between polls; None = 0.25 s growing to 2 s.

        Returns:
            The running bunker.

        Raises:
            BunkerStopped: the bunker reached ``stopping`` or a terminal state (``failed``,
                …); ``.bunker`` tells why.
            WaitTimeout: still not running after ``timeout_s``; ``.bunker`` is the last read.
            BunkerNotFound: unknown or invisible bunker.
        """
        deadline = time.monotonic() + timeout_s
        delays = _waiting.poll_delays(poll_interval_s)
        while True:
            bunker = self.get(bunker_id)
            if _waiting.is_running(bunker):
                return bunker
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _waiting.timed_out(bunker, timeout_s)
            time.sleep(min(next(delays), remaining))

    def exec(
        self,
        bunker_id: str,
        command: str | Iterable[str],
        timeout_s: int | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: str | bytes | None = None,
        user: GuestUser = "user",
        *,
        max_output_bytes: int | None = None,
    ) -> ExecResult:
        """Run a command to completion (``POST /bunkers/{id}/exec``, SPEC §3.2-3.4).

        Args:
            command: a string runs as ``/bin/sh -c <command>``; a list is an argv.
            timeout_s: seconds before the process group is killed (status ``timed_out``);
                None = the server default (60). The HTTP answer is awaited that long plus
                a grace period.
            cwd: working directory, absolute or relative to ``/home/user``.
            env: variables merged over the image's and the bunker's environment.
            stdin: text or bytes fed to stdin, then EOF; None = ``/dev/null``.
            user: ``"user"`` (uid 1000) or ``"root"`` (needs ``scaibunker:root``).
            max_output_bytes: per-stream cap; beyond it head and tail are kept.

        Returns:
            The :class:`~scaigrid.client.models.ExecResult`; a failing command is not an
            exception (check ``status``/``exit_code`` or ``ok``).

        Raises:
            BunkerNotFound, BunkerNotRunning, AgentUnavailable, ValidationError,
            AuthzPermissionDenied (root).
        """
        call = _calls.exec_command(
            bunker_id,
            command,
            timeout_s=timeout_s,
            cwd=cwd,
            env=env,
            stdin=stdin,
            user=user,
            max_output_bytes=max_output_bytes,
        )
        return ExecResult.from_dict(self._t.data(call))


class Files:
    """Files inside a bunker (SPEC §4). Reached as ``client.files``.

    Guest paths are absolute or relative to ``/home/user``; ``user`` picks the guest user
    whose permissions apply (``"root"`` needs ``scaibunker:root``). Every method also raises
    ``BunkerNotFound``, ``BunkerNotRunning`` and ``AgentUnavailable``.
    """

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    def write(
        self,
        bunker_id: str,
        path: str,
        data: UploadData,
        mode: int = 0o644,
        *,
        parents: bool = True,
        user: GuestUser = "user",
    ) -> WrittenFile:
        """Write a file atomically (``PUT /bunkers/{id}/files``).

        Args:
            path: guest path of the file.
            data: ``bytes``; ``str`` (written as UTF-8 text); a local path as
                :class:`os.PathLike` (e.g. :class:`pathlib.Path`); a binary file object;
                or an iterable of byte chunks. Paths, file objects and iterables are
                streamed with chunked transfer encoding in 256 KiB reads, never loaded
                whole.
            mode: permission bits of the file, e.g. ``0o600``.
            parents: create missing parent directories.

        Returns:
            ``{"path", "size", "sha256", "mode"}``; ``size`` in bytes.

        Raises:
            FileConflict: ``path`` is a directory. BunkerFileNotFound: parent missing with
            ``parents=False``. FileAccessDenied. BunkerDiskFull. OSError: a local path
            cannot be read. TypeError: unsupported ``data``.
        """
        call = _calls.write_file(bunker_id, path, mode, parents, user)
        with upload_content(data) as content:
            return cast(WrittenFile, self._t.data(call, content))

    def read(self, bunker_id: str, path: str, *, user: GuestUser = "user") -> bytes:
        """Return a whole file's bytes (``GET /bunkers/{id}/files``); for large files use
        :meth:`download`.

        Raises:
            BunkerFileNotFound. FileConflict: ``path`` is a directory. FileAccessDenied.
        """
        return self._t.send(_calls.read_file(bunker_id, path, user)).content

    def download(
        self, bunker_id: str, path: str, dest: DownloadTarget, *, user: GuestUser = "user"
    ) -> int:
        """Stream a file into ``dest`` and return the number of bytes written.

        Args:
            dest: a local path (``str`` or path-like; written through a temporary sibling
                that replaces it only when complete) or a binary file object.

        Raises:
            BunkerFileNotFound. FileConflict: ``path`` is a directory. FileAccessDenied.
            IsADirectoryError: ``dest`` is a local directory. APIConnectionError: the
            download broke off (a local ``dest`` path is left untouched).
        """
        target_path(dest)  # a directory fails here, before the request
        with self._t.stream(_calls.read_file(bunker_id, path, user)) as response:
            return save_chunks(response.iter_bytes(CHUNK_BYTES), dest)

    def upload_archive(
        self, bunker_id: str, path: str, source: UploadData, *, user: GuestUser = "user"
    ) -> ExtractedArchive:
        """Extract a tar archive below directory ``path``, created if missing
        (``PUT /bunkers/{id}/files/archive``).

        Args:
            path: guest directory to extract into.
            source: a local directory as :class:`os.PathLike` (its contents are packed on
                the fly, names relative to it); a local tar file as :class:`os.PathLike`
                (plain, gzip, bzip2 or xz); tar ``bytes``; a binary file object; or an
                iterable of byte chunks. Everything but ``bytes`` is streamed.

        Returns:
            ``{"path", "entries", "bytes"}``: members extracted, bytes of regular files.

        Raises:
            ValidationError: a member with an absolute name, a ``..`` component, a link
            leading outside ``path`` or a write through such a symlink, a device node or
            FIFO (the message names it; members before it stay extracted), or a body that
            is not a tar. FileConflict: ``path`` is not a directory. FileAccessDenied.
            BunkerDiskFull. OSError: a local source cannot be read.
        """
        call = _calls.write_archive(bunker_id, path, user)
        with archive_content(source) as content:
            return cast(ExtractedArchive, self._t.data(call, content))

    def download_archive(
        self, bunker_id: str, path: str, dest: DownloadTarget, *, user: GuestUser = "user"
    ) -> int:
        """Stream a tar of directory ``path``'s contents into ``dest``
        (``GET /bunkers/{id}/files/archive``); return the bytes written.

        Member names are relative to ``path``; symlinks are stored as links; modes, owners
        and mtimes are kept. Entries the acting user cannot read are left out.

        Args:
            dest: a local file path (written through a temporary sibling that replaces it
                only when complete) or a binary file object.

        Raises:
            BunkerFileNotFound. FileConflict: ``path`` is not a directory.
            FileAccessDenied. APIConnectionError: the archive broke off (a local ``dest``
            path is left untouched).
        """
        target_path(dest)
        with self._t.stream(_calls.read_archive(bunker_id, path, user)) as response:
            return save_chunks(response.iter_bytes(CHUNK_BYTES), dest)

    def list(
        self, bunker_id: str, path: str = ".", depth: int = 1, *, user: GuestUser = "user"
    ) -> builtins.list[FileEntry]:
        """List the entries below a directory, depth-first (``GET .../files/list``).

        Args:
            depth: 1 = direct children, up to 10.

        Raises:
            BunkerFileNotFound. FileConflict: ``path`` is not a directory.
        """
        call = _calls.list_files(bunker_id, path, depth, user)
        return [cast(FileEntry, item) for item in self._t.pages(call)]

    def stat(self, bunker_id: str, path: str, *, user: GuestUser = "user") -> FileEntry:
        """Describe one entry; a symlink is described itself (``GET .../files/stat``).

        Raises:
            BunkerFileNotFound.
        """
        return cast(FileEntry, self._t.data(_calls.stat_file(bunker_id, path, user)))

    def delete(
        self, bunker_id: str, path: str, recursive: bool = False, *, user: GuestUser = "user"
    ) -> DeletedFile:
        """Delete a file or directory (``DELETE /bunkers/{id}/files``).

        Raises:
            BunkerFileNotFound. FileConflict: a non-empty directory without ``recursive``.
            FileAccessDenied.
        """
        call = _calls.delete_file(bunker_id, path, recursive, user)
        return cast(DeletedFile, self._t.data(call))

    def mkdir(
        self,
        bunker_id: str,
        path: str,
        *,
        parents: bool = False,
        mode: int = 0o755,
        user: GuestUser = "user",
    ) -> FileEntry:
        """Create a directory (``POST .../files/mkdir``) and return its entry.

        Raises:
            FileConflict: it exists. BunkerFileNotFound: parent missing without
            ``parents``. FileAccessDenied.
        """
        call = _calls.make_directory(bunker_id, path, parents, mode, user)
        return cast(FileEntry, self._t.data(call))

    def move(
        self,
        bunker_id: str,
        src: str,
        dst: str,
        *,
        overwrite: bool = False,
        user: GuestUser = "user",
    ) -> FileEntry:
        """Move or rename an entry (``POST .../files/move``) and return the entry at ``dst``.

        Raises:
            BunkerFileNotFound. FileConflict: ``dst`` exists without ``overwrite``.
            FileAccessDenied.
        """
        call = _calls.move_file(bunker_id, src, dst, overwrite, user)
        return cast(FileEntry, self._t.data(call))


class Images:
    """Images bunkers boot from (SPEC §7). Reached as ``client.images``."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    def list(
        self, *, status: str | None = None, name: str | None = None, limit: int | None = None
    ) -> Iterator[Image]:
        """Iterate the images visible to the caller, newest first, page after page.

        Args:
            status: ``pending``, ``baking``, ``ready``, ``failed`` or ``deactivated``.
            name: exact image name.
            limit: stop after this many images; None = all of them.
        """
        for count, item in enumerate(self._t.pages(_calls.list_images(status, name, limit)), 1):
            yield Image.from_dict(item)
            if limit is not None and count >= limit:
                return

    def get(self, image_id: str) -> Image:
        """Read one image (``GET /images/{id}``).

        Raises:
            ImageNotFound.
        """
        return Image.from_dict(self._t.data(_calls.get_image(image_id)))

    def register(self, name: str, source: Mapping[str, Any], **fields: Unpack[ImageSpec]) -> Image:
        """Register an image to bake (``POST /images``, SPEC §7.4); it starts ``pending``.

        Args:
            name: 1-63 characters ``[a-z0-9][a-z0-9._-]*``, unique in its scope.
            source: ``{"kind": "debootstrap", "suite", "variant", "packages"}``,
                ``{"kind": "tar", "path"}`` or ``{"kind": "oci", "ref"}``.
            **fields: :class:`~scaigrid.client.models.ImageSpec` (``size_mib``,
                ``default_cpu_millicores``, ``scope``, ``lazy_pull``, …).

        Raises:
            ValidationError. SlugConflict: the name is taken. AuthzPermissionDenied.
        """
        body = {"name": name, "source": dict(source), **fields}
        return Image.from_dict(self._t.data(_calls.register_image(body)))

    def deactivate(self, image_id: str) -> Image:
        """Deactivate an image for good (``POST /images/{id}/deactivate``).

        Raises:
            ImageNotFound. AuthzPermissionDenied: another scope's image.
        """
        return Image.from_dict(self._t.data(_calls.deactivate_image(image_id)))


class Client:
    """Blocking client for the ScaiBunker API of one ScaiGrid host.

    Args:
        host: base URL such as ``https://scaigrid.example.com``; default ``$SCAIGRID_HOST``.
        api_key: ``sgk_...`` key or ScaiKey JWT; default ``$SCAIGRID_API_KEY``.
        timeout_s: seconds for connecting, sending and waiting for each answer (and for
            each read of a streamed body). Calls that legitimately take longer (exec,
            ``wait_s``) extend their read deadline; no call waits without a deadline.
        transport: an :class:`httpx.BaseTransport` to use in place of the network.

    Attributes:
        bunkers: :class:`Bunkers`. files: :class:`Files`. images: :class:`Images`.
        processes: :class:`Processes` (background processes and streaming exec).

    Raises:
        ConfigurationError: no host, or not an http(s) URL.
        ValueError: ``timeout_s`` is not positive.
    """

    def __init__(
        self,
        host: str | None = None,
        api_key: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        base_url, key = resolve_config(host, api_key)
        self._transport = SyncTransport(base_url, key, timeout_s, transport)
        self.bunkers = Bunkers(self._transport)
        self.files = Files(self._transport)
        self.images = Images(self._transport)
        self.processes = Processes(self._transport)

    @property
    def base_url(self) -> str:
        """The module's base URL, ``<host>/v1/modules/scaibunker``."""
        return self._transport.base_url

    def shell(
        self,
        bunker_id: str,
        *,
        cols: int | None = None,
        rows: int | None = None,
        command: str | None = None,
        user: GuestUser = "user",
        session: str | None = None,
        offset: int | None = None,
        ticket: str | None = None,
    ) -> Shell:
        """Open an interactive shell in the bunker (``GET /bunkers/{id}/shell``, SPEC §5),
        or reattach to ``session`` (replaying its output from ``offset``).

        Args:
            cols, rows: window size (1-1000; server default 80x24).
            command: run this instead of the user's login shell.
            user: ``user`` or ``root`` (needs ``scaibunker:root``).
            session: ``shs_`` id to reattach to.
            offset: output byte offset to replay from on reattach.
            ticket: a ticket from :meth:`shell_ticket` instead of the API key.

        Raises:
            BunkerNotFound, BunkerNotRunning, AuthzPermissionDenied, ShellSessionNotFound,
            AgentUnavailable, AuthenticationError (bad ticket), ValidationError.
        """
        params = shell_params(
            cols=cols,
            rows=rows,
            command=command,
            user=user,
            session=session,
            offset=offset,
            ticket=ticket,
        )
        headers = auth_headers(self._transport._client.headers, ticket)
        return Shell(self.base_url, headers, bunker_id, params)

    def shell_ticket(self, bunker_id: str) -> dict[str, Any]:
        """Mint a one-use shell ticket valid 30 s (``POST /bunkers/{id}/shell/ticket``).

        Returns:
            ``{"ticket", "expires_at"}``.
        """
        value: dict[str, Any] = self._transport.data(ticket_call(bunker_id))
        return value

    def close(self) -> None:
        """Close the connection pool; the client cannot be used afterwards."""
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Processes:
    """Background processes of a bunker (SPEC §3.6). Reached as ``client.processes``.

    A process is named by its guest pid or its ``exe_`` exec id.
    """

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    def start(
        self,
        bunker_id: str,
        command: str | Iterable[str],
        timeout_s: int | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: str | bytes | None = None,
        user: GuestUser = "user",
        *,
        stdin_open: bool = False,
    ) -> tuple[str, int]:
        """Start a command in the background; return ``(exec_id, pid)`` at once.

        Args:
            timeout_s: seconds before it is killed; None = no timeout.
            stdin: fed to stdin first; then stdin closes unless ``stdin_open``.
            stdin_open: keep stdin open for :meth:`write_stdin`.

        Raises:
            BunkerNotFound, BunkerNotRunning, AgentUnavailable, ValidationError.
        """
        call = _calls.start_process(
            bunker_id,
            command,
            timeout_s=timeout_s,
            cwd=cwd,
            env=env,
            stdin=stdin,
            stdin_open=stdin_open,
            user=user,
        )
        data = self._t.data(call)
        return str(data["exec_id"]), int(data["pid"])

    def list(
        self, bunker_id: str, status: str | None = None, *, limit: int | None = None
    ) -> builtins.list[ProcessRecord]:
        """The bunker's processes, newest first (optionally only those with ``status``)."""
        records: builtins.list[ProcessRecord] = []
        for item in self._t.pages(_calls.list_processes(bunker_id, status, limit)):
            records.append(ProcessRecord.from_dict(item))
            if limit is not None and len(records) >= limit:
                break
        return records

    def get(self, bunker_id: str, ref: str | int) -> ProcessRecord:
        """One process record. Raises: ProcessNotFound."""
        return ProcessRecord.from_dict(self._t.data(_calls.get_process(bunker_id, ref)))

    def output(
        self, bunker_id: str, ref: str | int, *, stream: str = "stdout", offset: int = 0
    ) -> OutputChunk:
        """Output available from ``offset`` (resume with the answer's ``next_offset``)."""
        call = _calls.process_output(bunker_id, ref, stream, offset)
        return OutputChunk.from_dict(self._t.data(call))

    def signal(
        self, bunker_id: str, ref: str | int, signal: str | int = "SIGTERM", *, group: bool = False
    ) -> ProcessRecord:
        """Send ``signal`` (name or number) to the process, or its whole group.

        Raises:
            ProcessNotFound, ProcessNotRunning, ValidationError (unknown signal).
        """
        call = _calls.signal_process(bunker_id, ref, signal, group)
        return ProcessRecord.from_dict(self._t.data(call))

    def write_stdin(
        self, bunker_id: str, ref: str | int, data: str | bytes, *, eof: bool = False
    ) -> int:
        """Write to a ``stdin_open`` process; ``eof`` closes stdin after. Returns bytes
        written.

        Raises:
            ProcessNotFound, ProcessNotRunning, StdinClosed.
        """
        answer = self._t.data(_calls.process_stdin(bunker_id, ref, data, eof))
        return int(answer.get("bytes_written", 0))

    def follow(
        self, bunker_id: str, ref: str | int, *, stream: str = "stdout", offset: int = 0
    ) -> Iterator[ExecEvent]:
        """Yield a process's output from byte ``offset`` as it is produced (``start``,
        ``stdout``/``stderr`` events with their offsets, then ``exit``).

        Raises:
            ProcessNotFound.
        """
        with self._t.stream(_calls.follow_output(bunker_id, ref, stream, offset)) as response:
            for event, data in _sse.frames(response.iter_lines()):
                parsed = ExecEvent.from_sse(event, data)
                if parsed is not None:
                    yield parsed

    def stream(
        self,
        bunker_id: str,
        command: str | Iterable[str],
        timeout_s: int | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: str | bytes | None = None,
        user: GuestUser = "user",
    ) -> Iterator[ExecEvent]:
        """Run a command and yield its :class:`ExecEvent` s as they happen (SSE, SPEC §3.5):
        ``start``, ``stdout``/``stderr`` chunks (raw bytes with their byte offset), ``exit``.

        Breaking off the iteration leaves the process running as a background process
        (its timeout still applies).

        Raises:
            BunkerNotFound, BunkerNotRunning, AgentUnavailable, ValidationError.
        """
        call = _calls.exec_stream(
            bunker_id, command, timeout_s=timeout_s, cwd=cwd, env=env, stdin=stdin, user=user
        )
        with self._t.stream(call) as response:
            for event, data in _sse.frames(response.iter_lines()):
                parsed = ExecEvent.from_sse(event, data)
                if parsed is not None:
                    yield parsed

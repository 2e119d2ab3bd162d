"""The asynchronous ScaiBunker client.

The same surface as :mod:`scaigrid.client.client`, awaited; listings are async iterators:

>>> async with AsyncClient() as client:
...     bunker = await client.bunkers.create(image="debian-12", wait_s=30)
...     await client.bunkers.wait_running(bunker.id)
...     result = await client.bunkers.exec(bunker.id, "uname -a")
...     async for other in client.bunkers.list(status="running"):
...         print(other.id)

Arguments, results and errors are documented on the blocking twins (:class:`Bunkers`,
:class:`Files`, :class:`Images` of :mod:`scaigrid.client.client`). Local file reads and
writes of uploads and downloads run in worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Any, Unpack, cast

import httpx

from scaigrid.client import _calls, _sse, _waiting
from scaigrid.client._io import (
    CHUNK_BYTES,
    AsyncUploadData,
    DownloadTarget,
    archive_content_async,
    save_chunks_async,
    target_path,
    upload_content_async,
)
from scaigrid.client._transport import DEFAULT_TIMEOUT_S, AsyncTransport, resolve_config
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
from scaigrid.client.shell import AsyncShell, auth_headers, shell_params, ticket_call


class AsyncBunkers:
    """Bunker lifecycle and exec; see :class:`scaigrid.client.client.Bunkers`."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def create(
        self, image: str | None = None, *, wait_s: int | None = None, **fields: Unpack[BunkerSpec]
    ) -> Bunker:
        """Create a bunker; see :meth:`scaigrid.client.client.Bunkers.create`."""
        body = {"image": image, **fields}
        return Bunker.from_dict(await self._t.data(_calls.create_bunker(body, wait_s)))

    async def get(self, bunker_id: str) -> Bunker:
        """Read one bunker; raises ``BunkerNotFound``."""
        return Bunker.from_dict(await self._t.data(_calls.get_bunker(bunker_id)))

    async def list(
        self,
        *,
        status: str | Iterable[str] | None = None,
        label: Mapping[str, str] | Iterable[str] | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[Bunker]:
        """Iterate bunkers page after page; see :meth:`scaigrid.client.client.Bunkers.list`."""
        count = 0
        async for item in self._t.pages(_calls.list_bunkers(status, label, limit)):
            yield Bunker.from_dict(item)
            count += 1
            if limit is not None and count >= limit:
                return

    async def terminate(self, bunker_id: str) -> Bunker:
        """Terminate a bunker; raises ``BunkerNotFound``."""
        return Bunker.from_dict(await self._t.data(_calls.terminate_bunker(bunker_id)))

    async def wait_running(
        self, bunker_id: str, timeout_s: float = 120.0, *, poll_interval_s: float | None = None
    ) -> Bunker:
        """Poll until ``running``; see :meth:`scaigrid.client.client.Bunkers.wait_running`.

        Raises:
            BunkerStopped, WaitTimeout, BunkerNotFound.
        """
        deadline = time.monotonic() + timeout_s
        delays = _waiting.poll_delays(poll_interval_s)
        while True:
            bunker = await self.get(bunker_id)
            if _waiting.is_running(bunker):
                return bunker
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _waiting.timed_out(bunker, timeout_s)
            await asyncio.sleep(min(next(delays), remaining))

    async def exec(
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
        """Run a command to completion; see :meth:`scaigrid.client.client.Bunkers.exec`."""
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
        return ExecResult.from_dict(await self._t.data(call))


class AsyncFiles:
    """Files inside a bunker; see :class:`scaigrid.client.client.Files`."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def write(
        self,
        bunker_id: str,
        path: str,
        data: AsyncUploadData,
        mode: int = 0o644,
        *,
        parents: bool = True,
        user: GuestUser = "user",
    ) -> WrittenFile:
        """Write a file atomically, streaming paths, file objects and (async) iterables;
        see :meth:`scaigrid.client.client.Files.write`."""
        call = _calls.write_file(bunker_id, path, mode, parents, user)
        async with upload_content_async(data) as content:
            return cast(WrittenFile, await self._t.data(call, content))

    async def read(self, bunker_id: str, path: str, *, user: GuestUser = "user") -> bytes:
        """Return a whole file's bytes; see :meth:`scaigrid.client.client.Files.read`."""
        return (await self._t.send(_calls.read_file(bunker_id, path, user))).content

    async def download(
        self, bunker_id: str, path: str, dest: DownloadTarget, *, user: GuestUser = "user"
    ) -> int:
        """Stream a file into ``dest``; see :meth:`scaigrid.client.client.Files.download`."""
        await asyncio.to_thread(target_path, dest)  # a directory fails here, before the request
        async with self._t.stream(_calls.read_file(bunker_id, path, user)) as response:
            return await save_chunks_async(response.aiter_bytes(CHUNK_BYTES), dest)

    async def upload_archive(
        self, bunker_id: str, path: str, source: AsyncUploadData, *, user: GuestUser = "user"
    ) -> ExtractedArchive:
        """Extract a tar archive (or a local directory, packed on the fly) below ``path``;
        see :meth:`scaigrid.client.client.Files.upload_archive`."""
        call = _calls.write_archive(bunker_id, path, user)
        async with archive_content_async(source) as content:
            return cast(ExtractedArchive, await self._t.data(call, content))

    async def download_archive(
        self, bunker_id: str, path: str, dest: DownloadTarget, *, user: GuestUser = "user"
    ) -> int:
        """Stream a tar of a directory into ``dest``; see
        :meth:`scaigrid.client.client.Files.download_archive`."""
        await asyncio.to_thread(target_path, dest)
        async with self._t.stream(_calls.read_archive(bunker_id, path, user)) as response:
            return await save_chunks_async(response.aiter_bytes(CHUNK_BYTES), dest)

    async def list(
        self, bunker_id: str, path: str = ".", depth: int = 1, *, user: GuestUser = "user"
    ) -> builtins.list[FileEntry]:
        """List entries below a directory; see :meth:`scaigrid.client.client.Files.list`."""
        call = _calls.list_files(bunker_id, path, depth, user)
        return [cast(FileEntry, item) async for item in self._t.pages(call)]

    async def stat(self, bunker_id: str, path: str, *, user: GuestUser = "user") -> FileEntry:
        """Describe one entry; raises ``BunkerFileNotFound``."""
        return cast(FileEntry, await self._t.data(_calls.stat_file(bunker_id, path, user)))

    async def delete(
        self, bunker_id: str, path: str, recursive: bool = False, *, user: GuestUser = "user"
    ) -> DeletedFile:
        """Delete a file or directory; see :meth:`scaigrid.client.client.Files.delete`."""
        call = _calls.delete_file(bunker_id, path, recursive, user)
        return cast(DeletedFile, await self._t.data(call))

    async def mkdir(
        self,
        bunker_id: str,
        path: str,
        *,
        parents: bool = False,
        mode: int = 0o755,
        user: GuestUser = "user",
    ) -> FileEntry:
        """Create a directory; see :meth:`scaigrid.client.client.Files.mkdir`."""
        call = _calls.make_directory(bunker_id, path, parents, mode, user)
        return cast(FileEntry, await self._t.data(call))

    async def move(
        self,
        bunker_id: str,
        src: str,
        dst: str,
        *,
        overwrite: bool = False,
        user: GuestUser = "user",
    ) -> FileEntry:
        """Move or rename an entry; see :meth:`scaigrid.client.client.Files.move`."""
        call = _calls.move_file(bunker_id, src, dst, overwrite, user)
        return cast(FileEntry, await self._t.data(call))


class AsyncImages:
    """Images; see :class:`scaigrid.client.client.Images`."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def list(
        self, *, status: str | None = None, name: str | None = None, limit: int | None = None
    ) -> AsyncIterator[Image]:
        """Iterate visible images page after page, newest first."""
        count = 0
        async for item in self._t.pages(_calls.list_images(status, name, limit)):
            yield Image.from_dict(item)
            count += 1
            if limit is not None and count >= limit:
                return

    async def get(self, image_id: str) -> Image:
        """Read one image; raises ``ImageNotFound``."""
        return Image.from_dict(await self._t.data(_calls.get_image(image_id)))

    async def register(
        self, name: str, source: Mapping[str, Any], **fields: Unpack[ImageSpec]
    ) -> Image:
        """Register an image; see :meth:`scaigrid.client.client.Images.register`."""
        body = {"name": name, "source": dict(source), **fields}
        return Image.from_dict(await self._t.data(_calls.register_image(body)))

    async def deactivate(self, image_id: str) -> Image:
        """Deactivate an image for good; raises ``ImageNotFound``."""
        return Image.from_dict(await self._t.data(_calls.deactivate_image(image_id)))


class AsyncClient:
    """Asynchronous client; same arguments as :class:`scaigrid.client.Client` except that
    ``transport`` is an :class:`httpx.AsyncBaseTransport`.

    Attributes:
        bunkers: :class:`AsyncBunkers`. files: :class:`AsyncFiles`. images:
        :class:`AsyncImages`.

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
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        base_url, key = resolve_config(host, api_key)
        self._transport = AsyncTransport(base_url, key, timeout_s, transport)
        self.bunkers = AsyncBunkers(self._transport)
        self.files = AsyncFiles(self._transport)
        self.images = AsyncImages(self._transport)
        self.processes = AsyncProcesses(self._transport)

    @property
    def base_url(self) -> str:
        """The module's base URL, ``<host>/v1/modules/scaibunker``."""
        return self._transport.base_url

    async def shell(
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
    ) -> AsyncShell:
        """Open or reattach a shell; see :meth:`scaigrid.client.Client.shell`."""
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
        return await AsyncShell(self.base_url, headers, bunker_id, params)._connect(params)

    async def shell_ticket(self, bunker_id: str) -> dict[str, Any]:
        """Mint a one-use shell ticket; see :meth:`scaigrid.client.Client.shell_ticket`."""
        value: dict[str, Any] = await self._transport.data(ticket_call(bunker_id))
        return value

    async def close(self) -> None:
        """Close the connection pool; the client cannot be used afterwards."""
        await self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class AsyncProcesses:
    """Background processes and streaming exec; see :class:`scaigrid.client.client.Processes`."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def start(
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
        """Start a command in the background; return ``(exec_id, pid)``."""
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
        data = await self._t.data(call)
        return str(data["exec_id"]), int(data["pid"])

    async def list(
        self, bunker_id: str, status: str | None = None, *, limit: int | None = None
    ) -> builtins.list[ProcessRecord]:
        """The bunker's processes, newest first."""
        records: builtins.list[ProcessRecord] = []
        async for item in self._t.pages(_calls.list_processes(bunker_id, status, limit)):
            records.append(ProcessRecord.from_dict(item))
            if limit is not None and len(records) >= limit:
                break
        return records

    async def get(self, bunker_id: str, ref: str | int) -> ProcessRecord:
        """One process record."""
        return ProcessRecord.from_dict(await self._t.data(_calls.get_process(bunker_id, ref)))

    async def output(
        self, bunker_id: str, ref: str | int, *, stream: str = "stdout", offset: int = 0
    ) -> OutputChunk:
        """Output available from ``offset``."""
        call = _calls.process_output(bunker_id, ref, stream, offset)
        return OutputChunk.from_dict(await self._t.data(call))

    async def signal(
        self, bunker_id: str, ref: str | int, signal: str | int = "SIGTERM", *, group: bool = False
    ) -> ProcessRecord:
        """Send ``signal`` to the process or its group."""
        call = _calls.signal_process(bunker_id, ref, signal, group)
        return ProcessRecord.from_dict(await self._t.data(call))

    async def write_stdin(
        self, bunker_id: str, ref: str | int, data: str | bytes, *, eof: bool = False
    ) -> int:
        """Write to a ``stdin_open`` process; return bytes written."""
        answer = await self._t.data(_calls.process_stdin(bunker_id, ref, data, eof))
        return int(answer.get("bytes_written", 0))

    async def follow(
        self, bunker_id: str, ref: str | int, *, stream: str = "stdout", offset: int = 0
    ) -> AsyncIterator[ExecEvent]:
        """Yield a process's output from ``offset`` as it is produced, then ``exit``."""
        call = _calls.follow_output(bunker_id, ref, stream, offset)
        async with self._t.stream(call) as response:
            async for event, data in _sse.aframes(response.aiter_lines()):
                parsed = ExecEvent.from_sse(event, data)
                if parsed is not None:
                    yield parsed

    async def stream(
        self,
        bunker_id: str,
        command: str | Iterable[str],
        timeout_s: int | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: str | bytes | None = None,
        user: GuestUser = "user",
    ) -> AsyncIterator[ExecEvent]:
        """Run a command and yield its :class:`ExecEvent` s as they happen (SSE)."""
        call = _calls.exec_stream(
            bunker_id, command, timeout_s=timeout_s, cwd=cwd, env=env, stdin=stdin, user=user
        )
        async with self._t.stream(call) as response:
            async for event, data in _sse.aframes(response.aiter_lines()):
                parsed = ExecEvent.from_sse(event, data)
                if parsed is not None:
                    yield parsed

"""Files relayed to the bunker's agent as flow-controlled streams (SPEC §4).

No hop holds a whole body: the upload is pumped from the HTTP request into a link stream
chunk by chunk, and the download is yielded from a link stream into the HTTP response.
Paths are resolved only by the guest agent inside the bunker (SPEC §4.3).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from scaigrid import errors
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.state import ModuleState
from scaigrid.protocol.link import LinkClosed, OutboundStream, TaskKind

CALL_TIMEOUT_S = 60.0
#: Entries a listing walks at most (pages of ``files/list`` included): deeper pages of a
#: huge tree are listed from a subdirectory.
MAX_LIST_WALK = 10_000
FIRST_BYTE_TIMEOUT_S = 60.0
WRITE_RESULT_TIMEOUT_S = 300.0
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def check_path(path: str, field: str = "path") -> str:
    """Validate a guest path at the API edge: non-empty, ≤ 4096 bytes, no NUL.

    Raises:
        errors.ValidationFailed: naming ``field``.
    """
    if not path or len(path.encode()) > 4096 or "\0" in path:
        raise errors.ValidationFailed(
            f"{field} must be 1-4096 bytes without NUL",
            details=[{"field": field, "message": "invalid path"}],
        )
    return path


def parse_mode(mode: str, field: str = "mode") -> int:
    """Parse an octal mode string such as ``"0644"``.

    Raises:
        errors.ValidationFailed: not an octal number in 0..0o7777.
    """
    try:
        value = int(mode, 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o7777:
        raise errors.ValidationFailed(
            f"{field} must be an octal mode such as 0644",
            details=[{"field": field, "message": "invalid octal mode"}],
        )
    return value


async def call(
    state: ModuleState, bunker: Bunker, kind: str, params: dict[str, Any]
) -> dict[str, Any]:
    """Run a files task without a body (list, stat, delete, mkdir, move); return its result."""
    connection = state.hub.require(bunker.worker_id)
    return await connection.call(kind, params, bunker_id=bunker.id, timeout_s=CALL_TIMEOUT_S)


async def _pump(body: AsyncIterator[bytes], stream: OutboundStream) -> None:
    async for chunk in body:
        if chunk:
            await stream.write(chunk)
    await stream.end()


async def write_file(
    state: ModuleState, bunker: Bunker, params: dict[str, Any], body: AsyncIterator[bytes]
) -> dict[str, Any]:
    """Stream ``body`` into a file; return ``{path, size, sha256, mode}``.

    If the caller's body breaks off, the task is cancelled before end-of-stream is sent, so
    the agent discards its temporary file and the destination is untouched.

    Raises:
        errors.ScaiGridError: the agent's error (``FILE_CONFLICT``, ``BUNKER_DISK_FULL``, …).
    """
    return await _upload(state, bunker, TaskKind.FILES_WRITE, params, body)


async def write_archive(
    state: ModuleState, bunker: Bunker, params: dict[str, Any], body: AsyncIterator[bytes]
) -> dict[str, Any]:
    """Stream the tar ``body`` into the agent, which extracts it below ``params["path"]``;
    return ``{path, entries, bytes}`` (members extracted, bytes of regular files).

    Extraction is streamed, not atomic (SPEC §4.3): if the body breaks off or a member is
    refused, the members extracted before stay.

    Raises:
        errors.ScaiGridError: the agent's error (``VALIDATION_ERROR`` naming an escaping or
            special member or a body that is not a tar stream, ``FILE_CONFLICT``,
            ``FILE_ACCESS_DENIED``, ``BUNKER_DISK_FULL``).
    """
    return await _upload(state, bunker, TaskKind.FILES_ARCHIVE_WRITE, params, body)


async def _upload(
    state: ModuleState,
    bunker: Bunker,
    kind: str,
    params: dict[str, Any],
    body: AsyncIterator[bytes],
) -> dict[str, Any]:
    connection = state.hub.require(bunker.worker_id)
    stream = connection.open_outbound()
    handle = await connection.start_task(
        kind, params, bunker_id=bunker.id, streams={"body": stream.stream_id}
    )
    pump = asyncio.ensure_future(_pump(body, stream))
    result = asyncio.ensure_future(handle.result(WRITE_RESULT_TIMEOUT_S))
    try:
        done, _ = await asyncio.wait({pump, result}, return_when=asyncio.FIRST_COMPLETED)
        if pump in done and pump.exception() is not None:
            stream.abandon()
            await handle.cancel()
            exc = pump.exception()
            assert exc is not None
            if isinstance(exc, LinkClosed):
                raise errors.AgentUnavailable("the worker connection was lost") from exc
            raise exc
        return await result
    finally:
        for future in (pump, result):
            if not future.done():
                future.cancel()
        stream.abandon()


@dataclass
class Download:
    """An open download: HTTP status, headers and the body iterator."""

    status_code: int
    headers: dict[str, str]
    body: AsyncIterator[bytes]


def _single_range(header: str) -> tuple[str, str] | None:
    """The ``(first, last)`` digit strings of a single ``bytes=`` range, or ``None`` for a
    header to ignore: malformed, another unit, or several ranges (RFC 9110 §14.2: a server
    may ignore ``Range`` and must ignore one it cannot parse; the reply is then the whole
    file, 200)."""
    match = _RANGE.match(header.strip())
    if not match or not (match.group(1) or match.group(2)):
        return None
    if match.group(1) and match.group(2) and int(match.group(2)) < int(match.group(1)):
        return None
    return match.group(1), match.group(2)


def _parse_range(bounds: tuple[str, str], size: int) -> tuple[int, int]:
    start_s, end_s = bounds
    if start_s:
        start = int(start_s)
        end = min(int(end_s), size - 1) if end_s else size - 1
    else:
        suffix = int(end_s)
        start, end = max(size - suffix, 0), size - 1
    if start >= size or start > end:
        raise errors.RangeNotSatisfiable(
            f"range bytes={start_s}-{end_s} is outside the file of {size} bytes"
        )
    return start, end


async def read_file(
    state: ModuleState, bunker: Bunker, params: dict[str, Any], range_header: str | None
) -> Download:
    """Open a streamed download of ``params["path"]``, honouring a single ``Range``.

    Raises:
        errors.ScaiGridError: the agent's error (``FILE_NOT_FOUND``, ``FILE_CONFLICT``, …).
        errors.RangeNotSatisfiable: 416 for a range that starts past the end of the file.
    """
    start = end = None
    bounds = _single_range(range_header) if range_header else None
    if bounds is not None:
        entry = await call(state, bunker, TaskKind.FILES_STAT, params)
        if entry.get("type") == "dir":
            raise errors.FileConflict(f"{params['path']} is a directory")
        size = int(entry.get("size", 0))
        start, end = _parse_range(bounds, size)
        params = {**params, "offset": start, "length": end - start + 1}
    progress, body = await _open_download(
        state, bunker, TaskKind.FILES_READ, params, "the worker ended the download without a size"
    )
    total = int(progress.get("size", 0))
    headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
    if start is not None and end is not None:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers["Content-Length"] = str(end - start + 1)
        return Download(206, headers, body)
    headers["Content-Length"] = str(total)
    return Download(200, headers, body)


async def _open_download(
    state: ModuleState, bunker: Bunker, kind: str, params: dict[str, Any], no_start: str
) -> tuple[dict[str, Any], AsyncIterator[bytes]]:
    """Start a worker task that streams ``body`` to the controller; return its first progress
    message (the agent accepted the request) and the body's chunks, which end with the task's
    result (a failure mid-stream raises from the iterator, so the response is broken off).

    Raises:
        errors.ScaiGridError: the task failed before it started streaming.
        errors.InternalError: the task ended without a progress message (``no_start``).
    """
    connection = state.hub.require(bunker.worker_id)
    stream = connection.open_inbound()
    handle = await connection.start_task(
        kind, params, bunker_id=bunker.id, streams={"body": stream.stream_id}
    )
    try:
        progress = await handle.next_progress(FIRST_BYTE_TIMEOUT_S)
        if progress is None:
            await handle.result(1.0)
            raise errors.InternalError(no_start)
    except BaseException:
        stream.close()
        raise

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in stream:
                yield chunk
            await handle.result(CALL_TIMEOUT_S)
        finally:
            stream.close()
            await handle.cancel()

    return progress, body()


async def read_archive(state: ModuleState, bunker: Bunker, params: dict[str, Any]) -> Download:
    """Open a streamed tar of the directory ``params["path"]`` (``application/x-tar``, no
    ``Content-Length``: the size is known only at the end).

    Errors about the directory come before the response starts; a failure mid-stream
    breaks the response off (the tar is never ended as if it were complete).

    Raises:
        errors.ScaiGridError: the agent's error (``FILE_NOT_FOUND``, ``FILE_CONFLICT`` for
            a path that is not a directory, ``FILE_ACCESS_DENIED``).
    """
    _, body = await _open_download(
        state,
        bunker,
        TaskKind.FILES_ARCHIVE_READ,
        params,
        "the worker ended the archive before it started",
    )
    return Download(200, {"Content-Type": "application/x-tar"}, body)

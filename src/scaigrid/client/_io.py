"""Streaming upload sources and download sinks for the files API (SPEC §4.3).

Uploads from a path, a file object or an iterable are sent with chunked transfer encoding
in :data:`CHUNK_BYTES` pieces; a file is only ever read with an explicit size, so memory
stays bounded whatever the file's size. Downloads to a path go to a temporary file next to
the destination that replaces it only once the whole body has arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import stat
import tarfile
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Protocol, TypeAlias, cast

CHUNK_BYTES = 256 * 1024
"""Size of one upload read and of one download write."""


class ReadableBinary(Protocol):
    """A binary file object: ``read(size)`` returns at most ``size`` bytes, ``b""`` at EOF."""

    def read(self, size: int, /) -> bytes: ...


class WritableBinary(Protocol):
    """A binary file object to download into."""

    def write(self, data: bytes, /) -> object: ...


UploadData: TypeAlias = (
    bytes | bytearray | memoryview | str | os.PathLike[str] | ReadableBinary | Iterable[bytes]
)
"""What ``files.write`` accepts: bytes, text (sent as UTF-8), a local path
(:class:`os.PathLike`, e.g. :class:`pathlib.Path`), a binary file object, or an iterable of
byte chunks."""

AsyncUploadData: TypeAlias = UploadData | AsyncIterable[bytes]
"""What the async ``files.write`` accepts: :data:`UploadData` or an async iterable of chunks."""

DownloadTarget: TypeAlias = str | os.PathLike[str] | WritableBinary
"""Where ``files.download`` writes: a local path (``str`` or path-like) or a binary file
object."""


def _as_bytes(chunk: object) -> bytes:
    if isinstance(chunk, bytes):
        return chunk
    if isinstance(chunk, bytearray | memoryview):
        return bytes(chunk)
    raise TypeError(f"upload chunks must be bytes, got {type(chunk).__name__} (text-mode file?)")


def iter_chunks(source: ReadableBinary) -> Iterator[bytes]:
    """Yield ``source`` in reads of :data:`CHUNK_BYTES` until EOF."""
    while chunk := _as_bytes(source.read(CHUNK_BYTES)):
        yield chunk


async def aiter_chunks(source: ReadableBinary) -> AsyncIterator[bytes]:
    """Yield ``source`` in reads of :data:`CHUNK_BYTES`, each read in a worker thread."""
    while chunk := _as_bytes(await asyncio.to_thread(source.read, CHUNK_BYTES)):
        yield chunk


def _checked(chunks: Iterable[object]) -> Iterator[bytes]:
    for chunk in chunks:
        if chunk_bytes := _as_bytes(chunk):
            yield chunk_bytes


async def _checked_async(chunks: AsyncIterable[object]) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        if chunk_bytes := _as_bytes(chunk):
            yield chunk_bytes


async def _sync_to_async(chunks: Iterable[object]) -> AsyncIterator[bytes]:
    for chunk in _checked(chunks):
        yield chunk


def _open_read(path: os.PathLike[str]) -> IO[bytes]:
    return open(path, "rb")


def _is_readable(data: object) -> bool:
    return callable(getattr(data, "read", None))


@contextlib.contextmanager
def upload_content(data: UploadData) -> Iterator[bytes | Iterator[bytes]]:
    """Yield the request content for ``data``: bytes as is, anything else as a chunk
    iterator. A path is opened here (so a missing file fails before any request) and
    closed on exit.

    Raises:
        TypeError: ``data`` is none of :data:`UploadData` (or a text-mode file object).
        OSError: the path cannot be opened.
    """
    if isinstance(data, str):
        yield data.encode()
    elif isinstance(data, bytes | bytearray | memoryview):
        yield bytes(data)
    elif isinstance(data, os.PathLike):
        with _open_read(data) as file:
            yield iter_chunks(file)
    elif _is_readable(data):
        yield iter_chunks(cast(ReadableBinary, data))
    elif isinstance(data, Iterable):
        yield _checked(data)
    else:
        raise TypeError(f"cannot upload a {type(data).__name__}")


@contextlib.asynccontextmanager
async def upload_content_async(
    data: AsyncUploadData,
) -> AsyncIterator[bytes | AsyncIterator[bytes]]:
    """Async twin of :func:`upload_content`; file reads happen in worker threads."""
    if isinstance(data, str):
        yield data.encode()
    elif isinstance(data, bytes | bytearray | memoryview):
        yield bytes(data)
    elif isinstance(data, os.PathLike):
        file = await asyncio.to_thread(_open_read, data)
        try:
            yield aiter_chunks(file)
        finally:
            await asyncio.to_thread(file.close)
    elif _is_readable(data):
        yield aiter_chunks(cast(ReadableBinary, data))
    elif isinstance(data, AsyncIterable):
        yield _checked_async(data)
    elif isinstance(data, Iterable):
        yield _sync_to_async(data)
    else:
        raise TypeError(f"cannot upload a {type(data).__name__}")


class DirectoryTar:
    """A tar stream (pax format) of a local directory's contents, read like a binary file.

    A thread packs the tree into a pipe as it is read, so memory stays bounded; member
    names are relative to the directory, symlinks are stored as links. If packing fails
    (an unreadable file), the read that reaches the end raises that error instead of
    returning end-of-file, so a partial tree is never uploaded as if it were complete.

    Args:
        root: the local directory.

    Raises:
        NotADirectoryError: ``root`` is not a directory.
    """

    def __init__(self, root: os.PathLike[str]) -> None:
        self._root = Path(root)
        if not self._root.is_dir():
            raise NotADirectoryError(f"{self._root} is not a directory")
        read_fd, write_fd = os.pipe()
        self._reader = os.fdopen(read_fd, "rb")
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._produce, args=(write_fd,), name="scaigrid-tar", daemon=True
        )
        self._thread.start()

    def _produce(self, write_fd: int) -> None:
        try:
            with (
                os.fdopen(write_fd, "wb") as out,
                tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar,
            ):
                for name in sorted(os.listdir(self._root)):
                    tar.add(self._root / name, arcname=name, recursive=True)
        except BaseException as exc:  # reported by read()
            self._error = exc

    def read(self, size: int = -1, /) -> bytes:
        """Up to ``size`` bytes of the tar; ``b""`` at its end.

        Raises:
            OSError: packing failed (e.g. a file could not be read).
        """
        data = self._reader.read(size)
        if not data:
            self._thread.join()
            if self._error is not None:
                raise OSError(f"packing {self._root} failed: {self._error}") from self._error
        return data

    def close(self) -> None:
        """Stop packing (if still running) and release the pipe."""
        self._reader.close()
        self._thread.join()


@contextlib.contextmanager
def archive_content(data: UploadData) -> Iterator[bytes | Iterator[bytes]]:
    """Like :func:`upload_content`, except that a path to a local directory is packed into
    a tar on the fly (:class:`DirectoryTar`)."""
    if isinstance(data, os.PathLike) and os.path.isdir(data):
        source = DirectoryTar(data)
        try:
            yield iter_chunks(source)
        finally:
            source.close()
    else:
        with upload_content(data) as content:
            yield content


@contextlib.asynccontextmanager
async def archive_content_async(
    data: AsyncUploadData,
) -> AsyncIterator[bytes | AsyncIterator[bytes]]:
    """Async twin of :func:`archive_content`."""
    if isinstance(data, os.PathLike) and await asyncio.to_thread(os.path.isdir, data):
        source = await asyncio.to_thread(DirectoryTar, data)
        try:
            yield aiter_chunks(source)
        finally:
            await asyncio.to_thread(source.close)
    else:
        async with upload_content_async(data) as content:
            yield content


def target_path(dest: DownloadTarget) -> Path | None:
    """Return ``dest`` as a :class:`Path`, or None when it is a file object.

    Raises:
        IsADirectoryError: ``dest`` names an existing directory.
    """
    if _is_writable(dest):
        return None
    path = Path(cast("str | os.PathLike[str]", dest))
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    return path


def _is_writable(dest: object) -> bool:
    return callable(getattr(dest, "write", None))


def _is_special(path: Path) -> bool:
    """True when ``path`` exists and is not a regular file (``/dev/null``, a FIFO, a tty):
    such a destination is written in place, never replaced by a renamed temporary file."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def _temp_for(path: Path) -> tuple[Path, IO[bytes]]:
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    # 0o666 so the finished file gets the usual umask-derived mode, as with open().
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    return temp, os.fdopen(fd, "wb")


def save_chunks(chunks: Iterable[bytes], dest: DownloadTarget) -> int:
    """Write ``chunks`` to ``dest`` and return the number of bytes written.

    A path (symlinks resolved) is written through a temporary sibling file that replaces it
    at the end; on any error the temporary file is removed and an existing ``dest`` is left
    untouched. An existing destination that is not a regular file (``/dev/null``, a FIFO) is
    written in place.
    """
    path = target_path(dest)
    if path is None:
        return _write_all(chunks, cast(WritableBinary, dest).write)
    path = path.resolve()
    if _is_special(path):
        with open(path, "wb") as special:
            return _write_all(chunks, special.write)
    temp, file = _temp_for(path)
    try:
        with file:
            total = _write_all(chunks, file.write)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return total


def _write_all(chunks: Iterable[bytes], write: Callable[[bytes], object]) -> int:
    total = 0
    for chunk in chunks:
        write(chunk)
        total += len(chunk)
    return total


async def _awrite_all(chunks: AsyncIterable[bytes], write: Callable[[bytes], object]) -> int:
    total = 0
    async for chunk in chunks:
        await asyncio.to_thread(write, chunk)
        total += len(chunk)
    return total


async def save_chunks_async(chunks: AsyncIterable[bytes], dest: DownloadTarget) -> int:
    """Async twin of :func:`save_chunks`; file writes happen in worker threads."""
    path = await asyncio.to_thread(target_path, dest)
    if path is None:
        return await _awrite_all(chunks, cast(WritableBinary, dest).write)
    path = await asyncio.to_thread(path.resolve)
    if await asyncio.to_thread(_is_special, path):
        special = await asyncio.to_thread(open, path, "wb")
        try:
            return await _awrite_all(chunks, special.write)
        finally:
            await asyncio.to_thread(special.close)
    temp, file = await asyncio.to_thread(_temp_for, path)
    try:
        try:
            total = await _awrite_all(chunks, file.write)
        finally:
            await asyncio.to_thread(file.close)
        await asyncio.to_thread(os.replace, temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return total

"""Waiting on the event loop until a non-blocking file descriptor is ready (pipes, PTYs)."""

from __future__ import annotations

import asyncio


async def _wait_fd(fd: int, *, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if writable:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def wait_readable(fd: int) -> None:
    """Return once ``fd`` can be read without blocking (data, end of file or an error).

    Raises:
        RuntimeError: another waiter already watches ``fd`` for reading on this loop.
    """
    await _wait_fd(fd, writable=False)


async def wait_writable(fd: int) -> None:
    """Return once ``fd`` can be written without blocking (room in the pipe, or an error).

    Raises:
        RuntimeError: another waiter already watches ``fd`` for writing on this loop.
    """
    await _wait_fd(fd, writable=True)

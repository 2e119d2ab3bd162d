"""A one-thread executor whose thread lives in a named network namespace.

``setns(CLONE_NEWNET)`` changes the namespace of the calling thread only, so sockets opened
and netlink/nftables calls made on that thread act inside the namespace while the rest of the
worker stays in its own.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from pyroute2 import netns

P = ParamSpec("P")
T = TypeVar("T")


class NetnsExecutor:
    """Run callables on one thread that has joined the network namespace ``name``.

    Args:
        name: a namespace under ``/run/netns`` that must already exist.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"netns-{name}", initializer=self._enter
        )

    def _enter(self) -> None:
        netns.setns(self.name, flags=0)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` inside the namespace and return its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        """Stop the thread (pending calls still finish)."""
        self._pool.shutdown(wait=True)

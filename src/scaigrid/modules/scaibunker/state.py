"""Per-app runtime state of the scaibunker module (hub, background tasks, waiters)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

import structlog
from starlette.requests import HTTPConnection

from scaigrid.modules.scaibunker.config import ModuleConfig
from scaigrid.modules.scaibunker.storage.service import StorageService
from scaigrid.modules.scaibunker.workers.hub import WorkerHub
from scaigrid.platform.db import Database
from scaigrid.settings import Settings

log = structlog.get_logger(__name__)

#: Entries in the running-bunker cache before expired ones are swept.
_RUNNING_CACHE_MAX = 4096


class ModuleState:
    """Everything the module's services share inside one controller process.

    Attributes:
        db: the platform database.
        settings: controller settings.
        hub: live worker connections.
        config: effective module configuration.
        placement_lock: serialises placement so concurrent creates cannot overfill a worker.
        provisioning: ids of bunkers whose boot this process is following (the reaper's
            provisioning-timeout sweep leaves them to it).
        destroying: ``(worker_id, bunker_id)`` of bunkers a heartbeat listed that this process
            is having the worker destroy (one destroy at a time each).
        storage: the object store and capability secrets (set by the module's startup).
        storage_url: base URL workers reach the storage proxy at (snapshot tasks).
    """

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.hub = WorkerHub()
        self.config = ModuleConfig(usage_interval_s=settings.usage_interval_s)
        self.placement_lock = asyncio.Lock()
        self.provisioning: set[str] = set()
        self.destroying: set[tuple[str, str]] = set()
        self.storage: StorageService | None = None
        self.storage_url = settings.public_url
        self._tasks: set[asyncio.Task[Any]] = set()
        self._bunker_waiters: dict[str, asyncio.Event] = {}
        #: Bunkers last read ``running``: ``bunker_id -> (monotonic expiry, bunker row)``.
        self._running: dict[str, tuple[float, Any]] = {}
        #: Counts :meth:`bunker_changed` calls; a read that raced one is not cached.
        self.change_epoch = 0

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """Run ``coro`` in the background, logging (not losing) any exception it raises."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background_task_failed", task=task.get_name(), exc_info=task.exception())

    def cached_running(self, bunker_id: str) -> Any | None:
        """The bunker row :meth:`cache_running` kept for ``bunker_id`` if it has not
        expired and no state change happened since, else None."""
        entry = self._running.get(bunker_id)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._running[bunker_id]
            return None
        return entry[1]

    def cache_running(self, bunker: Any, epoch: int, ttl_s: float) -> None:
        """Keep ``bunker`` (a detached ``running`` row) for ``ttl_s`` seconds, unless a state
        change happened after ``epoch`` (:attr:`change_epoch` read before the row was).

        Every status change goes through :meth:`bunker_changed`, which drops the entry, so
        the cache only spares exec, files and shell calls the row read; a change made by
        another controller process is seen after ``ttl_s`` at the latest.
        """
        if epoch != self.change_epoch:
            return
        now = time.monotonic()
        if len(self._running) >= _RUNNING_CACHE_MAX:
            self._running = {k: v for k, v in self._running.items() if v[0] > now}
        self._running[bunker.id] = (now + ttl_s, bunker)

    def bunker_changed(self, bunker_id: str) -> None:
        """Wake every request waiting (``wait_s``) on a state change of ``bunker_id`` and
        forget its cached row."""
        self.change_epoch += 1
        self._running.pop(bunker_id, None)
        event = self._bunker_waiters.pop(bunker_id, None)
        if event is not None:
            event.set()

    async def wait_bunker_change(self, bunker_id: str, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` seconds for the next state change of ``bunker_id``."""
        event = self._bunker_waiters.setdefault(bunker_id, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            return

    async def close(self) -> None:
        """Cancel background tasks and close worker connections."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.hub.close()


def module_state(conn: HTTPConnection) -> ModuleState:
    """The module state of the app serving ``conn``."""
    state: ModuleState = conn.app.state.scaibunker
    return state


async def get_state(conn: HTTPConnection) -> ModuleState:
    """FastAPI dependency: :func:`module_state`. A coroutine so that FastAPI calls it on the
    event loop (a plain function dependency runs on its thread pool: one thread hand-off per
    request)."""
    return module_state(conn)

"""Per-app runtime state of the scaibunker module (hub, background tasks, waiters)."""

from __future__ import annotations

import asyncio
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

    def bunker_changed(self, bunker_id: str) -> None:
        """Wake every request waiting (``wait_s``) on a state change of ``bunker_id``."""
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

"""The scaibunker module as the platform loads it: its router and start/stop hooks."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import APIRouter, FastAPI

from scaigrid.modules.scaibunker import lifecycle
from scaigrid.modules.scaibunker.bunkers.process_router import router as processes_router
from scaigrid.modules.scaibunker.bunkers.router import router as bunkers_router
from scaigrid.modules.scaibunker.dev import DevWorker, seed_default_image
from scaigrid.modules.scaibunker.images.router import router as images_router
from scaigrid.modules.scaibunker.quotas.router import router as quotas_router
from scaigrid.modules.scaibunker.state import ModuleState
from scaigrid.modules.scaibunker.workers.router import router as workers_router
from scaigrid.settings import Settings


@dataclass
class ScaiBunkerModule:
    """Module descriptor: ``router`` is mounted at ``/v1/modules/scaibunker``."""

    name: str = "scaibunker"
    router: APIRouter = field(default_factory=APIRouter)

    def __post_init__(self) -> None:
        for sub in (
            workers_router,
            bunkers_router,
            processes_router,
            images_router,
            quotas_router,
        ):
            self.router.include_router(sub)

    async def startup(self, app: FastAPI) -> None:
        """Create the module state; in dev mode seed the default image and start a worker."""
        settings: Settings = app.state.settings
        state = ModuleState(app.state.db, settings)
        app.state.scaibunker = state
        lifecycle.start(state)
        if settings.dev_worker:
            await seed_default_image(state)
            worker = DevWorker(state, settings.public_url, settings.data_dir / "worker")
            app.state.scaibunker_dev_worker = worker
            await worker.start()

    async def shutdown(self, app: FastAPI) -> None:
        """Stop the dev worker (if any), background tasks and worker channels."""
        worker: DevWorker | None = getattr(app.state, "scaibunker_dev_worker", None)
        if worker is not None:
            await worker.stop()
        state: ModuleState | None = getattr(app.state, "scaibunker", None)
        if state is not None:
            await state.close()


MODULE = ScaiBunkerModule()

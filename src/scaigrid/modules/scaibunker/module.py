"""The scaibunker module as the platform loads it: its router and start/stop hooks."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import APIRouter, FastAPI

from scaigrid.modules.scaibunker import lifecycle
from scaigrid.modules.scaibunker.bunkers import service as bunker_service
from scaigrid.modules.scaibunker.bunkers.process_router import router as processes_router
from scaigrid.modules.scaibunker.bunkers.router import router as bunkers_router
from scaigrid.modules.scaibunker.bunkers.shell_router import router as shell_router
from scaigrid.modules.scaibunker.dev import DevWorker, seed_default_image
from scaigrid.modules.scaibunker.images.router import router as images_router
from scaigrid.modules.scaibunker.images.service import rescan_loop, seed_builtin_images
from scaigrid.modules.scaibunker.module_config import ScaiBunkerConfig
from scaigrid.modules.scaibunker.network.bridges import router as bridges_router
from scaigrid.modules.scaibunker.network.router import router as network_router
from scaigrid.modules.scaibunker.quotas.router import router as quotas_router
from scaigrid.modules.scaibunker.snapshots.router import router as snapshots_router
from scaigrid.modules.scaibunker.state import ModuleState
from scaigrid.modules.scaibunker.storage.capability_router import router as capability_router
from scaigrid.modules.scaibunker.storage.router import router as storage_router
from scaigrid.modules.scaibunker.storage.service import StorageService, open_storage
from scaigrid.modules.scaibunker.storage.settings import StorageSettings
from scaigrid.modules.scaibunker.workers.router import router as workers_router
from scaigrid.settings import Settings


@dataclass
class ScaiBunkerModule:
    """Module descriptor: ``router`` is mounted at ``/v1/modules/scaibunker``; in
    ``bunker_proxy`` mode ``proxy_router`` (the storage object routes only) instead."""

    name: str = "scaibunker"
    router: APIRouter = field(default_factory=APIRouter)
    proxy_router: APIRouter = field(default_factory=APIRouter)
    config_model: type[ScaiBunkerConfig] = ScaiBunkerConfig

    def __post_init__(self) -> None:
        for sub in (
            bunkers_router,
            processes_router,
            workers_router,
            shell_router,
            images_router,
            network_router,
            bridges_router,
            quotas_router,
            storage_router,
            capability_router,
            snapshots_router,
        ):
            self.router.include_router(sub)
        self.proxy_router.include_router(storage_router)

    async def startup(self, app: FastAPI) -> None:
        """Open the object store; in ``full`` mode also create the module state, and in dev
        mode seed the default image and start a worker."""
        settings: Settings = app.state.settings
        app.state.scaibunker_storage = await open_storage(
            StorageSettings(), settings.data_dir, proxy=settings.mode == "bunker_proxy"
        )
        if settings.mode == "bunker_proxy":
            return
        state = ModuleState(app.state.db, settings)
        state.storage = app.state.scaibunker_storage
        state.storage_url = StorageSettings().storage_proxy_url or settings.public_url
        app.state.scaibunker = state
        lifecycle.start(state)
        await seed_builtin_images(state)
        state.spawn(rescan_loop(state), name="image-rescan")
        if settings.dev_worker:
            await seed_default_image(state)
            # Its egress audit batches go through the storage proxy like any worker's.
            worker = DevWorker(state, settings.public_url, settings.data_dir / "worker")
            app.state.scaibunker_dev_worker = worker
            await worker.start()

    async def on_disable(self, app: FastAPI, tenant_id: str) -> None:
        """The module was disabled for ``tenant_id``: end its non-terminal bunkers with
        reason ``module_disabled`` (SPEC §1.10; images and records are kept)."""
        state: ModuleState | None = getattr(app.state, "scaibunker", None)
        if state is not None:
            await bunker_service.end_tenant_bunkers(state, tenant_id, "module_disabled")

    async def shutdown(self, app: FastAPI) -> None:
        """Stop the dev worker (if any), background tasks and worker channels."""
        worker: DevWorker | None = getattr(app.state, "scaibunker_dev_worker", None)
        if worker is not None:
            await worker.stop()
        state: ModuleState | None = getattr(app.state, "scaibunker", None)
        if state is not None:
            await state.close()
        storage: StorageService | None = getattr(app.state, "scaibunker_storage", None)
        if storage is not None:
            await storage.close()


MODULE = ScaiBunkerModule()

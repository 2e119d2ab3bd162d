"""The embedded default: one local worker started as a child of the controller.

``scaigrid serve --dev`` mints a join token, seeds the default ``debian-12`` image (a Debian
12 minbase root with python3, built by debootstrap on the worker) and starts
``scaibunker-worker`` as a child process that dials back over loopback. The worker keeps its
credential in its data directory, so later starts reconnect without a new token.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path

import structlog
from sqlalchemy import select

from scaigrid.ids import new_id
from scaigrid.modules.scaibunker.images.models import Image
from scaigrid.modules.scaibunker.state import ModuleState
from scaigrid.modules.scaibunker.workers import service as worker_service
from scaigrid.platform.db import utcnow

log = structlog.get_logger(__name__)

DEFAULT_IMAGE = "debian-12"
DEFAULT_IMAGE_SOURCE = {
    "kind": "debootstrap",
    "suite": "bookworm",
    "variant": "minbase",
    "packages": ["python3"],
}
STOP_TIMEOUT_S = 15.0


async def seed_default_image(state: ModuleState) -> None:
    """Register the platform image ``debian-12`` unless an image of that name exists."""
    async with state.db.sessionmaker() as session:
        existing = (
            await session.scalars(
                select(Image.id).where(
                    Image.name == DEFAULT_IMAGE,
                    Image.scope == "platform",
                    Image.status != "deactivated",
                )
            )
        ).first()
        if existing is not None:
            return
        session.add(
            Image(
                id=new_id("img"),
                name=DEFAULT_IMAGE,
                scope="platform",
                source=DEFAULT_IMAGE_SOURCE,
                size_mib=2048,
                lazy_pull=False,
                status="pending",
                created_at=utcnow(),
            )
        )
        await session.commit()
    log.info("default_image_seeded", name=DEFAULT_IMAGE)


class DevWorker:
    """A ``scaibunker-worker`` child process for the embedded default.

    Args:
        state: module state (for the database).
        controller_url: URL the worker dials, e.g. ``http://127.0.0.1:8080``.
        data_dir: the worker's data directory (credential, image cache, bunkers).
        audit_dir: the controller's local object store root; the worker writes its egress
            audit batches there (``SCAIBUNKER_AUDIT_DIR``) so the audit route can read them.
    """

    def __init__(
        self,
        state: ModuleState,
        controller_url: str,
        data_dir: Path,
        *,
        audit_dir: Path | None = None,
    ) -> None:
        self._state = state
        self._url = controller_url
        self._data_dir = data_dir
        self._audit_dir = audit_dir
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Mint a join token (unless the worker already has a credential) and start it.

        The worker's data directory sits inside the controller's, whose mode becomes 0711:
        bunkers run under unprivileged host ids that must traverse (never list) it to reach
        their root filesystems. Everything the controller keeps there has its own 0600 mode.
        """
        self._data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._data_dir.parent.chmod(0o711)
        env = dict(os.environ)
        if self._audit_dir is not None:
            env.setdefault("SCAIBUNKER_AUDIT_DIR", str(self._audit_dir))
        if not (self._data_dir / "credential").exists():
            async with self._state.db.sessionmaker() as session:
                _, token = await worker_service.mint_join_token(
                    session,
                    tenant_id=None,
                    labels={"dev": "true"},
                    expires_in_s=600,
                    created_by=None,
                )
            env["SCAIBUNKER_JOIN_TOKEN"] = token
        log_path = self._data_dir / "worker.log"
        with log_path.open("ab") as log_file:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "scaigrid.worker.main",
                "--controller",
                self._url,
                "--data-dir",
                str(self._data_dir),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
            )
        log.info("dev_worker_started", pid=self._process.pid, log=str(log_path))

    async def stop(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL after a grace period)."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

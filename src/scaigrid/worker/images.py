"""The worker's view of its image cache: preparation on demand and the state it reports.

Wraps :class:`scaigrid.worker.rootfs.ImageCache` (which builds each image once, even for
concurrent callers) and keeps, per image id, the state reported in ``register`` and
``heartbeat`` ``image_cache`` entries (SPEC §10.4):

``[{"image_id": "img_…", "digest": null, "state": "baking" | "ready" | "failed"}]``

``digest`` is always ``null``: the container driver uses the unpacked tree directly and no
ext4 file (whose digest SPEC §7.1 names) is produced on this worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog

from scaigrid.worker.rootfs import ImageBuildError, ImageCache
from scaigrid.worker.rootfs.mounts import overlays_using
from scaigrid.worker.scan import ScanResult, scan_tree

log = structlog.get_logger(__name__)


class ImageState(StrEnum):
    """State of one image on this worker."""

    BAKING = "baking"
    READY = "ready"
    FAILED = "failed"


class ImagePrepareFailed(Exception):
    """An image could not be prepared; the message is safe to show to the image's owner."""


class ImageNotCached(Exception):
    """The image is not (completely) in this worker's cache."""


class ImageInUse(Exception):
    """The image cannot be evicted: bunkers on this worker run on it."""


class ImageStore:
    """Image preparation with one build per image id at a time.

    Args:
        cache: the rootfs cache that builds and stores the trees.
    """

    def __init__(self, cache: ImageCache) -> None:
        self._cache = cache
        self._states: dict[str, ImageState] = {}
        self._builds: dict[str, asyncio.Task[Path]] = {}
        for image_id in cache.cached():
            self._states[image_id] = ImageState.READY

    def report(self) -> list[dict[str, Any]]:
        """``image_cache`` entries ``[{image_id, digest: None, state}]``, sorted by id."""
        return [
            {"image_id": image_id, "digest": None, "state": str(state)}
            for image_id, state in sorted(self._states.items())
        ]

    async def ensure(self, image_id: str, source: Mapping[str, Any]) -> Path:
        """Return the root tree of ``image_id``, building it from ``source`` if needed.

        Concurrent callers for one image share one build; a caller that is cancelled does
        not cancel the build for the others.

        Args:
            image_id: ``img_…`` id.
            source: ``{"kind": "tar", "path"}`` or ``{"kind": "debootstrap", "suite",
                "variant", "packages"}`` (SPEC §7.2).

        Raises:
            ImagePrepareFailed: the build failed (the reason is in the message).
        """
        build = self._builds.get(image_id)
        if build is None:
            build = asyncio.create_task(
                self._build(image_id, dict(source)), name=f"image:{image_id}"
            )
            self._builds[image_id] = build
            build.add_done_callback(lambda _t: self._builds.pop(image_id, None))
        return await asyncio.shield(build)

    def source_digest(self, image_id: str) -> str | None:
        """The pinned manifest digest of a built OCI image (``None`` for other sources)."""
        digest = self._cache.metadata(image_id).get("source_digest")
        return digest if isinstance(digest, str) else None

    async def scan(self, image_id: str) -> ScanResult:
        """Scan the cached tree of ``image_id`` (SPEC §7.7).

        Raises:
            ImageNotCached: the image is not ready on this worker.
        """
        if self._states.get(image_id) != ImageState.READY:
            raise ImageNotCached(f"image {image_id} is not ready on this worker")
        return await scan_tree(self._cache.path_for(image_id))

    async def evict(self, image_id: str) -> bool:
        """Delete the cached tree of ``image_id``; ``False`` when it was not cached.

        Raises:
            ImageInUse: a bunker's overlay root still uses the tree.
        """
        path = self._cache.path_for(image_id)
        users = overlays_using(path)
        if users:
            raise ImageInUse(f"image {image_id} is used by {len(users)} bunker root(s)")
        if image_id in self._builds:
            raise ImageInUse(f"image {image_id} is being built")
        present = image_id in self._states
        await self._cache.evict(image_id)
        self._states.pop(image_id, None)
        return present

    async def _build(self, image_id: str, source: dict[str, Any]) -> Path:
        if self._states.get(image_id) != ImageState.READY:
            self._states[image_id] = ImageState.BAKING
        try:
            path = await self._cache.ensure(image_id, source)
        except ImageBuildError as exc:
            self._states[image_id] = ImageState.FAILED
            log.warning("image_prepare_failed", image_id=image_id, reason=str(exc))
            raise ImagePrepareFailed(str(exc)) from exc
        except Exception as exc:
            self._states[image_id] = ImageState.FAILED
            log.error("image_prepare_crashed", image_id=image_id, exc_info=exc)
            raise ImagePrepareFailed("internal error while building the image") from exc
        self._states[image_id] = ImageState.READY
        return path

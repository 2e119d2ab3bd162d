"""The worker's view of its image cache: preparation on demand and the state it reports.

Wraps :class:`scaigrid.worker.rootfs.ImageCache` (which builds each image once, even for
concurrent callers) and keeps, per image id, the state reported in ``register`` and
``heartbeat`` ``image_cache`` entries (SPEC §10.4):

``[{"image_id": "img_…", "digest": "sha256:…" | null, "state": "baking" | "ready" | "failed"}]``

Baked artifacts (SPEC §7.4 step 5, §11.1): a bake task may carry ``artifact`` ``{key,
digest?, source_digest?}`` (plus optionally a grant ``{capability, expires_at,
storage_url}``). The image's tree is then shared through the object store as one
content-checked ``tar.zst`` (the snapshot layer format of :mod:`scaigrid.worker.snapshots`:
owners unshifted, so any id base restores it):

* a worker missing the image first looks for the artifact (``GET`` through the storage proxy,
  checked against ``digest`` when the controller knows it) and unpacks it instead of
  pulling, unpacking or running debootstrap (``bake_source: "artifact"`` in ``image.json``,
  log event ``image.artifact_fetched``);
* a worker that had to build the tree archives it and uploads it with ``If-None-Match: *``:
  when two workers bake at once the first upload wins, the other keeps its own tree and
  logs ``image.artifact_exists``; the store holds one artifact.

Cache size: with ``max_cache_bytes`` set, every finished build evicts cached images, least
recently used first (last :meth:`ImageStore.ensure`; the ``image.json`` mtime), until the
cache fits again. Never evicted: the image just built, images being built or uploaded, and
images a bunker's root still uses. If what remains does not fit, the cache stays over the
limit (logged as ``image.cache_over_limit``) — except for a warm-up (``image.bake`` with
``warm: true``), which then drops the image again and answers that the worker is short of
cache space (the controller records the worker as ``skipped``, SPEC §7.6).

``digest`` in reports is ``sha256:`` of that artifact once this worker uploaded or fetched
it, else ``null``. Artifact trouble (store unreachable, refused, corrupt) never fails a bake:
the worker builds from the source and says why in the log; a failed upload is retried by a
later use of the image, at most every :data:`PUBLISH_RETRY_S` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable

import structlog

from scaigrid.errors import ScaiGridError
from scaigrid.worker.capabilities import CapabilityBroker
from scaigrid.worker.link.tasks import TaskFailed
from scaigrid.worker.objects import ObjectClient, ObjectExistsError
from scaigrid.worker.rootfs import ImageBuildError, ImageCache
from scaigrid.worker.rootfs.mounts import overlays_using, remove_tree
from scaigrid.worker.scan import ScanResult, scan_tree
from scaigrid.worker.snapshots import archive_layer, file_sha256, restore_layer
from scaigrid.worker.vm.disks import bake_base_disk, tree_bytes

log = structlog.get_logger(__name__)


ARTIFACT_PURPOSE: Final = "image_artifact"
#: After a failed artifact upload, later uses of the image retry it at most this often (s).
PUBLISH_RETRY_S: Final = 600.0
#: Largest uncompressed tree accepted from an artifact (SPEC §7.1 ``size_mib`` ceiling).
MAX_ARTIFACT_TREE_BYTES: Final = 65536 << 20


def artifact_key(image_id: str) -> str:
    """``scaibunker/images/{image_id}/rootfs.tar.zst``: the baked tree of a container image."""
    return f"scaibunker/images/{image_id}/rootfs.tar.zst"


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
        broker: storage capabilities for baked artifacts; ``None`` disables artifacts.
    """

    def __init__(
        self,
        cache: ImageCache,
        *,
        broker: CapabilityBroker | None = None,
        max_cache_bytes: int | None = None,
    ) -> None:
        self._cache = cache
        self.broker = broker
        self.max_cache_bytes = max_cache_bytes
        self._states: dict[str, ImageState] = {}
        self._builds: dict[str, asyncio.Task[Path]] = {}
        self._publishing: dict[str, asyncio.Task[None]] = {}
        self._publish_failed_at: dict[str, float] = {}
        for image_id in cache.cached():
            self._states[image_id] = ImageState.READY

    def report(self) -> list[dict[str, Any]]:
        """``image_cache`` entries ``[{image_id, digest, state}]``, sorted by id."""
        return [
            {"image_id": image_id, "digest": self.digest(image_id), "state": str(state)}
            for image_id, state in sorted(self._states.items())
        ]

    def digest(self, image_id: str) -> str | None:
        """``sha256:<hex>`` of the image's artifact as stored, when this worker knows it."""
        if self._states.get(image_id) != ImageState.READY:
            return None
        try:
            value = self._cache.metadata(image_id).get("artifact_sha256")
        except (FileNotFoundError, ValueError, ImageBuildError):
            return None
        return f"sha256:{value}" if isinstance(value, str) else None

    def bake_source(self, image_id: str) -> str | None:
        """``"artifact"`` or ``"baked"``: how the cached tree of ``image_id`` came to be."""
        try:
            value = self._cache.metadata(image_id).get("bake_source")
        except (FileNotFoundError, ValueError, ImageBuildError):
            return None
        return value if isinstance(value, str) else None

    async def ensure(
        self,
        image_id: str,
        source: Mapping[str, Any],
        artifact: Mapping[str, Any] | None = None,
    ) -> Path:
        """Return the root tree of ``image_id``, building it from ``source`` if needed.

        Concurrent callers for one image share one build; a caller that is cancelled does
        not cancel the build for the others.

        Args:
            image_id: ``img_…`` id.
            source: ``{"kind": "tar", "path"}`` or ``{"kind": "debootstrap", "suite",
                "variant", "packages"}`` (SPEC §7.2).
            artifact: ``{key, digest?, source_digest?, capability?, expires_at?,
                storage_url?}`` to fetch the baked tree from (and publish it to) the object
                store; ``None`` builds locally only.

        Raises:
            ImagePrepareFailed: the build failed (the reason is in the message).
        """
        build = self._builds.get(image_id)
        if build is None:
            build = asyncio.create_task(
                self._build(image_id, dict(source), dict(artifact) if artifact else None),
                name=f"image:{image_id}",
            )
            self._builds[image_id] = build
            build.add_done_callback(lambda _t: self._builds.pop(image_id, None))
        path = await asyncio.shield(build)
        await asyncio.to_thread(_touch, path.parent / "image.json")
        return path

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
        if image_id in self._builds or image_id in self._publishing:
            raise ImageInUse(f"image {image_id} is being built or uploaded")
        present = image_id in self._states
        await self._cache.evict(image_id)
        self._states.pop(image_id, None)
        return present

    async def _build(
        self, image_id: str, source: dict[str, Any], artifact: dict[str, Any] | None
    ) -> Path:
        if self._states.get(image_id) != ImageState.READY:
            self._states[image_id] = ImageState.BAKING
        use_store = artifact is not None and self.broker is not None
        if use_store:
            assert self.broker is not None and artifact is not None
            self.broker.offer(ARTIFACT_PURPOSE, image_id, artifact)
        try:
            fetch = (
                (lambda tree: self._fetch(image_id, artifact, tree))
                if use_store and artifact is not None
                else None
            )
            path = await self._cache.ensure(image_id, source, fetch=fetch)
        except ImageBuildError as exc:
            self._states[image_id] = ImageState.FAILED
            log.warning("image_prepare_failed", image_id=image_id, reason=str(exc))
            raise ImagePrepareFailed(str(exc)) from exc
        except Exception as exc:
            self._states[image_id] = ImageState.FAILED
            log.error("image_prepare_crashed", image_id=image_id, exc_info=exc)
            raise ImagePrepareFailed("internal error while building the image") from exc
        self._states[image_id] = ImageState.READY
        await self._enforce_limit(keep=image_id)
        failed_at = self._publish_failed_at.get(image_id)
        if (
            use_store
            and artifact is not None
            and image_id not in self._publishing
            and (failed_at is None or time.monotonic() - failed_at >= PUBLISH_RETRY_S)
        ):
            # In the background: a bunker waiting for this image boots at once; image.bake
            # waits for it with :meth:`published`.
            task = asyncio.create_task(
                self._publish(image_id, artifact, path), name=f"image-publish:{image_id}"
            )
            self._publishing[image_id] = task
            task.add_done_callback(lambda _t: self._publishing.pop(image_id, None))
        return path

    async def published(self, image_id: str) -> None:
        """Wait until a running upload of ``image_id``'s artifact ended (at once if none)."""
        task = self._publishing.get(image_id)
        if task is not None:
            await asyncio.shield(task)

    async def cache_bytes(self) -> int:
        """Bytes of every cached tree (see :meth:`tree_bytes`)."""
        total = 0
        for image_id in self._cache.cached():
            with contextlib.suppress(FileNotFoundError, ValueError):
                total += await self.tree_bytes(image_id)
        return total

    async def fits(self) -> bool:
        """True when the cache is within ``max_cache_bytes`` (always without a limit)."""
        return self.max_cache_bytes is None or await self.cache_bytes() <= self.max_cache_bytes

    async def tree_bytes(self, image_id: str) -> int:
        """Apparent size of the cached tree of ``image_id`` in bytes (kept in ``image.json``).

        Raises:
            FileNotFoundError: the image is not cached.
        """
        meta = self._cache.metadata(image_id)
        known = meta.get("tree_bytes")
        if isinstance(known, int):
            return known
        size = await asyncio.to_thread(tree_bytes, self._cache.path_for(image_id))
        await asyncio.to_thread(self._cache.update_metadata, image_id, tree_bytes=size)
        return size

    async def _enforce_limit(self, *, keep: str) -> list[str]:
        """Evict least recently used images until the cache fits ``max_cache_bytes``;
        return the evicted ids."""
        if self.max_cache_bytes is None:
            return []
        entries: list[tuple[int, str, int]] = []
        for image_id in self._cache.cached():
            try:
                size = await self.tree_bytes(image_id)
                used = (self._cache.path_for(image_id).parent / "image.json").stat().st_mtime_ns
            except (FileNotFoundError, ValueError):
                continue
            entries.append((used, image_id, size))
        total = sum(size for _, _, size in entries)
        evicted: list[str] = []
        for _, image_id, size in sorted(entries):
            if total <= self.max_cache_bytes:
                break
            if image_id == keep or image_id in self._builds or image_id in self._publishing:
                continue
            try:
                await self.evict(image_id)
            except ImageInUse:
                continue
            total -= size
            evicted.append(image_id)
            log.info("image.cache_evicted", image_id=image_id, tree_bytes=size)
        if total > self.max_cache_bytes:
            log.warning(
                "image.cache_over_limit", cache_bytes=total, limit_bytes=self.max_cache_bytes
            )
        return evicted

    def _key(self, image_id: str, artifact: Mapping[str, Any]) -> str:
        key = artifact.get("key")
        return key if isinstance(key, str) and key else artifact_key(image_id)

    async def _fetch(
        self, image_id: str, artifact: Mapping[str, Any], tree: Path
    ) -> dict[str, Any] | None:
        """Fill the empty ``tree`` from the stored artifact; ``None`` when there is none
        usable (then the caller builds from the source)."""
        assert self.broker is not None
        key = self._key(image_id, artifact)
        expected = artifact.get("digest")
        archive = tree.parent / f"artifact-{secrets.token_hex(4)}.tar.zst"
        try:
            grant = await self.broker.get(ARTIFACT_PURPOSE, image_id)
            client = ObjectClient(grant.storage_url)
            refresh = self.broker.refresher(ARTIFACT_PURPOSE, image_id)
            await client.download(key, grant.token, archive, refresh=refresh)
        except TaskFailed as exc:
            level = log.info if exc.code == "OBJECT_NOT_FOUND" else log.warning
            level(
                "image.artifact_unavailable", image_id=image_id, code=exc.code, reason=exc.message
            )
            return None
        try:
            # restore_layer checks the archive against ``sha`` before unpacking anything.
            if isinstance(expected, str) and expected.startswith("sha256:"):
                sha = expected.removeprefix("sha256:")
            else:
                sha = await asyncio.to_thread(file_sha256, archive)
            tree_bytes = await asyncio.to_thread(
                restore_layer, archive, tree, self._cache.id_base, sha, MAX_ARTIFACT_TREE_BYTES
            )
        except (ScaiGridError, OSError) as exc:
            log.warning("image.artifact_unusable", image_id=image_id, reason=str(exc))
            await asyncio.to_thread(_empty_dir, tree)
            return None
        finally:
            with contextlib.suppress(FileNotFoundError):
                archive.unlink()
        log.info("image.artifact_fetched", image_id=image_id, key=key, tree_bytes=tree_bytes)
        source_digest = artifact.get("source_digest")
        return {
            "artifact_sha256": sha,
            "source_digest": source_digest if isinstance(source_digest, str) else None,
            "entries": None,
        }

    async def _publish(self, image_id: str, artifact: Mapping[str, Any], tree: Path) -> None:
        """Upload the tree of a locally built image as its artifact, unless one is known."""
        assert self.broker is not None
        meta = self._cache.metadata(image_id)
        if meta.get("artifact_sha256") or meta.get("artifact") == "exists":
            return
        key = self._key(image_id, artifact)
        archive = tree.parent.parent / f".artifact-{image_id}-{secrets.token_hex(4)}.tar.zst"
        try:
            stats = await asyncio.to_thread(_archive_tree, tree, archive, self._cache.id_base)
            grant = await self.broker.get(ARTIFACT_PURPOSE, image_id)
            await ObjectClient(grant.storage_url).upload(
                archive,
                key,
                grant.token,
                stats.sha256,
                if_absent=True,
                refresh=self.broker.refresher(ARTIFACT_PURPOSE, image_id),
            )
        except ObjectExistsError:
            log.info("image.artifact_exists", image_id=image_id, key=key)
            await asyncio.to_thread(self._cache.update_metadata, image_id, artifact="exists")
            return
        except (TaskFailed, OSError) as exc:
            reason = exc.message if isinstance(exc, TaskFailed) else str(exc)
            log.warning("image.artifact_upload_failed", image_id=image_id, reason=reason)
            self._publish_failed_at[image_id] = time.monotonic()
            return
        finally:
            with contextlib.suppress(FileNotFoundError):
                archive.unlink()
        await asyncio.to_thread(self._cache.update_metadata, image_id, artifact_sha256=stats.sha256)
        log.info("image.artifact_uploaded", image_id=image_id, key=key, size_bytes=stats.size_bytes)


@runtime_checkable
class VmDiskCache(Protocol):
    """A microVM driver's base-disk cache: where (``cache_dir``) and for which id base."""

    cache_dir: Path
    id_base: int


async def bake_vm_disks(drivers: Iterable[object], tree: Path, size_mib: int) -> list[Path]:
    """Bake the base ext4 of ``tree`` at the image's ``size_mib`` for every microVM driver
    (SPEC §7.4 step 4); bunkers of those drivers reuse it. Container drivers need nothing.

    Raises:
        DiskError: ``mkfs.ext4`` failed or the tree does not fit in ``size_mib`` (the
            message says so).
    """
    baked: list[Path] = []
    for driver in drivers:
        info = getattr(driver, "info", None)
        if getattr(info, "isolation", None) != "microvm" or not isinstance(driver, VmDiskCache):
            continue
        baked.append(await bake_base_disk(driver.cache_dir, tree, driver.id_base, size_mib))
    return baked


def _archive_tree(tree: Path, archive: Path, id_base: int) -> Any:
    with archive.open("wb") as out:
        return archive_layer(tree, out, id_base)


def _touch(path: Path) -> None:
    # An explicit nanosecond time: the kernel's own "now" is coarse (a clock tick), so two
    # uses within one tick would tie.
    now = time.time_ns()
    with contextlib.suppress(FileNotFoundError):
        os.utime(path, ns=(now, now))


def _empty_dir(path: Path) -> None:
    """Remove everything inside ``path`` (which stays, empty)."""
    remove_tree(path)
    path.mkdir(mode=0o755)

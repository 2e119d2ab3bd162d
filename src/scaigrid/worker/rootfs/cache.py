"""The worker's image cache: one shifted, read-only root tree per image id.

Layout under ``cache_dir``::

    <image_id>/rootfs      the tree: owners shifted by ``id_base`` (see ``idshift``), used as
                           the read-only overlay lower layer of container bunkers
    <image_id>/image.json  {"image_id", "source", "id_base", "build_s", "entries",
                           "source_digest", "bake_source", "artifact_sha256"?,
                           "tree_bytes"?}; its mtime is the image's last use (LRU)
    .build-<image_id>-*/   a build in progress (renamed into place when complete)
    .lock-<image_id>       flock(2) file serialising builds of one image across processes

Building is atomic: everything happens in a ``.build-`` directory that is renamed to
``<image_id>`` only when complete, so a reader never sees half a tree and a crashed build
leaves only a ``.build-`` directory, removed by the next build of that image. Concurrent
``ensure`` calls for one image (tasks in one process, or several processes) build it once:
the others wait for the lock and find the finished tree.

Each image directory is mode 0700 (root only): bunkers reach the tree only through their
overlay, never on the host, and nothing ever writes to it after the rename.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from scaigrid.worker.rootfs.debootstrap import run_debootstrap
from scaigrid.worker.rootfs.errors import ImageBuildError
from scaigrid.worker.rootfs.guest_user import ensure_guest_user
from scaigrid.worker.rootfs.idshift import DEFAULT_ID_BASE, shift_tree
from scaigrid.worker.rootfs.mounts import remove_tree, unmount_all_under
from scaigrid.worker.rootfs.oci import (
    OciReference,
    check_layout_layers,
    pull,
    resolve_digest,
    unpack,
)
from scaigrid.worker.rootfs.tar import extract_tar

log = structlog.get_logger()

#: Directories every tree gets (when the image lacks them) so starting a bunker writes
#: nothing into its upper layer: kernel filesystems, ``/tmp``, and the container driver's
#: mount points for the agent runtime (``/.scaibunker``) and run dir (``/.scaibunker-run``).
MOUNT_POINTS: dict[str, int] = {
    "proc": 0o555,
    "sys": 0o555,
    "dev": 0o755,
    "tmp": 0o1777,
    ".scaibunker": 0o755,
    ".scaibunker-run": 0o755,
}

#: Fills an empty tree from a stored artifact and returns extra ``image.json`` fields, or
#: returns ``None`` (tree untouched) when there is no artifact; see :meth:`ImageCache.ensure`.
Fetch = Callable[[Path], Awaitable[dict[str, Any] | None]]

_IMAGE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_LOCK_POLL_S = 0.05


def _add_mount_points(tree: Path) -> None:
    for name, mode in MOUNT_POINTS.items():
        path = tree / name
        if not os.path.lexists(path):
            path.mkdir()
            os.chown(path, 0, 0)
            os.chmod(path, mode)


def _drop_downloaded_packages(tree: Path) -> None:
    """Delete the .deb files debootstrap leaves in apt's cache (``apt-get clean``)."""
    archives = tree / "var" / "cache" / "apt" / "archives"
    if any(
        p.is_symlink() for p in (tree / "var", archives.parent.parent, archives.parent, archives)
    ):
        return
    if archives.is_dir():
        for deb in archives.glob("*.deb"):
            if deb.is_file() and not deb.is_symlink():
                deb.unlink()


class ImageCache:
    """Builds and serves image root trees for the container driver.

    Args:
        cache_dir: directory of the cache (created mode 0700 when missing).
        id_base: host id bunker id 0 maps to; must equal the container driver's ``id_base``.
        debootstrap_timeout_s: deadline of one debootstrap run.
        pull_timeout_s: deadline of one OCI pull (a registry that stalls is cut off here).
        insecure_registries: registry hosts (``host:port``) an OCI pull reaches over plain
            HTTP without certificate checks; every other registry needs valid HTTPS.
        registry_auth_file: containers-auth.json with the operator's registry credentials
            (OCI pulls are anonymous when ``None``).
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        id_base: int = DEFAULT_ID_BASE,
        debootstrap_timeout_s: float = 1800.0,
        pull_timeout_s: float = 1800.0,
        insecure_registries: frozenset[str] = frozenset(),
        registry_auth_file: Path | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self.id_base = id_base
        self.debootstrap_timeout_s = debootstrap_timeout_s
        self.pull_timeout_s = pull_timeout_s
        self.insecure_registries = insecure_registries
        self.registry_auth_file = registry_auth_file
        self._locks: dict[str, asyncio.Lock] = {}
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path_for(self, image_id: str) -> Path:
        """Where the tree of ``image_id`` lives once built (it may not exist yet)."""
        return self.cache_dir / _checked_id(image_id) / "rootfs"

    def cached(self) -> list[str]:
        """Ids of the images whose tree is complete, sorted."""
        return sorted(
            entry.name
            for entry in self.cache_dir.iterdir()
            if not entry.name.startswith(".") and (entry / "image.json").is_file()
        )

    def metadata(self, image_id: str) -> dict[str, Any]:
        """``image.json`` of a built image: ``{image_id, source, id_base, build_s, entries,
        source_digest}`` (``source_digest``: the pinned ``sha256:`` manifest digest of an OCI
        source, else ``None``).

        Raises:
            FileNotFoundError: the image is not built.
        """
        meta: dict[str, Any] = json.loads(
            (self.cache_dir / _checked_id(image_id) / "image.json").read_text()
        )
        return meta

    async def ensure(
        self, image_id: str, source: Mapping[str, Any], *, fetch: Fetch | None = None
    ) -> Path:
        """Return the tree of ``image_id``, building it from ``source`` first if needed.

        With ``fetch``, a missing image is first offered to it: it fills the empty tree from
        the image's baked artifact (owners already shifted) and returns extra metadata, and
        the build from ``source`` is skipped (``bake_source: "artifact"``); when it returns
        ``None`` the image is built from ``source`` (``bake_source: "baked"``).

        Args:
            image_id: cache key (``img_…``; letters, digits, ``_.-``).
            source: ``{"kind": "tar", "path": "/abs/rootfs.tar[.gz|.zst|...]"}`` or
                ``{"kind": "debootstrap", "suite": "bookworm", "variant": "minbase",
                "packages": ["python3"]}`` (``variant`` defaults to ``minbase``,
                ``packages`` to none), or ``{"kind": "oci", "ref": "host/repo:tag"}``
                (see :mod:`.oci`).

        Returns:
            The tree directory (``cache_dir/<image_id>/rootfs``), owned by shifted ids.

        Raises:
            ImageBuildError: bad ``source``, unsafe archive or layer, debootstrap failure,
                registry refusal or stall, or the cached tree was built for another ``id_base``.
        """
        path = self.path_for(image_id)
        if not (path.parent / "image.json").is_file():
            lock = self._locks.setdefault(image_id, asyncio.Lock())
            async with lock, self._file_lock(image_id):
                if not (path.parent / "image.json").is_file():
                    await self._build(image_id, source, fetch)
        meta = json.loads((path.parent / "image.json").read_text())
        if meta.get("id_base") != self.id_base:
            raise ImageBuildError(
                f"image {image_id} was built for id base {meta.get('id_base')}, "
                f"not {self.id_base}; evict it first"
            )
        return path

    async def evict(self, image_id: str) -> None:
        """Delete the tree of ``image_id`` (idempotent).

        Bunkers still running on it keep working only until their overlay is unmounted;
        evict images no bunker uses.
        """
        async with self._locks.setdefault(image_id, asyncio.Lock()), self._file_lock(image_id):
            image_dir = self.cache_dir / _checked_id(image_id)
            doomed = image_dir.with_name(f".evict-{image_id}-{secrets.token_hex(4)}")
            with contextlib.suppress(FileNotFoundError):
                os.rename(image_dir, doomed)
                await asyncio.to_thread(remove_tree, doomed)
                log.info("rootfs.image_evicted", image_id=image_id)

    @contextlib.asynccontextmanager
    async def _file_lock(self, image_id: str) -> AsyncIterator[None]:
        fd = os.open(self.cache_dir / f".lock-{image_id}", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(_LOCK_POLL_S)
            yield
        finally:
            os.close(fd)

    async def _remove_stale_builds(self, image_id: str) -> None:
        for entry in self.cache_dir.iterdir():
            if entry.name.startswith((f".build-{image_id}-", f".evict-{image_id}-")):
                await unmount_all_under(entry)
                await asyncio.to_thread(remove_tree, entry)
                log.info("rootfs.stale_build_removed", path=str(entry))

    def update_metadata(self, image_id: str, **fields: Any) -> None:
        """Merge ``fields`` into ``image.json`` of a built image (replaced atomically, its
        mtime, the image's last use, kept).

        Raises:
            FileNotFoundError: the image is not built.
        """
        path = self.cache_dir / _checked_id(image_id) / "image.json"
        meta = json.loads(path.read_text())
        meta.update(fields)
        used = path.stat().st_mtime_ns  # the last use (LRU order) is the file's mtime
        tmp = path.with_name(f".image.json.{secrets.token_hex(4)}")
        tmp.write_text(json.dumps(meta, default=str))
        os.utime(tmp, ns=(used, used))
        os.replace(tmp, path)

    async def _build(self, image_id: str, source: Mapping[str, Any], fetch: Fetch | None) -> None:
        await self._remove_stale_builds(image_id)
        started = time.monotonic()
        build_dir = self.cache_dir / f".build-{image_id}-{secrets.token_hex(4)}"
        build_dir.mkdir(mode=0o700)
        tree = build_dir / "rootfs"
        tree.mkdir(mode=0o755)
        log.info("rootfs.build_started", image_id=image_id, kind=source.get("kind"))
        try:
            fetched = await fetch(tree) if fetch is not None else None
            if fetched is not None:
                meta = {
                    "source_digest": None,
                    **fetched,
                    "image_id": image_id,
                    "source": dict(source),
                    "id_base": self.id_base,
                    "build_s": round(time.monotonic() - started, 3),
                    "bake_source": "artifact",
                }
            else:
                source_digest = await self._populate(tree, source)
                await asyncio.to_thread(ensure_guest_user, tree)
                await asyncio.to_thread(_add_mount_points, tree)
                stats = await asyncio.to_thread(shift_tree, tree, self.id_base)
                meta = {
                    "image_id": image_id,
                    "source": dict(source),
                    "id_base": self.id_base,
                    "build_s": round(time.monotonic() - started, 3),
                    "entries": stats.entries,
                    "source_digest": source_digest,
                    "bake_source": "baked",
                }
            (build_dir / "image.json").write_text(json.dumps(meta, default=str))
            os.rename(build_dir, self.cache_dir / image_id)
        except BaseException:
            await unmount_all_under(build_dir)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(remove_tree, build_dir)
            raise
        log.info(
            "rootfs.build_done",
            image_id=image_id,
            build_s=meta["build_s"],
            bake_source=meta["bake_source"],
        )

    async def _populate(self, tree: Path, source: Mapping[str, Any]) -> str | None:
        """Fill ``tree``; return the pinned manifest digest of an OCI source, else ``None``."""
        kind = source.get("kind")
        if kind == "oci":
            return await self._populate_oci(tree, str(source.get("ref", "")))
        if kind == "tar":
            archive = Path(str(source.get("path", "")))
            if not archive.is_absolute():
                raise ImageBuildError("tar source needs an absolute 'path'")
            await asyncio.to_thread(extract_tar, archive, tree)
        elif kind == "debootstrap":
            packages = source.get("packages") or []
            if not isinstance(packages, list | tuple) or not all(
                isinstance(p, str) for p in packages
            ):
                raise ImageBuildError("debootstrap 'packages' must be a list of names")
            await run_debootstrap(
                tree,
                suite=str(source.get("suite", "")),
                variant=str(source.get("variant") or "minbase"),
                packages=list(packages),
                timeout_s=self.debootstrap_timeout_s,
            )
            await unmount_all_under(tree)
            await asyncio.to_thread(_drop_downloaded_packages, tree)
        else:
            raise ImageBuildError(f"unknown image source kind {kind!r}")
        return None

    async def _populate_oci(self, tree: Path, ref_text: str) -> str:
        ref = OciReference(ref_text)
        insecure, auth = self.insecure_registries, self.registry_auth_file
        digest = await resolve_digest(ref, insecure_hosts=insecure, auth_file=auth)
        layout, bundle = tree.parent / "layout", tree.parent / "bundle"
        await pull(
            ref,
            digest,
            layout,
            insecure_hosts=insecure,
            auth_file=auth,
            timeout_s=self.pull_timeout_s,
        )
        members = await asyncio.to_thread(check_layout_layers, layout)
        rootfs = await unpack(layout, bundle, timeout_s=self.pull_timeout_s)
        await asyncio.to_thread(_replace_dir, tree, rootfs)
        await asyncio.to_thread(remove_tree, bundle)
        await asyncio.to_thread(remove_tree, layout)
        log.info("rootfs.oci_unpacked", ref=ref_text, digest=digest, members=members)
        return digest


def _replace_dir(empty: Path, replacement: Path) -> None:
    """Put the directory ``replacement`` where the empty directory ``empty`` is."""
    empty.rmdir()
    os.rename(replacement, empty)


def _checked_id(image_id: str) -> str:
    if not _IMAGE_ID_RE.match(image_id):
        raise ImageBuildError(f"invalid image id {image_id!r}")
    return image_id

"""LRU eviction of cached images beyond the worker's cache size, never of an image in use."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import pytest

from scaigrid.worker.images import ImageStore
from scaigrid.worker.rootfs import ImageCache, mount_overlay_root, unmount_overlay_root

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")

MIB = 1 << 20


def _tar(work: Path, name: str, payload_mib: int) -> dict[str, str]:
    root = work / f"src-{name}"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", root / "bin" / "busybox")
    (root / "payload").write_bytes(os.urandom(payload_mib * MIB))
    archive = work / f"{name}.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname=".")
    return {"kind": "tar", "path": str(archive)}


async def test_least_recently_used_unused_images_are_evicted(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "cache")
    store = ImageStore(cache, max_cache_bytes=25 * MIB)
    tree_a = await store.ensure("img_a", _tar(tmp_path, "a", 8))
    await store.ensure("img_b", _tar(tmp_path, "b", 8))
    assert cache.cached() == ["img_a", "img_b"]
    size_a = await store.tree_bytes("img_a")
    assert 8 * MIB < size_a < 12 * MIB
    # img_a is older but a bunker root uses it: img_b goes instead.
    state = tmp_path / "bunker"
    state.mkdir()
    await mount_overlay_root(tree_a, state, 64)
    try:
        await store.ensure("img_c", _tar(tmp_path, "c", 8))
        assert cache.cached() == ["img_a", "img_c"]
        assert [e["image_id"] for e in store.report()] == ["img_a", "img_c"]
        # Using img_a again makes img_c the least recently used one.
        await store.ensure("img_a", {"kind": "tar", "path": "/nonexistent"})
    finally:
        await unmount_overlay_root(state)
    await store.ensure("img_d", _tar(tmp_path, "d", 8))
    assert cache.cached() == ["img_a", "img_d"]


async def test_without_a_limit_nothing_is_evicted(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "cache")
    store = ImageStore(cache)
    for name in ("img_x", "img_y", "img_z"):
        await store.ensure(name, _tar(tmp_path, name, 2))
    assert cache.cached() == ["img_x", "img_y", "img_z"]

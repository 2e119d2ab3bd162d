"""The worker's image store: scan and evict on a real cache and real overlay mounts."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import pytest

from scaigrid.worker.images import ImageInUse, ImageNotCached, ImageStore
from scaigrid.worker.rootfs import ImageCache, mount_overlay_root, unmount_overlay_root
from scaigrid.worker.rootfs.mounts import overlays_using

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


def _busybox_tar(work: Path) -> Path:
    root = work / "src"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", root / "bin" / "busybox")
    archive = work / "bb.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname=".")
    return archive


async def test_evict_is_refused_while_a_bunker_root_uses_the_image(work: Path) -> None:
    store = ImageStore(ImageCache(work / "cache"))
    tree = await store.ensure("img_used", {"kind": "tar", "path": str(_busybox_tar(work))})
    state = work / "bunker"
    state.mkdir()
    await mount_overlay_root(tree, state, 64)
    try:
        assert overlays_using(tree)
        with pytest.raises(ImageInUse, match="used by 1 bunker root"):
            await store.evict("img_used")
        assert tree.is_dir()
    finally:
        await unmount_overlay_root(state)
    assert overlays_using(tree) == []
    assert await store.evict("img_used") is True
    assert not tree.exists()
    assert store.report() == []
    assert await store.evict("img_used") is False


async def test_scan_needs_a_ready_image(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ImageStore(ImageCache(work / "cache"))
    with pytest.raises(ImageNotCached):
        await store.scan("img_absent")
    await store.ensure("img_scan", {"kind": "tar", "path": str(_busybox_tar(work))})
    monkeypatch.setenv("PATH", str(work))
    result = await store.scan("img_scan")
    assert result.status == "scanner_unavailable"

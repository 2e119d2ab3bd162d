"""The image cache: tar source end to end, atomic and single builds, apt mirror discovery."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from scaigrid.worker.rootfs import DEFAULT_ID_BASE, ImageBuildError, ImageCache, find_mirror


async def test_tar_source_builds_a_shifted_tree_with_guest_user(
    busybox_image: Path, image_cache: ImageCache
) -> None:
    assert busybox_image == image_cache.path_for("img_busybox")
    assert os.lstat(busybox_image).st_uid == DEFAULT_ID_BASE
    assert os.lstat(busybox_image / "bin" / "busybox").st_uid == DEFAULT_ID_BASE
    home = os.lstat(busybox_image / "home" / "user")
    assert (home.st_uid, home.st_gid) == (DEFAULT_ID_BASE + 1000, DEFAULT_ID_BASE + 1000)
    assert "user:x:1000:1000::/home/user:/bin/sh" in (busybox_image / "etc/passwd").read_text()
    for name in ("proc", "sys", "dev", "tmp", ".scaibunker", ".scaibunker-run"):
        assert (busybox_image / name).is_dir()
    assert os.stat(busybox_image.parent).st_mode & 0o777 == 0o700
    meta = json.loads((busybox_image.parent / "image.json").read_text())
    assert meta["id_base"] == DEFAULT_ID_BASE and meta["source"]["kind"] == "tar"
    assert "img_busybox" in image_cache.cached()


async def test_concurrent_ensures_build_once(tmp_path: Path, busybox_tar: Path) -> None:
    source = {"kind": "tar", "path": str(busybox_tar)}
    first, second = ImageCache(tmp_path / "cache"), ImageCache(tmp_path / "cache")
    with capture_logs() as logs:
        paths = await asyncio.gather(
            first.ensure("img_once", source),
            first.ensure("img_once", source),
            second.ensure("img_once", source),
        )
    assert len(set(paths)) == 1
    assert [e["event"] for e in logs].count("rootfs.build_started") == 1
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".build-")]


async def test_failed_build_leaves_no_tree(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "cache")
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\0" * 10)
    with pytest.raises(ImageBuildError):
        await cache.ensure("img_bad", {"kind": "tar", "path": str(bad)})
    assert cache.cached() == []
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".lock-")] == []
    with pytest.raises(ImageBuildError, match="unknown image source"):
        await cache.ensure("img_bad", {"kind": "floppy"})
    with pytest.raises(ImageBuildError, match="invalid image id"):
        await cache.ensure("../escape", {"kind": "tar", "path": str(bad)})
    with pytest.raises(ImageBuildError, match="invalid package"):
        await cache.ensure(
            "img_bad", {"kind": "debootstrap", "suite": "bookworm", "packages": ["--foo"]}
        )


async def test_zstd_tar_source_and_evict(tmp_path: Path, busybox_tar: Path) -> None:
    archive = tmp_path / "busybox.tar.zst"
    plain = tmp_path / "busybox.tar"
    subprocess.run(f"gzip -dc {busybox_tar} > {plain}", shell=True, check=True)
    subprocess.run(["zstd", "-q", "-o", str(archive), str(plain)], check=True)
    cache = ImageCache(tmp_path / "cache")
    tree = await cache.ensure("img_zst", {"kind": "tar", "path": str(archive)})
    assert (tree / "bin" / "busybox").is_file()
    await cache.evict("img_zst")
    await cache.evict("img_zst")
    assert not tree.exists() and cache.cached() == []


def test_mirror_comes_from_apt_sources(tmp_path: Path) -> None:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n"
    )
    (apt / "sources.list.d" / "other.list").write_text(
        "# comment\ndeb [arch=amd64] http://other.example/debian trixie main\n"
    )
    (apt / "sources.list.d" / "ignored.list.disabled").write_text("deb http://nope/ sid main\n")
    assert find_mirror("bookworm", apt) == "http://mirror.example/debian"
    assert find_mirror("trixie", apt) == "http://other.example/debian"
    assert find_mirror("sid", apt) == "http://mirror.example/debian"
    with pytest.raises(ImageBuildError):
        find_mirror("bookworm", tmp_path / "empty")

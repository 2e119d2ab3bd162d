"""Baked image artifacts through real storage proxies (moto S3 behind two `bunker_proxy`
processes): two workers baking one image at once store one artifact; a third worker with
another id base fetches it instead of building (its tar source does not even exist) and gets
the same tree; an artifact that fails its digest is not used."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import stat
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from scaigrid.modules.scaibunker.storage.capabilities import mint
from scaigrid.worker.capabilities import CapabilityBroker
from scaigrid.worker.images import ImageStore, artifact_key
from scaigrid.worker.rootfs import ImageCache
from scaigrid.worker.rootfs.idshift import DEFAULT_ID_BASE, ID_RANGE_SIZE
from tests.fixtures.stack import free_port
from tests.storage.conftest import SECRET, Proxy, S3Server, proxies, s3_server, secret_key

__all__ = ["proxies", "s3_server", "secret_key"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="image trees need root")


def _broker(proxy: Proxy, asked: list[str]) -> CapabilityBroker:
    async def requester(
        purpose: str, *, bunker_id: str | None = None, image_id: str | None = None
    ) -> dict[str, Any]:
        assert purpose == "image_artifact" and image_id is not None
        asked.append(image_id)
        token, exp = mint(
            SECRET.encode(), ["GET", "HEAD", "PUT"], prefix=f"scaibunker/images/{image_id}/"
        )
        return {"capability": token, "expires_at": exp, "storage_url": proxy.url}

    return CapabilityBroker(requester)


def _source_tar(work: Path) -> Path:
    root = work / "src"
    (root / "bin").mkdir(parents=True)
    (root / "home" / "alice").mkdir(parents=True)
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    (root / "home" / "alice" / "notes").write_text("hello\n")
    os.link(root / "home" / "alice" / "notes", root / "home" / "alice" / "notes.link")
    (root / "bin" / "suid").write_text("#!/bin/sh\n")
    os.chmod(root / "bin" / "suid", 0o4755)
    os.chown(root / "home" / "alice", 1000, 1000)
    os.chown(root / "home" / "alice" / "notes", 1000, 50)
    archive = work / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname=".")
    return archive


def _listing(tree: Path, base: int) -> list[tuple[Any, ...]]:
    """Every entry with unshifted owners, mode, size, link target and content hash."""
    rows: list[tuple[Any, ...]] = []
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in sorted([*dirnames, *filenames]):
            path = Path(dirpath) / name
            st = path.lstat()
            extra: Any = None
            if stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                extra = hashlib.sha256(path.read_bytes()).hexdigest()
            rows.append(
                (
                    str(path.relative_to(tree)),
                    st.st_mode,
                    st.st_uid - base,
                    st.st_gid - base,
                    st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                    st.st_nlink if stat.S_ISREG(st.st_mode) else 0,
                    extra,
                )
            )
    return sorted(rows)


async def test_one_artifact_from_two_bakes_then_fetched_elsewhere(
    proxies: list[Proxy], s3_server: S3Server, secret_key: str, tmp_path: Path
) -> None:
    image_id = f"img_art{secret_key}"
    source = {"kind": "tar", "path": str(_source_tar(tmp_path))}
    key = artifact_key(image_id)
    asked: list[str] = []
    artifact = {"key": key, "digest": None}
    base_b = DEFAULT_ID_BASE + 2 * ID_RANGE_SIZE
    store_a = ImageStore(ImageCache(tmp_path / "a"), broker=_broker(proxies[0], asked))
    store_b = ImageStore(
        ImageCache(tmp_path / "b", id_base=base_b), broker=_broker(proxies[1], asked)
    )
    tree_a, tree_b = await asyncio.gather(
        store_a.ensure(image_id, source, artifact), store_b.ensure(image_id, source, artifact)
    )
    await asyncio.gather(store_a.published(image_id), store_b.published(image_id))
    # One artifact in the bucket, whichever worker won.
    listed = s3_server.client().list_objects_v2(
        Bucket="scaibunker-test", Prefix=f"scaibunker/images/{image_id}/"
    )
    assert [o["Key"] for o in listed.get("Contents", [])] == [key]
    digests = {store_a.digest(image_id), store_b.digest(image_id)}
    uploaded = [d for d in digests if d is not None]
    assert len(uploaded) == 1, digests
    digest = uploaded[0]
    body = s3_server.client().get_object(Bucket="scaibunker-test", Key=key)["Body"].read()
    assert digest == f"sha256:{hashlib.sha256(body).hexdigest()}"
    assert _listing(tree_a, DEFAULT_ID_BASE) == _listing(tree_b, base_b)

    # A third worker (another id base) whose tar source is gone: it can only fetch.
    base_c = DEFAULT_ID_BASE + 4 * ID_RANGE_SIZE
    store_c = ImageStore(
        ImageCache(tmp_path / "c", id_base=base_c), broker=_broker(proxies[1], asked)
    )
    missing = {"kind": "tar", "path": str(tmp_path / "no-such.tar")}
    started = time.monotonic()
    tree_c = await store_c.ensure(image_id, missing, {"key": key, "digest": digest})
    assert store_c.bake_source(image_id) == "artifact"
    assert store_c.digest(image_id) == digest
    assert store_c.report() == [{"image_id": image_id, "digest": digest, "state": "ready"}]
    assert _listing(tree_c, base_c) == _listing(tree_a, DEFAULT_ID_BASE)
    notes = tree_c / "home" / "alice" / "notes"
    assert (notes.stat().st_uid, notes.stat().st_gid) == (base_c + 1000, base_c + 50)
    assert time.monotonic() - started < 30


async def test_artifact_failing_its_digest_is_not_used(
    proxies: list[Proxy], secret_key: str, tmp_path: Path
) -> None:
    image_id = f"img_bad{secret_key}"
    source = {"kind": "tar", "path": str(_source_tar(tmp_path))}
    asked: list[str] = []
    store_a = ImageStore(ImageCache(tmp_path / "a"), broker=_broker(proxies[0], asked))
    await store_a.ensure(image_id, source, {"key": artifact_key(image_id)})
    await store_a.published(image_id)
    assert store_a.bake_source(image_id) == "baked" and store_a.digest(image_id)
    # The controller's recorded digest differs from the stored object: B bakes itself
    # (the source is there) and leaves the stored artifact alone.
    store_b = ImageStore(ImageCache(tmp_path / "b"), broker=_broker(proxies[1], asked))
    wrong = {"key": artifact_key(image_id), "digest": "sha256:" + "0" * 64}
    tree = await store_b.ensure(image_id, source, wrong)
    await store_b.published(image_id)
    assert store_b.bake_source(image_id) == "baked"
    assert store_b.digest(image_id) is None
    assert (tree / "bin" / "busybox").is_file()


async def test_without_a_store_the_image_is_still_built(tmp_path: Path) -> None:
    """A broker that cannot get a capability (link down) never fails the bake."""
    store = ImageStore(ImageCache(tmp_path / "a"), broker=CapabilityBroker(None))
    source = {"kind": "tar", "path": str(_source_tar(tmp_path))}
    tree = await store.ensure("img_nostore", source, {"key": artifact_key("img_nostore")})
    await store.published("img_nostore")
    assert (tree / "bin" / "busybox").is_file()
    assert store.bake_source("img_nostore") == "baked" and store.digest("img_nostore") is None


async def test_unreachable_store_does_not_fail_the_bake_and_is_not_retried_at_once(
    tmp_path: Path,
) -> None:
    """With the proxy down the image is built from its source; the failed upload is not
    repeated by every later use of the image (PUBLISH_RETRY_S)."""
    dead = Proxy(f"http://127.0.0.1:{free_port()}", None)  # type: ignore[arg-type]
    asked: list[str] = []
    store = ImageStore(ImageCache(tmp_path / "a"), broker=_broker(dead, asked))
    source = {"kind": "tar", "path": str(_source_tar(tmp_path))}
    artifact = {"key": artifact_key("img_down")}
    tree = await store.ensure("img_down", source, artifact)
    await store.published("img_down")
    assert (tree / "bin" / "busybox").is_file()
    assert store.bake_source("img_down") == "baked" and store.digest("img_down") is None
    started = time.monotonic()
    await store.ensure("img_down", source, artifact)
    await store.published("img_down")
    assert time.monotonic() - started < 2

"""OCI image source against a real local registry: pull, layers, whiteouts, faults."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import stat
import tarfile
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from scaigrid.worker.rootfs import DEFAULT_ID_BASE, ImageBuildError, ImageCache
from scaigrid.worker.rootfs.oci import OciReference
from tests.images.conftest import Registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="exact ownership needs root")


def _layer(path: Path, build: Callable[[tarfile.TarFile], None]) -> Path:
    with tarfile.open(path, "w") as tar:
        build(tar)
    return path


def _add(
    tar: tarfile.TarFile,
    name: str,
    *,
    data: bytes = b"",
    kind: bytes = tarfile.REGTYPE,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    link: str = "",
) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.linkname = kind, mode, uid, gid, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _busybox_layer(work: Path) -> Path:
    root = work / "bb-root"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", root / "bin" / "busybox")
    for applet in ("sh", "ls", "cat"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "opt" / "old").mkdir(parents=True)
    (root / "opt" / "old" / "keep-me-not").write_text("lower")
    return _layer(work / "base.tar", lambda tar: tar.add(root, arcname="."))


def _cache(work: Path, registry: Registry) -> ImageCache:
    return ImageCache(work / "cache", insecure_registries=frozenset({registry.host}))


async def test_pull_applies_layers_whiteouts_and_exact_owners(
    registry: Registry, work: Path
) -> None:
    def upper(tar: tarfile.TarFile) -> None:
        _add(tar, "bin/.wh.ls")
        _add(tar, "opt/old/", kind=tarfile.DIRTYPE, mode=0o750)
        _add(tar, "opt/old/.wh..wh..opq")
        _add(tar, "opt/old/fresh", data=b"upper")
        _add(tar, "srv/", kind=tarfile.DIRTYPE, mode=0o755)
        _add(tar, "srv/tool", data=b"#!/bin/sh\n", mode=0o4750, uid=1234, gid=5678)
        _add(tar, "srv/abs-link", kind=tarfile.SYMTYPE, link="/etc/passwd")

    ref = registry.push(
        "test/layers:v1",
        [_busybox_layer(work), _layer(work / "upper.tar", upper)],
        work=work,
    )
    _raw, _type, digest = registry.manifest("test/layers", "v1")
    cache = _cache(work, registry)
    tree = await cache.ensure("img_layers", {"kind": "oci", "ref": ref})

    assert (tree / "bin" / "busybox").is_file()
    assert not os.path.lexists(tree / "bin" / "ls")
    assert os.path.islink(tree / "bin" / "cat")
    assert sorted(os.listdir(tree / "opt" / "old")) == ["fresh"]
    assert (tree / "opt" / "old" / "fresh").read_text() == "upper"
    tool = os.lstat(tree / "srv" / "tool")
    assert (tool.st_uid, tool.st_gid) == (DEFAULT_ID_BASE + 1234, DEFAULT_ID_BASE + 5678)
    assert stat.S_IMODE(tool.st_mode) == 0o4750
    assert stat.S_IMODE(os.lstat(tree / "opt" / "old").st_mode) == 0o750
    assert os.readlink(tree / "srv" / "abs-link") == "/etc/passwd"
    assert "user:x:1000:1000" in (tree / "etc" / "passwd").read_text()
    meta = cache.metadata("img_layers")
    assert meta["source_digest"] == digest
    assert not (tree.parent / "layout").exists() and not (tree.parent / "bundle").exists()


async def test_index_picks_linux_amd64(registry: Registry, work: Path) -> None:
    def marker(text: str) -> Callable[[tarfile.TarFile], None]:
        return lambda tar: _add(tar, "arch", data=text.encode())

    base = _busybox_layer(work)
    registry.push(
        "test/multi:arm", [base, _layer(work / "a.tar", marker("arm64"))], arch="arm64", work=work
    )
    registry.push("test/multi:amd", [base, _layer(work / "b.tar", marker("amd64"))], work=work)
    descriptors = []
    for tag, arch in (("arm", "arm64"), ("amd", "amd64")):
        raw, media_type, digest = registry.manifest("test/multi", tag)
        descriptors.append(
            {
                "mediaType": media_type,
                "digest": digest,
                "size": len(raw),
                "platform": {"architecture": arch, "os": "linux"},
            }
        )
    index = json.dumps({"schemaVersion": 2, "manifests": descriptors}).encode()
    httpx.put(
        f"http://{registry.host}/v2/test/multi/manifests/both",
        content=index,
        headers={"Content-Type": "application/vnd.oci.image.index.v1+json"},
    ).raise_for_status()

    cache = _cache(work, registry)
    tree = await cache.ensure(
        "img_multi", {"kind": "oci", "ref": f"{registry.host}/test/multi:both"}
    )
    assert (tree / "arch").read_text() == "amd64"
    assert cache.metadata("img_multi")["source_digest"].startswith("sha256:")


async def test_pinned_digest_must_match(registry: Registry, work: Path) -> None:
    ref = registry.push("test/pin:v1", [_busybox_layer(work)], work=work)
    _raw, _type, digest = registry.manifest("test/pin", "v1")
    cache = _cache(work, registry)
    tree = await cache.ensure("img_pin", {"kind": "oci", "ref": f"{ref}@{digest}"})
    assert (tree / "bin" / "busybox").is_file()
    with pytest.raises(ImageBuildError, match="manifest unknown"):
        await cache.ensure("img_pin2", {"kind": "oci", "ref": f"{ref}@sha256:{'0' * 64}"})


async def test_missing_reference_fails_with_registry_reason(registry: Registry, work: Path) -> None:
    cache = _cache(work, registry)
    with pytest.raises(ImageBuildError, match="manifest unknown"):
        await cache.ensure("img_nope", {"kind": "oci", "ref": f"{registry.host}/test/none:v9"})
    assert cache.cached() == []


async def test_refusing_registry_fails(work: Path) -> None:
    cache = ImageCache(work / "cache")
    with pytest.raises(ImageBuildError, match="cannot read"):
        await cache.ensure("img_tls", {"kind": "oci", "ref": "127.0.0.1:1/test/x:v1"})


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        ({"name": "../escape", "data": b"x"}, "'..' component"),
        ({"name": "/abs", "data": b"x"}, "absolute path"),
        ({"name": "out", "kind": tarfile.SYMTYPE, "link": "../../../etc"}, "leaves the root"),
        ({"name": "dev-null", "kind": tarfile.CHRTYPE}, "device node"),
        ({"name": "disk", "kind": tarfile.BLKTYPE}, "device node"),
        ({"name": "hard", "kind": tarfile.LNKTYPE, "link": "../x"}, "hard link"),
    ],
)
async def test_unsafe_layer_member_fails_the_image(
    registry: Registry, work: Path, member: dict[str, object], reason: str
) -> None:
    def evil(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(str(member["name"]))
        info.type = member.get("kind", tarfile.REGTYPE)  # type: ignore[assignment]
        info.linkname = str(member.get("link", ""))
        data = member.get("data", b"")
        assert isinstance(data, bytes)
        info.size = len(data) if info.type == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)

    tag = f"test/evil:{abs(hash(reason + str(member['name'])))}"
    ref = registry.push(tag, [_busybox_layer(work), _layer(work / "evil.tar", evil)], work=work)
    cache = _cache(work, registry)
    with pytest.raises(ImageBuildError, match=reason):
        await cache.ensure("img_evil", {"kind": "oci", "ref": ref})
    assert cache.cached() == []
    assert not (work / "escape").exists()


async def test_layer_digest_mismatch_fails(registry: Registry, work: Path) -> None:
    ref = registry.push(
        "test/corrupt:v1",
        [_layer(work / "one.tar", lambda tar: _add(tar, "only", data=b"original" * 100))],
        work=work,
    )
    raw, _type, _digest = registry.manifest("test/corrupt", "v1")
    layer_digest = json.loads(raw)["layers"][0]["digest"].split(":")[1]
    blob = next(registry.storage.rglob(f"blobs/sha256/{layer_digest[:2]}/{layer_digest}/data"))
    blob.write_bytes(bytes(len(blob.read_bytes())))
    cache = _cache(work, registry)
    with pytest.raises(ImageBuildError, match=r"(?i)digest"):
        await cache.ensure("img_corrupt", {"kind": "oci", "ref": ref})
    assert cache.cached() == []


class _StallingRegistry(BaseHTTPRequestHandler):
    """Serves one repository from the real registry but stalls halfway through layer blobs."""

    upstream = ""
    layers: frozenset[str] = frozenset()
    release = threading.Event()

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""

    def do_GET(self) -> None:
        """Proxy manifests and config; send half of a layer blob, then hang."""
        response = httpx.get(
            f"http://{self.upstream}{self.path}",
            headers={"Accept": self.headers.get("Accept", "*/*")},
        )
        self.send_response(response.status_code)
        for key in ("content-type", "docker-content-digest"):
            if key in response.headers:
                self.send_header(key, response.headers[key])
        self.send_header("Content-Length", str(len(response.content)))
        self.end_headers()
        if self.path.rsplit("/", 1)[-1] in self.layers:
            self.wfile.write(response.content[: len(response.content) // 2])
            self.wfile.flush()
            self.release.wait(30)
            return
        self.wfile.write(response.content)

    do_HEAD = do_GET


@pytest.fixture
def stalling(registry: Registry) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StallingRegistry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    _StallingRegistry.release.set()
    server.shutdown()
    server.server_close()


async def test_stalled_blob_hits_the_deadline(
    registry: Registry, work: Path, stalling: str
) -> None:
    registry.push(
        "test/stall:v1",
        [_layer(work / "big.tar", lambda tar: _add(tar, "big", data=os.urandom(1 << 20)))],
        work=work,
    )
    raw, _type, _digest = registry.manifest("test/stall", "v1")
    _StallingRegistry.upstream = registry.host
    _StallingRegistry.layers = frozenset(layer["digest"] for layer in json.loads(raw)["layers"])
    cache = ImageCache(work / "cache", insecure_registries=frozenset({stalling}), pull_timeout_s=3)
    started = asyncio.get_running_loop().time()
    with pytest.raises(ImageBuildError, match=r"deadline 3 s.*deadline exceeded"):
        await cache.ensure("img_stall", {"kind": "oci", "ref": f"{stalling}/test/stall:v1"})
    assert asyncio.get_running_loop().time() - started < 20
    assert cache.cached() == []


async def test_two_bakes_of_one_image_build_once(registry: Registry, work: Path) -> None:
    ref = registry.push("test/once:v1", [_busybox_layer(work)], work=work)
    first, second = _cache(work, registry), _cache(work, registry)
    with capture_logs() as logs:
        paths = await asyncio.gather(
            first.ensure("img_once", {"kind": "oci", "ref": ref}),
            second.ensure("img_once", {"kind": "oci", "ref": ref}),
        )
    assert paths[0] == paths[1]
    assert [e["event"] for e in logs].count("rootfs.oci_pulled") == 1


@pytest.mark.parametrize(
    ("text", "repository", "tag"),
    [
        ("python:3.12-slim", "docker.io/library/python", "3.12-slim"),
        ("r-base/r:4.4", "docker.io/r-base/r", "4.4"),
        ("ghcr.io/a/b", "ghcr.io/a/b", "latest"),
        ("127.0.0.1:5000/x/y:t", "127.0.0.1:5000/x/y", "t"),
    ],
)
def test_reference_parsing(text: str, repository: str, tag: str) -> None:
    ref = OciReference(text)
    assert (ref.repository, ref.tag) == (repository, tag)


@pytest.mark.parametrize("text", ["", "-rm", "UPPER/x", "a b", "x@sha256:12", "x/../y"])
def test_bad_reference_is_refused(text: str) -> None:
    with pytest.raises(ImageBuildError, match="not a valid OCI image reference"):
        OciReference(text)

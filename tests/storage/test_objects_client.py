"""The worker's object client against real proxy processes (and a proxy whose S3 is down)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from scaigrid.modules.scaibunker.storage.capabilities import mint
from scaigrid.worker.link.tasks import TaskFailed
from scaigrid.worker.objects import ObjectClient
from tests.fixtures.stack import free_port
from tests.storage.conftest import SECRET, Proxy, S3Server, _stop, start_proxy

MIB = 1024 * 1024


def _cap(methods: list[str], key: str) -> str:
    return mint(SECRET.encode(), methods, key=key)[0]


async def test_upload_then_download_on_the_other_proxy(
    proxies: list[Proxy], tmp_path: Path, secret_key: str
) -> None:
    key = f"scaibunker/snapshots/tnt_c/{secret_key}.tar.zst"
    source = tmp_path / "layer"
    source.write_bytes(os.urandom(7 * MIB + 1))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    result = await ObjectClient(proxies[0].url).upload(source, key, _cap(["PUT"], key), digest)
    assert result == {"key": key, "size": 7 * MIB + 1, "sha256": digest}
    dest = tmp_path / "copy"
    size = await ObjectClient(proxies[1].url).download(key, _cap(["GET"], key), dest)
    assert size == 7 * MIB + 1 and dest.read_bytes() == source.read_bytes()


async def test_refusals_are_final_and_typed(
    proxies: list[Proxy], tmp_path: Path, secret_key: str
) -> None:
    key = f"scaibunker/snapshots/tnt_c/{secret_key}.tar.zst"
    source = tmp_path / "layer"
    source.write_bytes(b"x")
    client = ObjectClient(proxies[0].url)
    started = time.monotonic()
    with pytest.raises(TaskFailed) as info:
        await client.upload(source, key, _cap(["GET"], key), "0" * 64)
    assert info.value.code == "AUTHZ_PERMISSION_DENIED"
    with pytest.raises(TaskFailed) as info:
        await client.download(key, _cap(["GET"], key), tmp_path / "dest")
    assert info.value.code == "OBJECT_NOT_FOUND"
    assert time.monotonic() - started < 5
    assert not (tmp_path / "dest").exists()


async def test_store_down_is_retried_then_typed_and_keeps_the_local_file(
    s3_server: S3Server, tmp_path: Path
) -> None:
    env = s3_server.env()
    env["SCAIBUNKER_S3_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    proxy = start_proxy(env, tmp_path)
    try:
        key = "scaibunker/snapshots/tnt_c/down.tar.zst"
        source = tmp_path / "layer"
        source.write_bytes(b"precious")
        started = time.monotonic()
        with pytest.raises(TaskFailed) as info:
            await ObjectClient(proxy.url).upload(source, key, _cap(["PUT"], key), "0" * 64)
        assert info.value.code == "OBJECT_STORE_UNAVAILABLE"
        assert time.monotonic() - started >= 7
        assert source.read_bytes() == b"precious"
    finally:
        _stop(proxy.process)

"""Both object-store backends: the local directory and S3 (moto as its own process)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from scaigrid.errors import (
    ObjectNotFound,
    ObjectStoreUnavailable,
    RangeNotSatisfiable,
    ValidationFailed,
)
from scaigrid.modules.scaibunker.storage.settings import StorageSettings
from scaigrid.modules.scaibunker.storage.store import (
    LocalObjectStore,
    ObjectStore,
    S3ObjectStore,
    build_store,
)
from tests.fixtures.stack import free_port
from tests.storage.conftest import S3Server

MIB = 1024 * 1024
KEY = "scaibunker/snapshots/tnt_1/snp_1.tar.zst"


async def _chunks(data: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def _read_all(store: ObjectStore, key: str, start: int = 0, end: int | None = None) -> bytes:
    read = await store.get(key, start, end)
    return b"".join([c async for c in read.chunks])


def _s3_settings(server: S3Server, bucket: str, endpoint: str | None = None) -> StorageSettings:
    return StorageSettings(
        storage_backend="s3",
        s3_endpoint=endpoint or server.endpoint,
        s3_bucket=bucket,
        s3_access_key_id="test",
        s3_secret_access_key="test",
        s3_part_size_bytes=5 * MIB,
        s3_timeout_s=2,
    )


@pytest.fixture(params=["local", "s3"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, s3_server: S3Server, secret_key: str
) -> AsyncIterator[ObjectStore]:
    if request.param == "local":
        built = build_store(StorageSettings(storage_dir=tmp_path / "objects"), tmp_path)
        assert isinstance(built, LocalObjectStore)
    else:
        built = build_store(_s3_settings(s3_server, f"b-{secret_key}"), tmp_path)
        assert isinstance(built, S3ObjectStore)
        await built.ensure_bucket()
    yield built
    await built.close()


async def test_put_get_head_delete_round_trip(store: ObjectStore) -> None:
    data = os.urandom(3 * MIB + 17)
    result = await store.put(KEY, _chunks(data))
    assert (result.size, result.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert (await store.head(KEY)).size == len(data)
    assert await _read_all(store, KEY) == data
    assert await store.list_keys("scaibunker/snapshots/tnt_1/") == [KEY]
    await store.delete(KEY)
    with pytest.raises(ObjectNotFound):
        await store.head(KEY)
    with pytest.raises(ObjectNotFound):
        await store.delete(KEY)


async def test_ranged_reads(store: ObjectStore) -> None:
    data = os.urandom(MIB)
    await store.put(KEY, _chunks(data))
    assert await _read_all(store, KEY, 10, 19) == data[10:20]
    assert await _read_all(store, KEY, MIB - 5) == data[-5:]
    assert await _read_all(store, KEY, 0, 10 * MIB) == data
    with pytest.raises(RangeNotSatisfiable):
        await store.get(KEY, MIB + 1)


async def test_multipart_upload_of_several_parts(store: ObjectStore) -> None:
    data = os.urandom(12 * MIB + 3)
    result = await store.put(KEY, _chunks(data, MIB))
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(await _read_all(store, KEY)).hexdigest() == result.sha256


async def test_failed_upload_leaves_nothing(store: ObjectStore) -> None:
    async def broken() -> AsyncIterator[bytes]:
        for _ in range(11):
            yield os.urandom(MIB)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await store.put(KEY, broken())
    with pytest.raises(ObjectNotFound):
        await store.head(KEY)
    assert await store.list_keys("scaibunker/") == []
    if isinstance(store, S3ObjectStore):
        assert await store.pending_uploads("scaibunker/") == []
    else:
        assert isinstance(store, LocalObjectStore)
        assert list((store.root / ".tmp").iterdir()) == []


async def test_bad_keys_never_reach_the_backend(store: ObjectStore) -> None:
    with pytest.raises(ValidationFailed):
        await store.head("scaibunker/../../etc/passwd")
    with pytest.raises(ValidationFailed):
        await store.put("scaibunker/a/../../x", _chunks(b"x"))


async def test_unreachable_s3_is_a_typed_retryable_error(
    tmp_path: Path, s3_server: S3Server
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    store = build_store(_s3_settings(s3_server, "nowhere", endpoint=dead), tmp_path)
    with pytest.raises(ObjectStoreUnavailable) as info:
        await store.put(KEY, _chunks(b"data"))
    assert info.value.status_code == 503 and info.value.retry_after
    with pytest.raises(ObjectStoreUnavailable):
        await store.head(KEY)
    await store.close()

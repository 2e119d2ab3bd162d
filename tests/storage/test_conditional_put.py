"""First-writer-wins uploads (``If-None-Match: *``) on both backends and through the proxy, and
capability refresh in the worker's object client."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from scaigrid.errors import ObjectExists
from scaigrid.modules.scaibunker.storage.capabilities import mint
from scaigrid.modules.scaibunker.storage.store import ObjectStore, S3ObjectStore
from scaigrid.worker.capabilities import CapabilityBroker
from scaigrid.worker.link.tasks import TaskFailed
from scaigrid.worker.objects import ObjectClient, ObjectExistsError
from tests.storage.conftest import SECRET, Proxy
from tests.storage.test_store import store  # noqa: F401  (fixture)

MIB = 1024 * 1024


async def _chunks(data: bytes, size: int = 1024 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        await asyncio.sleep(0)
        yield data[i : i + size]


async def _read(target: ObjectStore, key: str) -> bytes:
    read = await target.get(key)
    return b"".join([c async for c in read.chunks])


async def test_if_absent_keeps_the_first_object(store: ObjectStore, secret_key: str) -> None:  # noqa: F811
    key = f"scaibunker/images/img_{secret_key}/rootfs.tar.zst"
    await store.put(key, _chunks(b"first"), if_absent=True)
    with pytest.raises(ObjectExists):
        await store.put(key, _chunks(b"second"), if_absent=True)
    assert await _read(store, key) == b"first"
    # A plain put still replaces.
    await store.put(key, _chunks(b"third"))
    assert await _read(store, key) == b"third"


async def test_two_writers_at_once_store_one_object(store: ObjectStore, secret_key: str) -> None:  # noqa: F811
    """Two multipart-sized uploads overlap: both start while the key is free (so both pass
    any early check), the second commits after the first. Exactly one object is stored and
    the loser leaves no parts behind. (The commits are ordered because moto, unlike S3,
    checks the condition and commits in two steps.)"""
    key = f"scaibunker/images/img_{secret_key}/rootfs.tar.zst"
    first_body, second_body = os.urandom(11 * MIB), os.urandom(11 * MIB)
    first_done = asyncio.Event()
    second_started = asyncio.Event()

    async def first_chunks() -> AsyncIterator[bytes]:
        await second_started.wait()
        async for chunk in _chunks(first_body):
            yield chunk

    async def second_chunks() -> AsyncIterator[bytes]:
        second_started.set()
        async for chunk in _chunks(second_body[: 6 * MIB]):
            yield chunk
        await first_done.wait()
        async for chunk in _chunks(second_body[6 * MIB :]):
            yield chunk

    async def first() -> object:
        try:
            return await store.put(key, first_chunks(), if_absent=True)
        finally:
            first_done.set()

    results = await asyncio.gather(
        first(), store.put(key, second_chunks(), if_absent=True), return_exceptions=True
    )
    assert not isinstance(results[0], BaseException), results
    assert isinstance(results[1], ObjectExists), results
    stored = await _read(store, key)
    assert stored == first_body
    assert await store.list_keys(f"scaibunker/images/img_{secret_key}/") == [key]
    if isinstance(store, S3ObjectStore):
        assert await store.pending_uploads("scaibunker/images/") == []


def _cap(methods: list[str], key: str, ttl_s: int = 900) -> str:
    return mint(SECRET.encode(), methods, key=key, ttl_s=ttl_s)[0]


def test_proxy_answers_412_to_a_second_conditional_put(
    proxies: list[Proxy], secret_key: str
) -> None:
    key = f"scaibunker/images/img_{secret_key}/rootfs.tar.zst"
    headers = {"Authorization": f"Bearer {_cap(['PUT', 'GET'], key)}", "If-None-Match": "*"}
    first = httpx.put(f"{proxies[0].objects}/{key}", content=b"one", headers=headers)
    assert first.status_code == 200, first.text
    second = httpx.put(f"{proxies[1].objects}/{key}", content=b"two", headers=headers)
    assert second.status_code == 412
    assert second.json()["error"]["code"] == "OBJECT_EXISTS"
    got = httpx.get(f"{proxies[1].objects}/{key}", headers=headers)
    assert got.content == b"one"


async def test_object_client_conditional_upload(
    proxies: list[Proxy], tmp_path: Path, secret_key: str
) -> None:
    key = f"scaibunker/images/img_{secret_key}/rootfs.tar.zst"
    path = tmp_path / "artifact"
    path.write_bytes(b"artifact")
    digest = hashlib.sha256(b"artifact").hexdigest()
    client = ObjectClient(proxies[0].url)
    await client.upload(path, key, _cap(["PUT"], key), digest, if_absent=True)
    with pytest.raises(ObjectExistsError):
        await client.upload(path, key, _cap(["PUT"], key), digest, if_absent=True)
    assert await client.head(key, _cap(["HEAD"], key)) == len(b"artifact")
    assert await client.head(key + "x", _cap(["HEAD"], key + "x")) is None


async def test_expired_capability_is_refreshed_once(
    proxies: list[Proxy], tmp_path: Path, secret_key: str
) -> None:
    """An expired token is refused (403); with ``refresh`` the client asks for a new one."""
    key = f"scaibunker/audit/bnk_{secret_key}/1-1.ndjson"
    # Expired 60 s ago: past the 30 s clock-skew tolerance.
    expired = mint(SECRET.encode(), ["PUT"], key=key, ttl_s=1, now=time.time() - 61)[0]
    client = ObjectClient(proxies[0].url)
    with pytest.raises(TaskFailed) as info:
        await client.put_bytes(key, b"{}\n", expired)
    assert info.value.code == "AUTHZ_PERMISSION_DENIED"
    asked: list[str] = []

    async def refresh() -> str:
        asked.append(key)
        return _cap(["PUT"], key)

    result = await client.put_bytes(key, b"{}\n", expired, refresh=refresh)
    assert result["size"] == 3 and asked == [key]


async def test_broker_renews_grants_close_to_expiry() -> None:
    calls: list[tuple[str, str | None]] = []

    async def requester(
        purpose: str, *, bunker_id: str | None = None, image_id: str | None = None
    ) -> dict[str, object]:
        calls.append((purpose, bunker_id or image_id))
        return {
            "capability": f"tok{len(calls)}",
            "expires_at": time.time() + 900,
            "storage_url": "http://proxy",
        }

    broker = CapabilityBroker(requester, margin_s=120)
    broker.offer(
        "image_artifact",
        "img_1",
        {"capability": "old", "expires_at": time.time() + 60, "storage_url": "http://proxy"},
    )
    grant = await broker.get("image_artifact", "img_1")
    assert grant.token == "tok1" and calls == [("image_artifact", "img_1")]
    assert (await broker.get("image_artifact", "img_1")).token == "tok1"
    broker.offer(
        "audit",
        "bnk_1",
        {"capability": "fresh", "expires_at": time.time() + 900, "storage_url": "http://proxy"},
    )
    assert (await broker.get("audit", "bnk_1")).token == "fresh"
    assert (await broker.refresher("audit", "bnk_1")()) == "tok2"
    assert calls[-1] == ("audit", "bnk_1")
    without = CapabilityBroker(None)
    with pytest.raises(TaskFailed):
        await without.get("audit", "bnk_2")

"""The storage proxy as its own process (`SCAIGRID_MODE=bunker_proxy`, no database, no Redis)
in front of moto's S3 server: capability checks, streaming, ranges, interchangeable replicas,
interrupted uploads."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from scaigrid.modules.scaibunker.storage.capabilities import mint
from tests.storage.conftest import BUCKET, SECRET, Proxy, S3Server

MIB = 1024 * 1024


def _cap(methods: list[str], key: str | None = None, prefix: str | None = None, **kw: int) -> str:
    return mint(SECRET.encode(), methods, key=key, prefix=prefix, **kw)[0]


def _key(suffix: str) -> str:
    return f"scaibunker/snapshots/tnt_t/{suffix}.tar.zst"


def _s3_keys(s3_server: S3Server, prefix: str) -> list[str]:
    page = s3_server.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for o in page.get("Contents", [])]


def test_proxy_serves_only_storage_and_health(proxies: list[Proxy]) -> None:
    assert httpx.get(f"{proxies[0].url}/health").status_code == 200
    assert httpx.get(f"{proxies[0].url}/v1/modules").status_code == 404
    r = httpx.get(f"{proxies[0].url}/v1/modules/scaibunker/bunkers")
    assert r.status_code == 404


def test_put_through_one_proxy_read_through_the_other(
    proxies: list[Proxy], s3_server: S3Server, secret_key: str
) -> None:
    key = _key(secret_key)
    data = os.urandom(11 * MIB + 5)
    put = httpx.put(
        f"{proxies[0].objects}/{key}",
        content=data,
        headers={"Authorization": f"Bearer {_cap(['PUT'], key)}"},
        timeout=60,
    )
    assert put.status_code == 200, put.text
    assert put.json()["data"] == {
        "key": key,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    read_cap = _cap(["GET"], prefix="scaibunker/snapshots/tnt_t/")
    got = httpx.get(f"{proxies[1].objects}/{key}", params={"cap": read_cap}, timeout=60)
    assert got.status_code == 200 and got.content == data
    part = httpx.get(
        f"{proxies[1].objects}/{key}",
        params={"cap": read_cap},
        headers={"Range": "bytes=100-199"},
    )
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    tail = httpx.get(
        f"{proxies[0].objects}/{key}", params={"cap": read_cap}, headers={"Range": "bytes=-10"}
    )
    assert tail.content == data[-10:]
    head = httpx.head(f"{proxies[0].objects}/{key}", params={"cap": read_cap})
    assert head.status_code == 200 and head.headers["content-length"] == str(len(data))
    gone = httpx.delete(f"{proxies[1].objects}/{key}", params={"cap": _cap(["DELETE"], key)})
    assert gone.status_code == 200 and gone.json()["data"] == {"id": key, "deleted": True}
    missing = httpx.get(f"{proxies[0].objects}/{key}", params={"cap": read_cap})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "OBJECT_NOT_FOUND"
    assert _s3_keys(s3_server, key) == []


def test_bad_capabilities_get_403_and_touch_nothing(
    proxies: list[Proxy], s3_server: S3Server, secret_key: str
) -> None:
    key = _key(secret_key)
    other = _key(secret_key + "-other")
    s3_server.client().put_object(Bucket=BUCKET, Key=key, Body=b"original")
    expired = _cap(["PUT", "GET", "DELETE"], key, ttl_s=1, now=int(time.time()) - 120)
    good = _cap(["GET"], key)
    payload, sig = good.split(".")
    tampered = f"{payload}.{sig[:-3]}AAA"
    foreign = mint(b"z" * 32, ["PUT", "GET", "DELETE"], key=key)[0]
    wrong_key = _cap(["PUT", "GET", "DELETE"], other)
    wrong_method = _cap(["GET"], key)
    url = f"{proxies[0].objects}/{key}"
    for cap in (expired, tampered, foreign, wrong_key):
        headers = {"Authorization": f"Bearer {cap}"}
        for method in ("GET", "PUT", "DELETE"):
            r = httpx.request(
                method, url, headers=headers, content=b"evil" if method == "PUT" else None
            )
            assert r.status_code == 403, (method, r.text)
            assert r.json()["error"]["code"] == "AUTHZ_PERMISSION_DENIED"
            assert b"original" not in r.content
    for method in ("PUT", "DELETE"):
        r = httpx.request(
            method, url, params={"cap": wrong_method}, content=b"evil" if method == "PUT" else None
        )
        assert r.status_code == 403
    missing = httpx.get(url)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "AUTH_TOKEN_MISSING"
    body = s3_server.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert body == b"original"
    assert _s3_keys(s3_server, other) == []


def test_upload_killed_half_way_leaves_no_object_and_no_parts(
    proxies: list[Proxy], s3_server: S3Server, secret_key: str
) -> None:
    key = _key(secret_key)
    split = urlsplit(proxies[0].objects)
    path = f"{split.path}/{key}?cap={_cap(['PUT'], key)}"
    sock = socket.create_connection((split.hostname or "127.0.0.1", split.port or 80))
    sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {40 * MIB}\r\n\r\n".encode())
    chunk = os.urandom(MIB)
    for _ in range(12):
        sock.sendall(chunk)
    time.sleep(1.0)
    sock.close()
    client = s3_server.client()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        uploads = client.list_multipart_uploads(Bucket=BUCKET, Prefix=key).get("Uploads", [])
        if not uploads:
            break
        time.sleep(0.2)
    assert uploads == []
    assert _s3_keys(s3_server, key) == []


def test_bad_key_is_a_validation_error(proxies: list[Proxy]) -> None:
    cap = _cap(["GET"], prefix="scaibunker/snapshots/")
    r = httpx.get(f"{proxies[0].objects}/scaibunker/snapshots/a%2F..%2F..%2Fx", params={"cap": cap})
    assert r.status_code == 422
    r = httpx.get(f"{proxies[0].objects}/etc/passwd", params={"cap": cap})
    assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_ERROR"


@pytest.mark.parametrize("header", ["bytes=5-2", "items=0-1", "bytes=999999999-"])
def test_bad_ranges_are_416(
    proxies: list[Proxy], s3_server: S3Server, secret_key: str, header: str
) -> None:
    key = _key(secret_key)
    s3_server.client().put_object(Bucket=BUCKET, Key=key, Body=b"0123456789")
    r = httpx.get(
        f"{proxies[0].objects}/{key}", params={"cap": _cap(["GET"], key)}, headers={"Range": header}
    )
    assert r.status_code == 416

"""End to end: multi-GiB streamed upload and download with matching sha256, Range reads."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import create_bunker
from tests.fixtures.stack import BASE, Stack

pytestmark = pytest.mark.e2e

_BLOCK = 1 << 20


def _blocks(count: int, digest: Any) -> Iterator[bytes]:
    """``count`` MiB of varied bytes (a random block with its index mixed in)."""
    seed = os.urandom(_BLOCK)
    for index in range(count):
        block = index.to_bytes(8, "big") + seed[8:]
        digest.update(block)
        yield block


def test_two_gibibytes_up_and_down_with_matching_sha256_and_ranges(
    stack: Stack, busybox_image: str
) -> None:
    mib = 2048
    bunker = create_bunker(stack, busybox_image, memory_mb=256, disk_mb=mib + 512)
    url = f"{BASE}/bunkers/{bunker['id']}/files"
    sent = hashlib.sha256()
    with stack.client(timeout_s=600) as client:
        try:
            upload = client.put(
                url,
                params={"path": "big.bin"},
                content=_blocks(mib, sent),
                headers={"Content-Type": "application/octet-stream"},
            )
            assert upload.status_code == 200, upload.text
            assert upload.json()["data"]["size"] == mib << 20
            assert upload.json()["data"]["sha256"] == sent.hexdigest()
            received, size = hashlib.sha256(), 0
            with client.stream("GET", url, params={"path": "big.bin"}) as response:
                assert response.status_code == 200
                assert int(response.headers["content-length"]) == mib << 20
                for chunk in response.iter_bytes(_BLOCK):
                    received.update(chunk)
                    size += len(chunk)
            assert (size, received.hexdigest()) == (mib << 20, sent.hexdigest())
            # Block 1000 starts with its index: a Range read lands exactly there.
            start = 1000 * _BLOCK
            part = client.get(
                url, params={"path": "big.bin"}, headers={"Range": f"bytes={start}-{start + 7}"}
            )
            assert part.status_code == 206
            assert part.content == (1000).to_bytes(8, "big")
            assert part.headers["content-range"] == f"bytes {start}-{start + 7}/{mib << 20}"
        finally:
            client.delete(f"{BASE}/bunkers/{bunker['id']}")

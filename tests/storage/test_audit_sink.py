"""Egress audit batches through the storage proxy (SPEC §8.7): uploaded with a granted
``PUT`` capability on the bunker's audit prefix; while the proxy is unreachable the records
stay buffered and the next flush uploads them all (no data loss)."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from scaigrid.modules.scaibunker.storage.capabilities import mint
from scaigrid.worker.capabilities import CapabilityBroker
from scaigrid.worker.net.audit import EgressAudit, ProxySink, flow_record
from tests.fixtures.stack import free_port
from tests.storage.conftest import BUCKET, SECRET, S3Server, _stop, start_proxy


def _broker(urls: list[str], asked: list[str]) -> CapabilityBroker:
    async def requester(
        purpose: str, *, bunker_id: str | None = None, image_id: str | None = None
    ) -> dict[str, Any]:
        assert purpose == "audit" and bunker_id is not None
        asked.append(bunker_id)
        token, exp = mint(SECRET.encode(), ["PUT"], prefix=f"scaibunker/audit/{bunker_id}/")
        return {"capability": token, "expires_at": exp, "storage_url": urls[0]}

    return CapabilityBroker(requester)


def _record(bunker_id: str, port: int) -> dict[str, Any]:
    return flow_record(
        bunker_id=bunker_id,
        tenant_id="ten_1",
        proto="tcp",
        src_ip="100.64.0.2",
        src_port=40000,
        dst_ip="192.0.2.1",
        dst_port=port,
        verdict="deny",
    )


async def test_batches_survive_an_unreachable_proxy(
    s3_server: S3Server, secret_key: str, tmp_path: Path
) -> None:
    bunker_id = f"bnk_{secret_key}"
    port = free_port()
    urls = [f"http://127.0.0.1:{port}"]  # the proxy is down
    asked: list[str] = []
    audit = EgressAudit(ProxySink(_broker(urls, asked)), pid=4242)
    for dst_port in (1, 2, 3):
        audit.add(_record(bunker_id, dst_port))
    started = time.monotonic()
    await audit.flush(bunker_id)
    assert time.monotonic() - started < 30  # retried with backoff, then given up for now
    s3 = s3_server.client()
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=BUCKET)
    prefix = f"scaibunker/audit/{bunker_id}/"
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    # The proxy is back: the kept records and a new one go out in one batch.
    proxy = start_proxy(s3_server.env(), tmp_path, port)
    try:
        audit.add(_record(bunker_id, 4))
        await audit.close()
    finally:
        _stop(proxy.process)
    objects = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]
    assert len(objects) == 1 and objects[0]["Key"].endswith("-4242.ndjson")
    body = s3.get_object(Bucket=BUCKET, Key=objects[0]["Key"])["Body"].read()
    records = [json.loads(line) for line in body.splitlines()]
    assert [r["dst_port"] for r in records] == [1, 2, 3, 4]
    assert asked == [bunker_id]  # one grant, still fresh, for both attempts

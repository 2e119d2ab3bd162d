"""Egress audit on real namespaces: DNS lookups and denied flows become NDJSON batches at
``scaibunker/audit/{bunker_id}/{ts_us}-{pid}.ndjson`` (SPEC §8.7)."""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from scaigrid.worker.net.audit import EgressAudit, LocalDirSink
from scaigrid.worker.net.manager import NetRequest, NetworkManager, default_pool
from tests.network.conftest import DNS_IP, HTTP_PORT, METADATA_IP, WEB_IPS, Inet, connect, resolve

SPEC_FIELDS = {
    "ts", "bunker_id", "tenant_id", "proto", "src_ip", "src_port", "dst_ip", "dst_port",
    "dns_name", "bytes_out", "bytes_in", "packets_out", "packets_in", "started_at", "ended_at",
    "verdict",
}  # fmt: skip


@pytest.fixture
async def audited(inet: Inet, tmp_path: Path) -> AsyncIterator[tuple[NetworkManager, Path]]:
    tag = secrets.token_hex(6)
    audit = EgressAudit(LocalDirSink(tmp_path))
    mgr = NetworkManager(tag=tag, pool=default_pool(tag), uplink_netns=inet.name, audit=audit)
    await mgr.start()
    try:
        yield mgr, tmp_path
    finally:
        await mgr.close()


def _records(root: Path, bunker_id: str) -> list[dict[str, object]]:
    folder = root / "scaibunker" / "audit" / bunker_id
    out: list[dict[str, object]] = []
    for path in sorted(folder.iterdir()):
        assert re.fullmatch(rf"[0-9]{{16,}}-{os.getpid()}\.ndjson", path.name), path.name
        assert path.stat().st_mode & 0o777 == 0o600
        out.extend(json.loads(line) for line in path.read_text().splitlines())
    return out


async def test_dns_lookups_and_denied_flows_are_recorded(
    audited: tuple[NetworkManager, Path], inet: Inet
) -> None:
    mgr, root = audited
    assert mgr.audit is not None
    inet.set_zone({"api.test": [WEB_IPS[0]]})
    bunker = await mgr.attach(
        "bnk_audit1",
        NetRequest("allowlisted", allowlist=("api.test",), upstreams=(DNS_IP,), tenant_id="ten_a"),
    )
    await resolve(bunker.netns, bunker.gateway, "api.test")
    await resolve(bunker.netns, bunker.gateway, "secret-data.evil.test")
    assert await connect(bunker.netns, WEB_IPS[0]) == "ok"
    await connect(bunker.netns, WEB_IPS[1])
    await connect(bunker.netns, WEB_IPS[1])
    await connect(bunker.netns, METADATA_IP, timeout_s=0.5)
    await mgr.collect_denied()
    await mgr.audit.flush_all()
    records = _records(root, "bnk_audit1")
    assert all(set(r) >= SPEC_FIELDS for r in records)
    assert all(r["tenant_id"] == "ten_a" for r in records)
    dns = {(r["dns_name"], r["verdict"]) for r in records if r["proto"] == "dns"}
    assert dns == {("api.test", "allow"), ("secret-data.evil.test", "deny")}
    allowed = next(r for r in records if r["proto"] == "dns" and r["verdict"] == "allow")
    assert allowed["dns_answers"] == [WEB_IPS[0]] and allowed["dst_port"] == 53
    denied = {
        (r["dst_ip"], r["dst_port"]): r
        for r in records
        if r["proto"] == "tcp" and r["verdict"] == "deny"
    }
    assert set(denied) == {(WEB_IPS[1], HTTP_PORT), (METADATA_IP, HTTP_PORT)}
    assert denied[(WEB_IPS[1], HTTP_PORT)]["packets_out"] == 2
    assert denied[(WEB_IPS[1], HTTP_PORT)]["src_ip"] == bunker.address
    # Counters restart after each collection: a new attempt is a new record.
    await connect(bunker.netns, WEB_IPS[1])
    await mgr.detach("bnk_audit1")
    later = _records(root, "bnk_audit1")[len(records) :]
    assert [(r["dst_ip"], r["packets_out"]) for r in later] == [(WEB_IPS[1], 1)]


async def test_no_audit_when_disabled_for_the_bunker(
    audited: tuple[NetworkManager, Path], inet: Inet
) -> None:
    mgr, root = audited
    assert mgr.audit is not None
    bunker = await mgr.attach(
        "bnk_audit2",
        NetRequest("allowlisted", allowlist=("api.test",), upstreams=(DNS_IP,), audit=False),
    )
    await resolve(bunker.netns, bunker.gateway, "nope.test")
    await connect(bunker.netns, WEB_IPS[1])
    await mgr.detach("bnk_audit2")
    assert not (root / "scaibunker" / "audit" / "bnk_audit2").exists()


async def test_allowed_flows_of_unrestricted_bunkers_are_recorded(
    audited: tuple[NetworkManager, Path], inet: Inet
) -> None:
    mgr, root = audited
    assert mgr.audit is not None
    inet.set_zone({"web.test": [WEB_IPS[2]]})
    bunker = await mgr.attach(
        "bnk_audit3", NetRequest("unrestricted", upstreams=(DNS_IP,), tenant_id="ten_b")
    )
    await resolve(bunker.netns, bunker.gateway, "web.test")
    assert await connect(bunker.netns, WEB_IPS[2]) == "ok"
    assert await connect(bunker.netns, WEB_IPS[0]) == "ok"
    assert await connect(bunker.netns, METADATA_IP, timeout_s=0.5) == "TimeoutError"
    await mgr.collect_audit()
    await mgr.audit.flush_all()
    first = _records(root, "bnk_audit3")
    flows = {r["dst_ip"]: r for r in first if r["proto"] == "tcp" and r["verdict"] == "allow"}
    assert set(flows) == {WEB_IPS[2], WEB_IPS[0]}
    named = flows[WEB_IPS[2]]
    assert named["dns_name"] == "web.test" and flows[WEB_IPS[0]]["dns_name"] is None
    assert named["dst_port"] == HTTP_PORT and named["src_ip"] == bunker.address
    assert named["bytes_in"] > 100 and named["packets_out"] >= 3 and named["ended_at"]
    assert {(r["dst_ip"], r["verdict"]) for r in first if r["proto"] == "tcp"} >= {
        (METADATA_IP, "deny")
    }
    # A finished flow is reported once, not again at the next collection.
    await mgr.collect_audit()
    await mgr.detach("bnk_audit3")
    later = _records(root, "bnk_audit3")[len(first) :]
    assert not [r for r in later if r["proto"] == "tcp"]

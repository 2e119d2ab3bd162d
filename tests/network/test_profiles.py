"""Profiles, DNS policy and cleanup on real namespaces (SPEC §8.1 to §8.5).

Each bunker here is the real network namespace a bunker's container joins
(``BunkerSpec.netns_path``); probes run on a thread inside it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import subprocess
import time

from dnslib import QTYPE, RCODE

from scaigrid.worker.net.manager import NetRequest, NetworkManager, default_pool, run_in_netns
from tests.network.conftest import (
    DNS_IP,
    HTTP_PORT,
    METADATA_IP,
    WEB_IPS,
    Inet,
    connect,
    resolve,
)

UPSTREAM = (DNS_IP,)
SINK_PORT = 9009
REFUSED_OR_DROPPED = {"ConnectionRefusedError", "TimeoutError", "OSError"}


def _bid() -> str:
    return f"bnk_{secrets.token_hex(8)}"


def _a_records(reply: object) -> list[str]:
    assert reply is not None
    return sorted(str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A)  # type: ignore[attr-defined]


async def test_unrestricted_reaches_the_internet_but_not_the_forbidden(
    manager: NetworkManager, inet: Inet
) -> None:
    inet.set_zone({"web.test": [WEB_IPS[0]]})
    a = await manager.attach(_bid(), NetRequest("unrestricted", upstreams=UPSTREAM))
    b = await manager.attach(_bid(), NetRequest("unrestricted", upstreams=UPSTREAM))
    for ip in WEB_IPS:
        assert await connect(a.netns, ip) == "ok", ip
    uplink_side, _ = manager._block(0)
    forbidden = [METADATA_IP, uplink_side, a.gateway, b.address, b.gateway, "224.0.0.1"]
    for ip in forbidden:
        assert await connect(a.netns, ip) in REFUSED_OR_DROPPED, ip
    reply = await resolve(a.netns, a.gateway, "web.test")
    assert _a_records(reply) == [WEB_IPS[0]]
    # Full outbound includes other resolvers: the upstream answers the bunker directly.
    direct = await resolve(a.netns, DNS_IP, "web.test")
    assert _a_records(direct) == [WEB_IPS[0]]


async def test_allowlisted_only_reaches_answered_names(manager: NetworkManager, inet: Inet) -> None:
    inet.set_zone({"api.test": [WEB_IPS[0]], "other.test": [WEB_IPS[1]]})
    bunker = await manager.attach(
        _bid(), NetRequest("allowlisted", allowlist=("api.test",), upstreams=UPSTREAM)
    )
    # Nothing is open before a lookup, and the upstream resolver cannot be asked directly.
    assert await connect(bunker.netns, WEB_IPS[0]) in REFUSED_OR_DROPPED
    assert await resolve(bunker.netns, DNS_IP, "api.test", timeout_s=1.0) is None
    reply = await resolve(bunker.netns, bunker.gateway, "api.test")
    assert reply is not None and reply.header.rcode == RCODE.NOERROR
    assert _a_records(reply) == [WEB_IPS[0]]
    assert await connect(bunker.netns, WEB_IPS[0]) == "ok"
    assert await connect(bunker.netns, WEB_IPS[0], port=HTTP_PORT + 1) in REFUSED_OR_DROPPED
    assert await connect(bunker.netns, WEB_IPS[1]) in REFUSED_OR_DROPPED
    assert await connect(bunker.netns, METADATA_IP) in REFUSED_OR_DROPPED
    aaaa = await resolve(bunker.netns, bunker.gateway, "api.test", "AAAA")
    assert aaaa is not None and aaaa.header.rcode == RCODE.NOERROR and not aaaa.rr


async def test_refused_names_never_reach_upstream(manager: NetworkManager, inet: Inet) -> None:
    inet.set_zone({"api.test": [WEB_IPS[0]], "x.svc.test": [WEB_IPS[2]]})
    bunker = await manager.attach(
        _bid(),
        NetRequest("allowlisted", allowlist=("api.test", "*.svc.test"), upstreams=UPSTREAM),
    )
    secret = secrets.token_hex(25)
    refused = [
        "other.test",
        f"{secret}.api.test",
        f"{secret}.x.svc.test",
        "svc.test",
        f"{secret[:40]}.{secret[:40]}.svc.test",
    ]
    before = len(inet.queried())
    for name in refused:
        reply = await resolve(bunker.netns, bunker.gateway, name)
        assert reply is not None and reply.header.rcode == RCODE.REFUSED, name
        assert not reply.rr
    wildcard = await resolve(bunker.netns, bunker.gateway, "X.svc.test")
    assert _a_records(wildcard) == [WEB_IPS[2]]
    asked = inet.queried()[before:]
    assert asked == ["x.svc.test"]
    assert not any(secret in name for name in inet.queried())


async def test_new_address_of_an_allowed_name_works(manager: NetworkManager, inet: Inet) -> None:
    inet.set_zone({"move.test": [WEB_IPS[0]]})
    bunker = await manager.attach(
        _bid(), NetRequest("allowlisted", allowlist=("move.test",), upstreams=UPSTREAM)
    )
    assert _a_records(await resolve(bunker.netns, bunker.gateway, "move.test")) == [WEB_IPS[0]]
    assert await connect(bunker.netns, WEB_IPS[2]) in REFUSED_OR_DROPPED
    inet.set_zone({"move.test": [WEB_IPS[2]]})
    assert _a_records(await resolve(bunker.netns, bunker.gateway, "move.test")) == [WEB_IPS[2]]
    assert await connect(bunker.netns, WEB_IPS[2]) == "ok"


async def test_addresses_learned_by_one_bunker_do_not_open_another(
    manager: NetworkManager, inet: Inet
) -> None:
    inet.set_zone({"api.test": [WEB_IPS[1]]})
    a = await manager.attach(
        _bid(), NetRequest("allowlisted", allowlist=("api.test",), upstreams=UPSTREAM)
    )
    b = await manager.attach(
        _bid(), NetRequest("registry", allowlist=("api.test",), upstreams=UPSTREAM)
    )
    assert _a_records(await resolve(a.netns, a.gateway, "api.test")) == [WEB_IPS[1]]
    assert await connect(a.netns, WEB_IPS[1]) == "ok"
    assert await connect(b.netns, WEB_IPS[1]) in REFUSED_OR_DROPPED
    # A bunker cannot use another bunker's resolver.
    assert await resolve(b.netns, a.gateway, "api.test", timeout_s=1.0) is None


async def test_detach_removes_namespace_rules_and_resolver(
    manager: NetworkManager, inet: Inet
) -> None:
    bunker = await manager.attach(
        _bid(), NetRequest("allowlisted", allowlist=("api.test",), upstreams=UPSTREAM)
    )
    assert bunker.netns in manager.leftovers()
    await manager.detach(bunker.bunker_id)
    await manager.detach(bunker.bunker_id)
    assert bunker.netns not in manager.leftovers()
    names = {next(iter(obj.values())).get("name") for obj in await manager.ruleset()}
    assert f"b_{bunker.slot}" not in names and f"allow_{bunker.slot}" not in names


async def test_worker_restart_leaves_no_stale_namespaces_or_rules(inet: Inet) -> None:
    tag = secrets.token_hex(6)
    first = NetworkManager(tag=tag, pool=default_pool(tag), uplink_netns=inet.name)
    await first.start()
    crashed = await first.attach(_bid(), NetRequest("unrestricted", upstreams=UPSTREAM))
    assert await connect(crashed.netns, WEB_IPS[0]) == "ok"
    # The process "dies": nothing is closed. A new manager on the same data dir reconciles.
    assert first._exec is not None
    first._exec.close()
    second = NetworkManager(tag=tag, pool=default_pool(tag), uplink_netns=inet.name)
    removed = await second.start()
    try:
        assert crashed.netns in removed and second.router in removed
        # The router and the (empty) bridge namespace, built afresh.
        assert second.leftovers() == sorted([second.router, second.l2.netns])
        kinds = [next(iter(obj)) for obj in await second.ruleset()]
        chains = [obj["chain"]["name"] for obj in await second.ruleset() if "chain" in obj]
        assert "set" in kinds
        assert sorted(chains) == ["forward", "input", "postrouting", "prerouting"]
        fresh = await second.attach(_bid(), NetRequest("unrestricted", upstreams=UPSTREAM))
        assert await connect(fresh.netns, WEB_IPS[0]) == "ok"
    finally:
        await second.close()
    assert second.leftovers() == []


def _upload_seconds(nbytes: int) -> float:
    payload = b"x" * 65536
    start = time.perf_counter()
    with socket.create_connection((WEB_IPS[0], SINK_PORT), timeout=30) as sock:
        sent = 0
        while sent < nbytes:
            sock.sendall(payload)
            sent += len(payload)
        sock.shutdown(socket.SHUT_WR)
        assert int(sock.recv(64)) == sent
    return time.perf_counter() - start


async def test_bandwidth_caps_bunker_egress(manager: NetworkManager) -> None:
    capped = await manager.attach(
        _bid(), NetRequest("unrestricted", upstreams=UPSTREAM, bandwidth_mbit=16)
    )
    free = await manager.attach(_bid(), NetRequest("unrestricted", upstreams=UPSTREAM))
    nbytes = 4 * 1024 * 1024  # 32 Mbit: about 2 s at 16 Mbit/s
    slow = await asyncio.to_thread(run_in_netns, capped.netns, lambda: _upload_seconds(nbytes))
    fast = await asyncio.to_thread(run_in_netns, free.netns, lambda: _upload_seconds(nbytes))
    assert slow > 1.5, slow
    assert fast < slow / 4, (fast, slow)


async def test_two_workers_on_one_uplink_get_distinct_pools(inet: Inet) -> None:
    tag_a = secrets.token_hex(6)
    tag_b = f"{(int(tag_a, 16) + 1024) % (1 << 48):012x}"
    assert default_pool(tag_a) == default_pool(tag_b)
    first = NetworkManager(tag=tag_a, uplink_netns=inet.name)
    second = NetworkManager(tag=tag_b, uplink_netns=inet.name)
    await first.start()
    try:
        await second.start()
        try:
            assert first.pool != second.pool
            a = await first.attach(_bid(), NetRequest("unrestricted", upstreams=UPSTREAM))
            b = await second.attach(_bid(), NetRequest("unrestricted", upstreams=UPSTREAM))
            assert await connect(a.netns, WEB_IPS[0]) == "ok"
            assert await connect(b.netns, WEB_IPS[0]) == "ok"
        finally:
            await second.close()
    finally:
        await first.close()
    assert first.leftovers() == [] and second.leftovers() == []


async def test_allowed_name_pointing_at_forbidden_addresses_stays_blocked(
    manager: NetworkManager, inet: Inet
) -> None:
    uplink_side, _ = manager._block(0)
    inet.set_zone({"rebind.test": [METADATA_IP, uplink_side]})
    bunker = await manager.attach(
        _bid(), NetRequest("allowlisted", allowlist=("rebind.test",), upstreams=UPSTREAM)
    )
    answer = await resolve(bunker.netns, bunker.gateway, "rebind.test")
    assert _a_records(answer) == sorted([METADATA_IP, uplink_side])
    for ip in (METADATA_IP, uplink_side):
        assert await connect(bunker.netns, ip, timeout_s=0.5) in REFUSED_OR_DROPPED, ip


async def test_large_answers_fit_in_one_udp_reply(manager: NetworkManager, inet: Inet) -> None:
    many = [f"198.18.1.{i}" for i in range(1, 61)]
    inet.set_zone({"many.test": many})
    bunker = await manager.attach(
        _bid(), NetRequest("allowlisted", allowlist=("many.test",), upstreams=UPSTREAM)
    )
    reply = await resolve(bunker.netns, bunker.gateway, "many.test")
    assert reply is not None and len(reply.pack()) <= 512
    got = _a_records(reply)
    assert got and set(got) <= set(many) and len(got) < len(many)


async def test_host_addresses_added_later_are_denied_too(manager: NetworkManager) -> None:
    """An address the worker host gains after the router was built (another interface,
    another worker's uplink) joins the always-denied set on the next refresh."""
    link = f"sbt{secrets.token_hex(4)}"
    peer = ["peer", "name", f"{link}p"]
    subprocess.run(["ip", "link", "add", link, "type", "veth", *peer], check=True)
    try:
        subprocess.run(["ip", "addr", "add", "192.0.2.77/32", "dev", link], check=True)
        assert "192.0.2.77" in await manager.deny_new_worker_addresses()
        assert await manager.deny_new_worker_addresses() == []
        ruleset = await manager.ruleset()
        deny4 = next(o["set"] for o in ruleset if "set" in o and o["set"]["name"] == "deny4")
        denied = json.dumps(deny4["elem"])
        assert "192.0.2.77" in denied
        # Every worker's pools and uplink links on a host live in 100.64.0.0/10.
        assert '{"prefix": {"addr": "100.64.0.0", "len": 10}}' in denied
    finally:
        subprocess.run(["ip", "link", "del", link], check=False)

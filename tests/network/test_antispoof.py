"""Router anti-spoofing and namespaces owned by a bunker's user namespace, on real
namespaces (SPEC §8.6; :func:`scaigrid.worker.net.nft.bunker_add`,
:mod:`scaigrid.worker.net.userns`)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import socket
import subprocess
import time
from pathlib import Path

from pyroute2 import IPRoute

from scaigrid.worker.net.flows import read_flows
from scaigrid.worker.net.manager import (
    NETNS_DIR,
    NetRequest,
    NetworkManager,
    default_pool,
    ipr_in,
    run_in_netns,
)
from scaigrid.worker.net.userns import userns_path
from scaigrid.worker.rootfs.idshift import DEFAULT_ID_BASE
from tests.network.conftest import DNS_IP, HTTP_PORT, WEB_IPS, Inet, connect

UPSTREAM = (DNS_IP,)
SINK_PORT = 9009  # the inet namespace's byte-counting sink (tests/network/inet_server.py)
#: ``NS_GET_USERNS`` (``linux/nsfs.h``): ``_IO(0xb7, 0x1)``.
NS_GET_USERNS = 0xB701


def _bid() -> str:
    return f"bnk_{secrets.token_hex(8)}"


def _connect_from(source: str, ip: str, port: int) -> str:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.bind((source, 0))
            sock.connect((ip, port))
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return "ok" if sock.recv(200).startswith(b"HTTP/1.0 200") else "bad answer"
    except OSError as exc:
        return type(exc).__name__


def _guard_packets(ruleset: list[dict[str, object]], slot: int) -> int:
    for obj in ruleset:
        rule = obj.get("rule") if isinstance(obj, dict) else None
        if isinstance(rule, dict) and rule.get("chain") == f"g_{slot}":
            for expr in rule.get("expr", []):  # type: ignore[attr-defined]
                if isinstance(expr, dict) and "counter" in expr:
                    return int(expr["counter"]["packets"])
    raise AssertionError(f"no guard rule for slot {slot}")


def _add_address(ns: str, address: str) -> None:
    def add(ipr: IPRoute) -> None:
        ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address=address, prefixlen=32)

    ipr_in(ns, add)


async def test_a_forged_source_address_is_dropped_at_the_router(
    manager: NetworkManager, inet: Inet
) -> None:
    a = await manager.attach(_bid(), NetRequest("unrestricted", upstreams=UPSTREAM))
    b = await manager.attach(_bid(), NetRequest("unrestricted", upstreams=UPSTREAM))
    # Without reverse-path filtering, only the nftables rule stands in the way.
    for key in ("all", "default", a.ifname, b.ifname):
        path = Path("/proc/sys/net/ipv4/conf", key, "rp_filter")
        await asyncio.to_thread(run_in_netns, manager.router, lambda p=path: p.write_text("0"))
    assert _guard_packets(await manager.ruleset(), a.slot) == 0
    other_pool = str(next(iter(default_pool(secrets.token_hex(6)).hosts())))
    for forged in (b.address, other_pool):
        await asyncio.to_thread(_add_address, a.netns, forged)
        got = await asyncio.to_thread(
            run_in_netns, a.netns, lambda f=forged: _connect_from(f, WEB_IPS[0], HTTP_PORT)
        )
        assert got in {"TimeoutError", "OSError"}, (forged, got)
    assert _guard_packets(await manager.ruleset(), a.slot) > 0
    # Dropped before conntrack: the router never saw a flow from a forged source (without
    # the rule, the SYN is forwarded and the server's answer is routed to bunker b).
    assert manager._exec is not None
    flows = await manager._exec.run(read_flows)
    assert not [f for f in flows if f.src_ip in (b.address, other_pool)], flows
    # The bunker's own address still works, and so does the other bunker.
    got = await asyncio.to_thread(
        run_in_netns, a.netns, lambda: _connect_from(a.address, WEB_IPS[0], HTTP_PORT)
    )
    assert got == "ok"
    assert await connect(b.netns, WEB_IPS[0]) == "ok"
    assert _guard_packets(await manager.ruleset(), b.slot) == 0


def _owner_inode(netns_file: Path) -> int:
    fd = os.open(netns_file, os.O_RDONLY)
    try:
        owner = fcntl.ioctl(fd, NS_GET_USERNS)
        try:
            return os.fstat(owner).st_ino
        finally:
            os.close(owner)
    finally:
        os.close(fd)


async def test_an_owned_namespace_belongs_to_the_bunkers_user_namespace(
    manager: NetworkManager, inet: Inet
) -> None:
    owned = await manager.attach(
        _bid(), NetRequest("transit", upstreams=UPSTREAM), owner_id_base=DEFAULT_ID_BASE
    )
    plain = await manager.attach(_bid(), NetRequest("unrestricted", upstreams=UPSTREAM))
    assert owned.userns_path == str(userns_path(owned.netns))
    assert plain.userns_path is None
    user_file = Path(owned.userns_path)
    assert _owner_inode(NETNS_DIR / owned.netns) == os.stat(user_file).st_ino
    assert _owner_inode(NETNS_DIR / plain.netns) == os.stat("/proc/self/ns/user").st_ino
    uid_map = Path(f"/proc/{os.getpid()}/uid_map").read_text().split()
    assert uid_map[:2] == ["0", "0"]  # the worker is in the initial namespace
    # The worker configured it as any other: it reaches the internet, and is guarded.
    assert await connect(owned.netns, WEB_IPS[0]) == "ok"
    assert f"userns/{owned.netns}" in manager.leftovers()
    await manager.detach(owned.bunker_id)
    assert not user_file.exists()
    assert not (NETNS_DIR / owned.netns).exists()


async def test_a_restarted_worker_removes_owned_namespaces(inet: Inet) -> None:
    tag = secrets.token_hex(6)
    first = NetworkManager(tag=tag, pool=default_pool(tag), uplink_netns=inet.name)
    await first.start()
    crashed = await first.attach(
        _bid(), NetRequest("transit", upstreams=UPSTREAM), owner_id_base=DEFAULT_ID_BASE
    )
    assert crashed.userns_path is not None and Path(crashed.userns_path).exists()
    # The process "dies": nothing is closed. A new manager on the same data dir reconciles.
    assert first._exec is not None
    first._exec.close()
    second = NetworkManager(tag=tag, pool=default_pool(tag), uplink_netns=inet.name)
    removed = await second.start()
    try:
        assert crashed.netns in removed and f"userns/{crashed.netns}" in removed
        assert not Path(crashed.userns_path).exists()
        assert second.leftovers() == sorted([second.router, second.l2.netns])
    finally:
        await second.close()
    assert second.leftovers() == []


def _upload_seconds(nbytes: int) -> float:
    """Seconds to send ``nbytes`` to the sink (:data:`SINK_PORT`) and hear its count."""
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


async def test_an_owned_namespace_stays_capped_without_its_tbf(manager: NetworkManager) -> None:
    capped = await manager.attach(
        _bid(),
        NetRequest("transit", upstreams=UPSTREAM, bandwidth_mbit=16),
        owner_id_base=DEFAULT_ID_BASE,
    )

    # What the bunker's root may now do in its own namespace.
    tc = ["tc", "-n", capped.netns, "qdisc"]
    subprocess.run([*tc, "del", "dev", "eth0", "root"], check=True)
    assert "tbf" not in subprocess.run([*tc, "show"], capture_output=True, text=True).stdout
    # 64 Mbit: about 4 s at 16 Mbit/s, less the 1 s of rate an nftables byte limit lets
    # through at once (its bucket holds one ``per`` unit of rate plus the burst).
    nbytes = 8 * 1024 * 1024
    slow = await asyncio.to_thread(run_in_netns, capped.netns, lambda: _upload_seconds(nbytes))
    assert slow > 2.5, slow

"""Tenant bridges, transit interfaces and spoof_guard on real namespaces (SPEC §8.6, §8.8).

Each bunker is the real network namespace a bunker's container joins. Frames are sent and
received with AF_PACKET sockets opened inside the bunkers' namespaces, so what is checked is
what the bridge and the ``bridge scaibunker_l2`` table do with a bunker's frames.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct
import time

import pytest
from pyroute2 import netns

from scaigrid.worker.bunkers import CreateRequest
from scaigrid.worker.link.tasks import TaskFailed
from scaigrid.worker.net.l2 import (
    BridgeInUse,
    InterfaceRequest,
    bridge_device,
    generated_mac,
    port_name,
)
from scaigrid.worker.net.manager import (
    NetRequest,
    NetworkError,
    NetworkManager,
    default_pool,
    ipr_in,
    run_in_netns,
)
from tests.network.conftest import DNS_IP, Inet

ETH_P = 0x88B5  # IEEE 802 local experimental ethertype
ETH_P_ALL = 0x0003
BROADCAST = "ff:ff:ff:ff:ff:ff"
FORGED = "02:de:ad:be:ef:01"


def _bid() -> str:
    return f"bnk_{secrets.token_hex(8)}"


def _frame(dst: str, src: str, payload: bytes, vlan: int | None = None) -> bytes:
    tag = struct.pack("!HH", 0x8100, vlan) if vlan is not None else b""
    return (
        bytes.fromhex(dst.replace(":", ""))
        + bytes.fromhex(src.replace(":", ""))
        + tag
        + struct.pack("!H", ETH_P)
        + payload
    )


def _packet_socket(ns: str, ifname: str, proto: int = ETH_P) -> socket.socket:
    """An AF_PACKET socket on ``ifname`` in namespace ``ns`` (it stays in ``ns``)."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
        sock.bind((ifname, proto))
        sock.settimeout(0.2)
        return sock

    return run_in_netns(ns, make)


def _received(sock: socket.socket, marker: bytes, wait_s: float = 1.0) -> list[bytes]:
    """Source MACs (6 bytes) of frames carrying ``marker`` that arrive within ``wait_s``."""
    seen: list[bytes] = []
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            data = sock.recv(2048)
        except TimeoutError:
            continue
        if marker in data:
            seen.append(data[6:12])
    return seen


async def _exchange(
    sender: tuple[str, str],
    receiver: tuple[str, str],
    src_mac: str,
    *,
    wait_s: float = 1.0,
    vlan: int | None = None,
) -> bool:
    """Send one broadcast frame with source ``src_mac`` (802.1Q-tagged with ``vlan``) from
    ``sender`` (ns, ifname); return whether ``receiver`` (ns, ifname) got it."""
    rx = await asyncio.to_thread(_packet_socket, *receiver, ETH_P_ALL)
    tx = await asyncio.to_thread(_packet_socket, *sender)
    marker = secrets.token_bytes(12)
    try:
        tx.send(_frame(BROADCAST, src_mac, marker + bytes(32), vlan))
        got = await asyncio.to_thread(_received, rx, marker, wait_s)
    finally:
        rx.close()
        tx.close()
    return bytes.fromhex(src_mac.replace(":", "")) in got


def _iface(
    bunker_id: str, device: str, *, guard: bool = True, name: str = "net1"
) -> InterfaceRequest:
    return InterfaceRequest(name, generated_mac(bunker_id, name), guard, device)


def _links(ns: str) -> dict[str, str]:
    """``{ifname: mac}`` of namespace ``ns``."""

    def read(ipr: object) -> dict[str, str]:
        return {
            str(link.get_attr("IFLA_IFNAME")): str(link.get_attr("IFLA_ADDRESS"))
            for link in ipr.get_links()  # type: ignore[attr-defined]
        }

    return dict(ipr_in(ns, read))  # type: ignore[arg-type]


async def _transit(manager: NetworkManager, *interfaces: InterfaceRequest, bunker_id: str) -> str:
    attachment = await manager.attach(
        bunker_id, NetRequest("transit", upstreams=(DNS_IP,), interfaces=tuple(interfaces))
    )
    return attachment.netns


async def test_two_bunkers_on_a_bridge_exchange_frames_and_spoofing_is_dropped(
    manager: NetworkManager,
) -> None:
    device = bridge_device(f"brg_{secrets.token_hex(8)}")
    await manager.l2.create_bridge(device, None)
    await manager.l2.create_bridge(device, None)  # idempotent
    assert device in manager.l2.bridges()
    a_id, b_id, c_id = _bid(), _bid(), _bid()
    a_if, b_if = _iface(a_id, device), _iface(b_id, device)
    c_if = _iface(c_id, device, guard=False, name="lan0")
    a = await _transit(manager, a_if, bunker_id=a_id)
    b = await _transit(manager, b_if, bunker_id=b_id)
    c = await _transit(manager, c_if, bunker_id=c_id)
    # Each bunker has eth0 (egress) and its interface with the requested MAC.
    assert _links(a)["net1"] == a_if.mac and "eth0" in _links(a)
    assert _links(c)["lan0"] == c_if.mac
    # Frames with the interface's own MAC cross the bridge, both ways.
    assert await _exchange((a, "net1"), (b, "net1"), a_if.mac)
    assert await _exchange((b, "net1"), (a, "net1"), b_if.mac)
    # A forged source MAC from a guarded interface is dropped at its bridge port...
    assert not await _exchange((a, "net1"), (b, "net1"), FORGED)
    assert not await _exchange((a, "net1"), (c, "lan0"), FORGED)
    # ...but passes from the unguarded one (spoof_guard: false).
    assert await _exchange((c, "lan0"), (b, "net1"), FORGED)
    rules = await manager.l2.ruleset()
    drops = [r["rule"]["expr"] for r in rules if isinstance(r, dict) and "rule" in r]
    counted = [e["counter"]["packets"] for expr in drops for e in expr if "counter" in e]
    assert counted and counted[0] >= 2
    # A bridge with interfaces cannot be deleted; detaching a bunker removes its port.
    with pytest.raises(BridgeInUse):
        await manager.l2.delete_bridge(device)
    for bunker_id in (a_id, b_id, c_id):
        await manager.detach(bunker_id)
        assert port_name(bunker_id, 0) not in manager.l2.ports()
    guard_sets = [r["set"] for r in await manager.l2.ruleset() if "set" in r]
    assert all(not s.get("elem") for s in guard_sets), guard_sets
    assert await manager.l2.delete_bridge(device) is True
    assert device not in manager.l2.bridges()


async def test_bridges_are_separate_segments_and_vlan_ports_are_untagged(
    manager: NetworkManager,
) -> None:
    plain, tagged = bridge_device(_bid()), bridge_device(_bid())
    await manager.l2.create_bridge(plain, None)
    await manager.l2.create_bridge(tagged, 42)
    a_id, b_id, c_id = _bid(), _bid(), _bid()
    a_if, b_if, c_if = _iface(a_id, plain), _iface(b_id, tagged), _iface(c_id, tagged)
    a = await _transit(manager, a_if, bunker_id=a_id)
    b = await _transit(manager, b_if, bunker_id=b_id)
    c = await _transit(manager, c_if, bunker_id=c_id)
    # Untagged frames reach the other member of VLAN 42, nothing crosses between bridges.
    assert await _exchange((b, "net1"), (c, "net1"), b_if.mac)
    # Bunker ports are untagged members: tagged frames do not enter the VLAN bridge (they
    # would cross a plain one).
    assert not await _exchange((b, "net1"), (c, "net1"), b_if.mac, vlan=42)
    assert not await _exchange((b, "net1"), (c, "net1"), b_if.mac, vlan=7)
    plain_b = _bid()
    plain_if = _iface(plain_b, plain)
    plain_ns = await _transit(manager, plain_if, bunker_id=plain_b)
    assert await _exchange((plain_ns, "net1"), (a, "net1"), plain_if.mac, vlan=7)
    await manager.detach(plain_b)
    assert not await _exchange((a, "net1"), (b, "net1"), a_if.mac)
    assert not await _exchange((b, "net1"), (a, "net1"), b_if.mac)
    # The bridge namespace has no route anywhere: nothing is linked to the uplink.
    routes = ipr_in(manager.l2.netns, lambda ipr: ipr.get_routes(family=socket.AF_INET))
    assert [r for r in routes if r.get_attr("RTA_TABLE") == 254] == []
    for bunker_id in (a_id, b_id, c_id):
        await manager.detach(bunker_id)


async def test_interface_on_a_missing_bridge_fails_and_leaves_nothing(
    manager: NetworkManager,
) -> None:
    bunker_id = _bid()
    with pytest.raises(NetworkError):
        await _transit(manager, _iface(bunker_id, bridge_device(_bid())), bunker_id=bunker_id)
    assert manager.attachment(bunker_id) is None
    assert f"sb{manager.tag}-{bunker_id}" not in netns.listnetns()
    assert manager.l2.ports() == []


async def test_restarted_worker_starts_without_stale_bridges_or_rules(inet: Inet) -> None:
    tag = secrets.token_hex(6)
    first = NetworkManager(tag=tag, pool=default_pool(tag), uplink_netns=inet.name)
    await first.start()
    device = bridge_device(_bid())
    await first.l2.create_bridge(device, None)
    bunker_id = _bid()
    await _transit(first, _iface(bunker_id, device), bunker_id=bunker_id)
    # The worker dies without cleaning up (no close()); a new process starts on the same tag.
    second = NetworkManager(tag=tag, pool=default_pool(tag), uplink_netns=inet.name)
    removed = await second.start()
    try:
        assert f"sb{tag}-l2" in removed and f"sb{tag}-{bunker_id}" in removed
        assert second.l2.bridges() == [] and second.l2.ports() == []
        guard_sets = [r["set"] for r in await second.l2.ruleset() if "set" in r]
        assert guard_sets and all(not s.get("elem") for s in guard_sets)
    finally:
        if first._exec is not None:
            first._exec.close()
        if first.l2._exec is not None:
            first.l2._exec.close()
        await second.close()
    assert second.leftovers() == []


def _create_params(profile: str, interfaces: object) -> dict[str, object]:
    return {
        "bunker": {
            "id": "bnk_x",
            "cpu_millicores": 100,
            "memory_mb": 128,
            "disk_mb": 64,
            "network_profile": profile,
            "interfaces": interfaces,
        },
        "image": {"id": "img_x", "source": {"kind": "tar", "path": "/x"}},
        "network": {"dns_upstreams": []},
    }


def test_bunker_create_interface_params_are_checked() -> None:
    good = {"if_name": "net1", "mac": "02:AA:00:00:00:01", "spoof_guard": False, "device": "br1"}
    request = CreateRequest.from_params("bnk_x", _create_params("transit", [good]))
    assert request.network is not None
    assert request.network.interfaces == (
        InterfaceRequest("net1", "02:aa:00:00:00:01", False, "br1"),
    )
    bad = [
        ("transit", None),
        ("transit", []),
        ("unrestricted", [good]),
        ("transit", [good, good]),
        ("transit", [{**good, "if_name": "eth0"}]),
        ("transit", [{**good, "mac": "01:00:5e:00:00:01"}]),
        ("transit", [{**good, "device": "br-1"}]),
        ("transit", [{**good, "spoof_guard": "no"}]),
        ("transit", [good] * 9),
    ]
    for profile, interfaces in bad:
        with pytest.raises(TaskFailed) as failed:
            CreateRequest.from_params("bnk_x", _create_params(profile, interfaces))
        assert failed.value.code == "VALIDATION_ERROR", (profile, interfaces)

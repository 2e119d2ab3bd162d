"""Bridges and transit bunkers end to end: a real controller, worker and busybox bunkers
(SPEC §8.6, §8.8, §1.7).

A transit bunker's network namespace belongs to its own user namespace and its root holds
CAP_NET_ADMIN and CAP_NET_RAW, so the bunkers set their addresses and MACs themselves (exec as
root); other bunkers still cannot touch their interfaces. Forged frames are also sent from the
bunkers' namespaces with AF_PACKET sockets.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from scaigrid.modules.scaibunker.network.bridges import bridge_device
from scaigrid.worker.net.manager import worker_tag
from scaigrid.worker.net.userns import USERNS_DIR
from tests.fixtures.fleet import ExtraWorker, wait_online
from tests.fixtures.stack import BASE, Stack, StackError, build_busybox_tar, start_stack
from tests.network.conftest import DNS_IP, HTTP_PORT, WEB_IPS, Inet
from tests.network.test_l2 import FORGED, _exchange

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def l2_stack(inet: Inet) -> Iterator[Stack]:
    data_dir = Path(tempfile.mkdtemp(prefix="scaibunker-l2-", dir="/var/tmp"))
    try:
        running = start_stack(
            data_dir,
            {"SCAIBUNKER_NET_UPLINK_NETNS": inet.name, "SCAIBUNKER_DNS_UPSTREAMS": DNS_IP},
        )
    except StackError as exc:
        pytest.fail(str(exc))
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def busybox(l2_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A busybox image in platform scope, so the tests' other tenants can use it too."""
    tar_path = build_busybox_tar(tmp_path_factory.mktemp("busybox-l2"))
    with l2_stack.client() as admin:
        response = admin.post(
            f"{BASE}/images",
            json={
                "name": "busybox-l2",
                "scope": "platform",
                "source": {"kind": "tar", "path": str(tar_path)},
            },
        )
    assert response.status_code == 201, response.text
    l2_stack.wait_image("busybox-l2")
    return "busybox-l2"


def _data(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()["data"]


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    return dict(error)


def _dev_worker(stack: Stack) -> str:
    with stack.client() as client:
        return str(_data(client.get(f"{BASE}/workers"))[0]["id"])


def _tag(stack: Stack) -> str:
    return worker_tag(stack.data_dir / "worker")


def _bridge(stack: Stack, name: str, **fields: Any) -> dict[str, Any]:
    with stack.client() as client:
        body = {"name": name, "worker_id": _dev_worker(stack), **fields}
        return dict(_data(client.post(f"{BASE}/bridges", json=body), 201))


def _transit(stack: Stack, image: str, key: str | None = None, **interface: Any) -> dict[str, Any]:
    with stack.client(key) as client:
        response = client.post(
            f"{BASE}/bunkers",
            params={"wait_s": 60},
            json={"image": image, "network_profile": "transit", "interfaces": [interface]},
        )
    bunker = _data(response, 201)
    assert bunker["status"] == "running", bunker
    return dict(bunker)


def _sh(
    stack: Stack, bunker_id: str, script: str, key: str | None = None, **extra: Any
) -> dict[str, Any]:
    with stack.client(key) as client:
        response = client.post(
            f"{BASE}/bunkers/{bunker_id}/exec", json={"command": script, "timeout_s": 30, **extra}
        )
    return dict(_data(response))


def _root(stack: Stack, bunker_id: str, script: str, key: str | None = None) -> dict[str, Any]:
    """``_sh`` as root; asserts it exited 0."""
    result = _sh(stack, bunker_id, script, key, user="root")
    assert result["exit_code"] == 0, result
    return result


def _pings(stack: Stack, bunker_id: str, address: str, key: str | None = None) -> bool:
    """Whether ``address`` answers a ping from ``bunker_id`` (three tries, 1 s each)."""
    script = f"ping -c 1 -W 1 {address} || ping -c 1 -W 1 {address} || ping -c 1 -W 1 {address}"
    return bool(_sh(stack, bunker_id, script, key, user="root")["exit_code"] == 0)


def _net_caps(stack: Stack, bunker_id: str) -> tuple[bool, bool]:
    """(CAP_NET_ADMIN, CAP_NET_RAW) in the effective set of a root exec in ``bunker_id``."""
    status = _sh(stack, bunker_id, "grep CapEff /proc/self/status", user="root")["stdout"]
    caps = int(status.split()[1], 16)
    return bool(caps >> 12 & 1), bool(caps >> 13 & 1)


def _userns_files(bunker_id: str) -> list[str]:
    return [p.name for p in USERNS_DIR.glob(f"*{bunker_id}")] if USERNS_DIR.exists() else []


def _terminate(stack: Stack, bunker_id: str) -> None:
    with stack.client() as client:
        _data(client.delete(f"{BASE}/bunkers/{bunker_id}"))


def _ip(*argv: str) -> str:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, check=True).stdout


def _netns_list() -> str:
    return _ip("netns", "list")


def _tenant_user(stack: Stack, name: str, permissions: list[str]) -> tuple[str, str]:
    """A new tenant with one user holding ``permissions``; returns (tenant_id, api key)."""
    with stack.client() as admin:
        tenant = _data(admin.post("/v1/tenants", json={"name": name}), 201)
        user = _data(
            admin.post("/v1/users", json={"email": f"dev@{name}.test", "tenant_id": tenant["id"]}),
            201,
        )
        key = _data(admin.post("/v1/api-keys", json={"name": "k", "user_id": user["id"]}), 201)
        _data(
            admin.put(
                f"/v1/users/{user['id']}/module-permissions", json={"permissions": permissions}
            )
        )
    return str(tenant["id"]), str(key["key"])


def test_bridge_routes(l2_stack: Stack) -> None:
    bridge = _bridge(l2_stack, "routes-a", vlan_id=12)
    assert bridge["id"].startswith("brg_") and bridge["vlan_id"] == 12
    assert set(bridge) == {"id", "name", "tenant_id", "worker_id", "vlan_id", "created_at"}
    device_links = _ip("-n", f"sb{_tag(l2_stack)}-l2", "-o", "link", "show", "type", "bridge")
    assert device_links.count(": br") >= 1
    other_tenant, other_key = _tenant_user(
        l2_stack, "l2-routes-other", ["scaibunker:create", "scaibunker:network:transit"]
    )
    with l2_stack.client() as client:
        body = {"name": "routes-a", "worker_id": bridge["worker_id"]}
        _error(client.post(f"{BASE}/bridges", json=body), 409, "SLUG_CONFLICT")
        bad = client.post(f"{BASE}/bridges", json={**body, "name": "Bad_Name"})
        _error(bad, 422, "VALIDATION_ERROR")
        _error(
            client.post(f"{BASE}/bridges", json={**body, "vlan_id": 4095}), 422, "VALIDATION_ERROR"
        )
        missing = client.post(f"{BASE}/bridges", json={"name": "x", "worker_id": "wrk_nope"})
        _error(missing, 404, "WORKER_NOT_FOUND")
        # The same name in another tenant is fine (names are unique per tenant).
        theirs = _data(
            client.post(f"{BASE}/bridges", json={**body, "tenant_id": other_tenant}), 201
        )
        assert theirs["tenant_id"] == other_tenant
        assert _data(client.get(f"{BASE}/bridges/{bridge['id']}"))["name"] == "routes-a"
        listed = client.get(f"{BASE}/bridges", params={"worker_id": bridge["worker_id"]})
        assert {b["id"] for b in _data(listed)} >= {bridge["id"], theirs["id"]}
        _error(client.get(f"{BASE}/bridges/brg_nope"), 404, "BRIDGE_NOT_FOUND")
    with l2_stack.client(other_key) as client:
        # Transit users read their own tenant's bridges only and cannot manage them.
        assert [b["id"] for b in _data(client.get(f"{BASE}/bridges"))] == [theirs["id"]]
        _error(client.get(f"{BASE}/bridges/{bridge['id']}"), 404, "BRIDGE_NOT_FOUND")
        denied = client.post(f"{BASE}/bridges", json={"name": "mine", "worker_id": "wrk_x"})
        _error(denied, 403, "AUTHZ_PERMISSION_DENIED")
        _error(client.delete(f"{BASE}/bridges/{theirs['id']}"), 403, "AUTHZ_PERMISSION_DENIED")
    with l2_stack.client() as client:
        for item in (bridge, theirs):
            assert _data(client.delete(f"{BASE}/bridges/{item['id']}")) == {
                "id": item["id"],
                "deleted": True,
            }
        _error(client.get(f"{BASE}/bridges/{bridge['id']}"), 404, "BRIDGE_NOT_FOUND")
    remaining = _ip("-n", f"sb{_tag(l2_stack)}-l2", "-o", "link", "show", "type", "bridge")
    assert "br" not in remaining.replace("bridge", "")


def test_two_transit_bunkers_exchange_frames_and_spoofing_is_dropped(
    l2_stack: Stack, busybox: str
) -> None:
    bridge = _bridge(l2_stack, "lan-frames")
    a = _transit(l2_stack, busybox, if_name="net1", bridge_name="lan-frames")
    b = _transit(
        l2_stack, busybox, if_name="lan0", bridge_name="lan-frames", mac="02:00:00:00:0b:01"
    )
    tag = _tag(l2_stack)
    ns_a, ns_b = f"sb{tag}-{a['id']}", f"sb{tag}-{b['id']}"
    try:
        assert b["interfaces"] == [
            {
                "if_name": "lan0",
                "bridge_name": "lan-frames",
                "spoof_guard": True,
                "mac": "02:00:00:00:0b:01",
            }
        ]
        mac_a = a["interfaces"][0]["mac"]
        assert a["isolation"] == "container" and a["worker_id"] == bridge["worker_id"]
        # Inside the bunkers: eth0 plus the interface with its MAC.
        links = _sh(l2_stack, a["id"], "cat /sys/class/net/net1/address; ls /sys/class/net")
        assert mac_a in links["stdout"] and "eth0" in links["stdout"], links
        # Transit eth0 is unrestricted egress.
        got = _sh(
            l2_stack,
            a["id"],
            f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {WEB_IPS[0]} {HTTP_PORT}",
        )
        assert f"hello from {WEB_IPS[0]}" in got["stdout"], got
        # The bunkers configure their own interfaces, as an appliance image would.
        assert _net_caps(l2_stack, a["id"]) == (True, True)
        assert _userns_files(a["id"]) == [ns_a] and _userns_files(b["id"]) == [ns_b]
        _root(l2_stack, a["id"], "ip addr add 10.77.0.1/24 dev net1 && ip link set net1 up")
        _root(l2_stack, b["id"], "ip addr add 10.77.0.2/24 dev lan0 && ip link set lan0 up")
        assert "10.77.0.2/24" in _ip("-n", ns_b, "-o", "addr", "show", "dev", "lan0")
        assert _pings(l2_stack, a["id"], "10.77.0.2")
        # TCP between the bunkers over the bridge.
        # The listener restarts after each connection (one that a loaded machine cut short
        # must not leave nobody listening); the sender retries until the text arrived.
        _sh(l2_stack, b["id"], "while :; do nc -l -p 7000 >> /tmp/got; done", background=True)
        sent = ""
        for _ in range(40):
            sent = _sh(l2_stack, a["id"], "echo over-the-bridge | nc -w 2 10.77.0.2 7000")["stdout"]
            if "over-the-bridge" in _sh(l2_stack, b["id"], "cat /tmp/got")["stdout"]:
                break
            time.sleep(0.25)
        assert "over-the-bridge" in _sh(l2_stack, b["id"], "cat /tmp/got")["stdout"], sent
        # The bunkers' own MACs pass; a forged source MAC is dropped at the bridge port.
        assert asyncio.run(_exchange((ns_a, "net1"), (ns_b, "lan0"), mac_a))
        assert not asyncio.run(_exchange((ns_a, "net1"), (ns_b, "lan0"), FORGED))
        assert not asyncio.run(_exchange((ns_b, "lan0"), (ns_a, "net1"), FORGED))
        # A bunker that changes its own MAC is cut off by spoof_guard, and is back with its
        # own MAC again.
        _root(l2_stack, a["id"], f"ip link set dev net1 address {FORGED}")
        assert not _pings(l2_stack, a["id"], "10.77.0.2")
        _root(l2_stack, a["id"], f"ip link set dev net1 address {mac_a}")
        assert _pings(l2_stack, a["id"], "10.77.0.2")
        with l2_stack.client() as client:
            in_use = client.delete(f"{BASE}/bridges/{bridge['id']}")
            _error(in_use, 409, "RESOURCE_IN_USE")
    finally:
        _terminate(l2_stack, a["id"])
        _terminate(l2_stack, b["id"])
    # Ending the bunkers removed their namespaces, user namespaces and bridge ports.
    assert a["id"] not in _netns_list() and b["id"] not in _netns_list()
    assert _userns_files(a["id"]) == [] and _userns_files(b["id"]) == []
    ports = _ip("-n", f"sb{tag}-l2", "-o", "link", "show", "master", _device(l2_stack, bridge))
    assert ports.strip() == "", ports
    with l2_stack.client() as client:
        _data(client.delete(f"{BASE}/bridges/{bridge['id']}"))


def _device(stack: Stack, bridge: dict[str, Any]) -> str:
    return bridge_device(bridge["id"])


def test_spoof_guard_off_needs_l2_transparency_and_is_audited(
    l2_stack: Stack, busybox: str
) -> None:
    tenant_id, key = _tenant_user(
        l2_stack, "l2-guard", ["scaibunker:create", "scaibunker:network:transit"]
    )
    _bridge(l2_stack, "open-lan", tenant_id=tenant_id)
    open_port = {"if_name": "tap0", "bridge_name": "open-lan", "spoof_guard": False}
    with l2_stack.client(key) as client:
        denied = client.post(
            f"{BASE}/bunkers",
            json={"image": busybox, "network_profile": "transit", "interfaces": [open_port]},
        )
        error = _error(denied, 403, "AUTHZ_PERMISSION_DENIED")
        assert error["details"] == {"permission": "scaibunker:l2_transparency"}
        # With spoof_guard on, the same user may attach.
        guarded = _transit(l2_stack, busybox, key, if_name="tap0", bridge_name="open-lan")
    user_id = None
    with l2_stack.client() as admin:
        users = _data(admin.get("/v1/users", params={"tenant_id": tenant_id}))
        user_id = users[0]["id"]
        _data(
            admin.put(
                f"/v1/users/{user_id}/module-permissions",
                json={
                    "permissions": [
                        "scaibunker:create",
                        "scaibunker:network:transit",
                        "scaibunker:l2_transparency",
                        "scaibunker:execute",
                        "scaibunker:root",
                    ]
                },
            )
        )
    opened = _transit(l2_stack, busybox, key, **open_port)
    tag = _tag(l2_stack)
    try:
        assert opened["interfaces"][0]["spoof_guard"] is False
        ns_open, ns_guarded = f"sb{tag}-{opened['id']}", f"sb{tag}-{guarded['id']}"
        # Forged frames leave the unguarded interface and reach the other bunker.
        assert asyncio.run(_exchange((ns_open, "tap0"), (ns_guarded, "tap0"), FORGED))
        assert not asyncio.run(_exchange((ns_guarded, "tap0"), (ns_open, "tap0"), FORGED))
        # The same from inside: a bunker changing its MAC still reaches the other bunker
        # through the unguarded port, not through the guarded one.
        up = "dev tap0 && ip link set tap0 up"
        _root(l2_stack, opened["id"], f"ip addr add 10.78.0.1/24 {up}", key)
        _root(l2_stack, guarded["id"], f"ip addr add 10.78.0.2/24 {up}", key)
        _root(l2_stack, opened["id"], f"ip link set dev tap0 address {FORGED}", key)
        assert _pings(l2_stack, opened["id"], "10.78.0.2", key)
        _root(l2_stack, guarded["id"], "ip link set dev tap0 address 02:de:ad:be:ef:02", key)
        assert not _pings(l2_stack, guarded["id"], "10.78.0.1", key)
        with l2_stack.client() as admin:
            records = _data(
                admin.get("/v1/audit-log", params={"action": "scaibunker.bunker.l2_transparency"})
            )
        mine = [r for r in records if r["resource_id"].startswith(opened["id"])]
        assert len(mine) == 1, records
        assert mine[0]["resource_id"] == f"{opened['id']}/tap0@open-lan"
        assert mine[0]["actor_id"] == user_id and mine[0]["tenant_id"] == tenant_id
        assert not [r for r in records if r["resource_id"].startswith(guarded["id"])]
    finally:
        with l2_stack.client(key) as client:
            for bunker in (opened, guarded):
                _data(client.delete(f"{BASE}/bunkers/{bunker['id']}"))


def test_other_bunkers_cannot_configure_their_network(l2_stack: Stack, busybox: str) -> None:
    with l2_stack.client() as client:
        response = client.post(
            f"{BASE}/bunkers",
            params={"wait_s": 60},
            json={"image": busybox, "network_profile": "unrestricted"},
        )
    bunker = _data(response, 201)
    try:
        assert _net_caps(l2_stack, bunker["id"]) == (False, False)
        assert _userns_files(bunker["id"]) == []
        down = _sh(l2_stack, bunker["id"], "ip link set lo down", user="root")
        assert down["exit_code"] != 0, down
        forge = _sh(l2_stack, bunker["id"], "ip addr add 10.79.0.1/32 dev eth0", user="root")
        assert forge["exit_code"] != 0, forge
    finally:
        _terminate(l2_stack, bunker["id"])


def test_interface_errors(l2_stack: Stack, busybox: str) -> None:
    other_tenant, _ = _tenant_user(l2_stack, "l2-errors-other", ["scaibunker:create"])
    _bridge(l2_stack, "theirs", tenant_id=other_tenant)
    _bridge(l2_stack, "ours-err")
    one = [{"if_name": "net1", "bridge_name": "ours-err"}]
    with l2_stack.client() as client:

        def create(**fields: Any) -> httpx.Response:
            return client.post(f"{BASE}/bunkers", json={"image": busybox, **fields})

        _error(
            create(network_profile="unrestricted", interfaces=one), 422, "INTERFACES_NOT_ALLOWED"
        )
        _error(create(interfaces=one), 422, "INTERFACES_NOT_ALLOWED")
        _error(create(network_profile="transit"), 422, "TRANSIT_MISSING_INTERFACES")
        _error(create(network_profile="transit", interfaces=[]), 422, "TRANSIT_MISSING_INTERFACES")
        for name in ("no-such-bridge", "theirs"):
            error = _error(
                create(
                    network_profile="transit",
                    interfaces=[*one, {"if_name": "net2", "bridge_name": name}],
                ),
                422,
                "VALIDATION_ERROR",
            )
            assert [d["field"] for d in error["details"]] == ["interfaces[1].bridge_name"]
        bad_name = create(
            network_profile="transit", interfaces=[{"if_name": "eth0", "bridge_name": "ours-err"}]
        )
        error = _error(bad_name, 422, "VALIDATION_ERROR")
        assert [d["field"] for d in error["details"]] == ["interfaces[0].if_name"]
        microvm = create(network_profile="transit", interfaces=one, isolation="microvm")
        _error(microvm, 503, "NO_SUITABLE_WORKER")


def test_restarted_worker_gets_its_bridges_back_without_stale_ports(
    l2_stack: Stack, busybox: str, inet: Inet, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="scaibunker-l2w-", dir="/var/tmp"))
    monkeypatch.setenv("SCAIBUNKER_NET_UPLINK_NETNS", inet.name)
    worker = ExtraWorker(l2_stack, data_dir)
    try:
        with l2_stack.client() as client:
            token = _data(client.post(f"{BASE}/workers/join-tokens", json={}), 201)["token"]
            worker.start(token)
            worker_id = wait_online(client, "fleet-extra", 120)["id"]
            bridge = _data(
                client.post(f"{BASE}/bridges", json={"name": "survivor", "worker_id": worker_id}),
                201,
            )
        l2_ns = f"sb{worker_tag(data_dir)}-l2"
        device = _device(l2_stack, bridge)
        # A transit bunker on it: its namespace and user namespace must not outlive the crash.
        # (A lazily pulled image: the worker joined after the busybox image was prepared.)
        with l2_stack.client() as client:
            source = {"kind": "tar", "path": str(build_busybox_tar(data_dir / "bb"))}
            body = {"name": "busybox-lazy", "source": source, "lazy_pull": True}
            _data(client.post(f"{BASE}/images", json=body), 201)
        l2_stack.wait_image("busybox-lazy")
        crashed = _transit(l2_stack, "busybox-lazy", if_name="net1", bridge_name="survivor")
        assert crashed["worker_id"] == worker_id
        crashed_ns = f"sb{worker_tag(data_dir)}-{crashed['id']}"
        assert _userns_files(crashed["id"]) == [crashed_ns]
        assert device in _ip("-n", l2_ns, "-o", "link", "show", "type", "bridge")
        # A stale port on the bridge (what a crashed worker's bunker would leave).
        _ip("-n", l2_ns, "link", "add", "pstale0", "type", "veth", "peer", "name", "pstale1")
        _ip("-n", l2_ns, "link", "set", "pstale0", "master", device)
        worker.kill()
        with l2_stack.client() as client:
            deadline = time.monotonic() + 60
            while _data(client.get(f"{BASE}/workers/{worker_id}"))["connection"] == "online":
                assert time.monotonic() < deadline, "the killed worker stayed online"
                time.sleep(0.5)
            # While the worker is away: no bridge can be made on it, and a transit bunker
            # naming its bridge cannot be placed anywhere else.
            away = client.post(f"{BASE}/bridges", json={"name": "late", "worker_id": worker_id})
            _error(away, 503, "WORKER_UNAVAILABLE")
            pinned = client.post(
                f"{BASE}/bunkers",
                json={
                    "image": busybox,
                    "network_profile": "transit",
                    "interfaces": [{"if_name": "net1", "bridge_name": "survivor"}],
                },
            )
            _error(pinned, 503, "WORKER_UNAVAILABLE")
            worker.start()
            wait_online(client, "fleet-extra", 120)
        deadline = time.monotonic() + 30
        while device not in _ip("-n", l2_ns, "-o", "link", "show", "type", "bridge"):
            assert time.monotonic() < deadline, "the controller did not re-create the bridge"
            time.sleep(0.5)
        assert "pstale" not in _ip("-n", l2_ns, "-o", "link")
        assert crashed_ns not in _netns_list() and _userns_files(crashed["id"]) == []
        with l2_stack.client() as client:
            client.delete(f"{BASE}/bunkers/{crashed['id']}")
            _data(client.delete(f"{BASE}/bridges/{bridge['id']}"))
        assert device not in _ip("-n", l2_ns, "-o", "link")
    finally:
        worker.stop()
        shutil.rmtree(data_dir, ignore_errors=True)

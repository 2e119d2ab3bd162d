"""Network profiles from inside real bunkers: a real controller, worker and busybox bunkers.

The worker's router uplink is the test internet namespace and the controller's upstream
resolver is that namespace's DNS server, so no traffic leaves this host's test namespaces.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.stack import BASE, Stack, StackError, build_busybox_tar, start_stack
from tests.network.conftest import DNS_IP, HTTP_PORT, METADATA_IP, WEB_IPS, Inet

pytestmark = pytest.mark.e2e

# Inside a bunker: the gateway (= its DNS resolver) and an HTTP GET with a 2 s limit.
GATEWAY = "$(ip route | awk '/^default/ {print $3}')"


def _get(ip: str, port: int = HTTP_PORT) -> str:
    return f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} {port}"


@pytest.fixture(scope="module")
def net_stack(inet: Inet) -> Iterator[Stack]:
    data_dir = Path(tempfile.mkdtemp(prefix="scaibunker-net-", dir="/var/tmp"))
    try:
        running = start_stack(
            data_dir,
            {
                "SCAIBUNKER_NET_UPLINK_NETNS": inet.name,
                "SCAIBUNKER_DNS_UPSTREAMS": DNS_IP,
                "SCAIGRID_USAGE_INTERVAL_S": "2",
            },
        )
    except StackError as exc:
        pytest.fail(str(exc))
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def busybox(net_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> str:
    tar_path = build_busybox_tar(tmp_path_factory.mktemp("busybox-net"))
    net_stack.register_image("busybox", {"kind": "tar", "path": str(tar_path)})
    return "busybox"


def _create(stack: Stack, image: str, **fields: Any) -> dict[str, Any]:
    with stack.client() as client:
        response = client.post(
            f"{BASE}/bunkers", params={"wait_s": 60}, json={"image": image, **fields}
        )
    assert response.status_code == 201, response.text
    bunker = response.json()["data"]
    assert bunker["status"] == "running", bunker
    return dict(bunker)


def _sh(stack: Stack, bunker_id: str, script: str) -> dict[str, Any]:
    with stack.client() as client:
        response = client.post(
            f"{BASE}/bunkers/{bunker_id}/exec",
            json={"command": script, "timeout_s": 30, "user": "root"},
        )
    assert response.status_code == 200, response.text
    return dict(response.json()["data"])


def _terminate(stack: Stack, bunker_id: str) -> None:
    with stack.client() as client:
        assert client.delete(f"{BASE}/bunkers/{bunker_id}").status_code == 200


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_isolated_bunker_has_only_loopback(net_stack: Stack, busybox: str) -> None:
    bunker = _create(net_stack, busybox)
    try:
        links = _sh(net_stack, bunker["id"], "ip -o link | awk '{print $2}'")
        assert links["stdout"].split() == ["lo:"]
        assert _sh(net_stack, bunker["id"], _get(WEB_IPS[0]))["exit_code"] != 0
        assert bunker["id"] not in _namespaces()
    finally:
        _terminate(net_stack, bunker["id"])


def test_unrestricted_bunker(net_stack: Stack, busybox: str, inet: Inet) -> None:
    inet.set_zone({"web.test": [WEB_IPS[1]]})
    bunker = _create(net_stack, busybox, network_profile="unrestricted")
    try:
        for ip in WEB_IPS:
            result = _sh(net_stack, bunker["id"], _get(ip))
            assert f"hello from {ip}" in result["stdout"], result
        for ip in (METADATA_IP, "127.0.0.1"):
            assert "hello" not in _sh(net_stack, bunker["id"], _get(ip))["stdout"], ip
        # The worker wrote /etc/resolv.conf naming the bunker's resolver.
        conf = _sh(net_stack, bunker["id"], f"cat /etc/resolv.conf; echo gw={GATEWAY}")
        gateway = conf["stdout"].rsplit("gw=", 1)[1].strip()
        assert f"nameserver {gateway}" in conf["stdout"], conf
        looked_up = _sh(net_stack, bunker["id"], "nslookup web.test")
        assert WEB_IPS[1] in looked_up["stdout"], looked_up
        assert bunker["id"] in _namespaces()
    finally:
        _terminate(net_stack, bunker["id"])
    assert bunker["id"] not in _namespaces()


def _billed_egress(stack: Stack, bunker_id: str) -> int:
    with stack.client() as client:
        response = client.get("/v1/accounting/usage", params={"bunker_id": bunker_id})
    assert response.status_code == 200, response.text
    return sum(int(row["egress_bytes"]) for row in response.json()["data"])


def test_egress_bytes_are_measured_and_billed(net_stack: Stack, busybox: str) -> None:
    """Bytes a bunker sends out of the uplink reach its usage records (SPEC §1.9), including
    those sent just before it was terminated (read from the worker at destroy)."""
    bunker = _create(net_stack, busybox, network_profile="unrestricted")
    sent = 3 * 1024 * 1024
    try:
        result = _sh(
            net_stack,
            bunker["id"],
            f"head -c {sent} /dev/zero | nc -w 5 {WEB_IPS[0]} 9009",
        )
        assert result["stdout"].strip() == str(sent), result
    finally:
        _terminate(net_stack, bunker["id"])
    deadline = time.monotonic() + 30
    billed = _billed_egress(net_stack, bunker["id"])
    while billed < sent and time.monotonic() < deadline:
        time.sleep(1)
        billed = _billed_egress(net_stack, bunker["id"])
    # Payload plus TCP/IP headers, and nothing like the traffic of other bunkers.
    assert sent <= billed < sent * 1.2, billed


def test_allowlisted_bunker(net_stack: Stack, busybox: str, inet: Inet) -> None:
    inet.set_zone({"api.test": [WEB_IPS[0]], "other.test": [WEB_IPS[2]]})
    bunker = _create(
        net_stack, busybox, network_profile="allowlisted", network_allowlist=["API.test"]
    )
    try:
        assert bunker["network_allowlist"] == ["api.test"]
        before = _sh(net_stack, bunker["id"], _get(WEB_IPS[0]))
        assert "hello" not in before["stdout"], before
        asked_before = len(inet.queried())
        refused = _sh(net_stack, bunker["id"], f"nslookup leak-1234.api.test {GATEWAY}")
        assert "leak" not in " ".join(inet.queried()[asked_before:])
        assert WEB_IPS[0] not in refused["stdout"]
        allowed = _sh(net_stack, bunker["id"], f"nslookup api.test {GATEWAY} && {_get(WEB_IPS[0])}")
        assert f"hello from {WEB_IPS[0]}" in allowed["stdout"], allowed
        other = _sh(net_stack, bunker["id"], _get(WEB_IPS[2]))
        assert "hello" not in other["stdout"], other
    finally:
        _terminate(net_stack, bunker["id"])
    assert bunker["id"] not in _namespaces()
    # Terminating flushes the bunker's audit batch; the API streams it back.
    with net_stack.client() as client:
        response = client.get(f"{BASE}/bunkers/{bunker['id']}/audit/egress")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    records = [json.loads(line) for line in response.text.splitlines()]
    assert [r["ts"] for r in records] == sorted(r["ts"] for r in records)
    dns = {(r["dns_name"], r["verdict"]) for r in records if r["proto"] == "dns"}
    assert ("leak-1234.api.test", "deny") in dns and ("api.test", "allow") in dns
    denied = {(r["dst_ip"], r["dst_port"]) for r in records if r["proto"] == "tcp"}
    assert {(WEB_IPS[0], HTTP_PORT), (WEB_IPS[2], HTTP_PORT)} <= denied
    assert all(r["tenant_id"] == bunker["tenant_id"] for r in records)
    with net_stack.client() as client:
        empty = client.get(
            f"{BASE}/bunkers/{bunker['id']}/audit/egress",
            params={"since": "2000-01-01T00:00:00Z", "until": "2000-01-02T00:00:00Z"},
        )
    assert empty.status_code == 200 and empty.text == ""


def test_bad_allowlist_entry_is_a_422_naming_it(net_stack: Stack) -> None:
    with net_stack.client() as client:
        response = client.post(
            f"{BASE}/bunkers",
            json={
                "image": "busybox",
                "network_profile": "allowlisted",
                "network_allowlist": ["ok.example.com", "https://x.com"],
            },
        )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert [d["field"] for d in error["details"]] == ["network_allowlist[1]"]

"""Real namespaces for the network tests.

``inet``: a test "internet" namespace that is the worker router's uplink. It serves HTTP on
every one of its addresses (port :data:`HTTP_PORT`) and DNS on :data:`DNS_IP` from a zone file
the tests edit, logging every name it is asked. Nothing leaves loopback and these namespaces.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dnslib import DNSRecord
from pyroute2 import IPRoute, netns

from scaigrid.worker.net.manager import (
    NetworkManager,
    create_netns,
    default_pool,
    ipr_in,
    run_in_netns,
)

HTTP_PORT = 8080
DNS_IP = "198.18.0.53"
WEB_IPS = ("198.18.0.10", "198.18.0.11", "198.18.0.12")
METADATA_IP = "169.254.169.254"
SERVER = Path(__file__).with_name("inet_server.py")


@dataclass
class Inet:
    """The test internet namespace and its DNS server's files."""

    name: str
    zone: Path
    query_log: Path
    process: subprocess.Popen[bytes]

    def set_zone(self, zone: dict[str, list[str]]) -> None:
        """Replace the DNS answers (read by the server on every query)."""
        tmp = self.zone.with_suffix(".tmp")
        tmp.write_text(json.dumps(zone))
        tmp.replace(self.zone)

    def queried(self) -> list[str]:
        """Every name the DNS server was asked so far."""
        return self.query_log.read_text().split() if self.query_log.exists() else []


def _start_inet(name: str, work: Path) -> subprocess.Popen[bytes]:

    def addresses(ipr: IPRoute) -> None:
        index = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=index, state="up")
        for ip in (*WEB_IPS, DNS_IP, METADATA_IP):
            ipr.addr("add", index=index, address=ip, prefixlen=32)

    ipr_in(name, addresses)
    zone, log = work / "zone.json", work / "queries.log"
    zone.write_text("{}")
    process = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            name,
            sys.executable,
            str(SERVER),
            "--http-port",
            str(HTTP_PORT),
            "--dns",
            DNS_IP,
            "--zone",
            str(zone),
            "--log",
            str(log),
        ],
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    return process


@pytest.fixture(scope="session")
def inet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inet]:
    name = f"sbtest-inet-{secrets.token_hex(3)}"
    create_netns(name)
    try:
        process = _start_inet(name, work := tmp_path_factory.mktemp("inet"))
    except BaseException:
        netns.remove(name)
        raise
    zone, log = work / "zone.json", work / "queries.log"
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == b"ready"
        yield Inet(name, zone, log, process)
    finally:
        process.terminate()
        process.wait(10)
        netns.remove(name)


@pytest.fixture
async def manager(inet: Inet) -> AsyncIterator[NetworkManager]:
    tag = secrets.token_hex(6)
    mgr = NetworkManager(tag=tag, pool=default_pool(tag), uplink_netns=inet.name)
    await mgr.start()
    try:
        yield mgr
    finally:
        await mgr.close()
    assert mgr.leftovers() == []


def _connect(ip: str, port: int, timeout_s: float) -> str:
    try:
        with socket.create_connection((ip, port), timeout=timeout_s) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = sock.recv(200)
        return "ok" if data.startswith(b"HTTP/1.0 200") else f"bad answer {data[:40]!r}"
    except OSError as exc:
        return type(exc).__name__


async def connect(ns: str, ip: str, port: int = HTTP_PORT, timeout_s: float = 1.0) -> str:
    """``"ok"`` if an HTTP GET from namespace ``ns`` to ``ip:port`` worked, else the error
    class name (``ConnectionRefusedError``, ``TimeoutError``, ``OSError``...)."""
    return await asyncio.to_thread(run_in_netns, ns, lambda: _connect(ip, port, timeout_s))


def _query(server: str, name: str, qtype: str, timeout_s: float) -> DNSRecord | None:
    try:
        raw = DNSRecord.question(name, qtype).send(server, 53, timeout=timeout_s)
    except OSError:
        return None
    return DNSRecord.parse(raw)


async def resolve(
    ns: str, server: str, name: str, qtype: str = "A", timeout_s: float = 3.0
) -> DNSRecord | None:
    """Ask ``server`` for ``name`` from namespace ``ns``; ``None`` when there is no answer."""
    return await asyncio.to_thread(run_in_netns, ns, lambda: _query(server, name, qtype, timeout_s))

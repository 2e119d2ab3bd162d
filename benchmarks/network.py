"""Bunker networking benchmarks (issue #7): setup time per profile, DNS resolver latency and
HTTP throughput, each beside a baseline measured in the same run.

* **setup**: :meth:`NetworkManager.attach` (namespace, veth, addresses, route, nftables chain
  and sets, resolver socket) per profile; baseline: a bare namespace + veth + addresses +
  route with pyroute2 and nothing else. ``isolated`` adds nothing (the driver's own private
  namespace).
* **dns**: an allowed ``A`` lookup through the bunker's resolver (upstream round trip plus
  the nftables set update) and a refused lookup; baseline: the same query sent straight to the
  upstream server from a plain namespace.
* **http**: a 64 MiB GET from the test internet namespace into an ``unrestricted`` bunker
  (router, nftables, NAT); baseline: the same GET between two plain namespaces on one veth.

Run as root: ``.venv/bin/python -m benchmarks.network [--write]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dnslib import DNSRecord
from pyroute2 import IPRoute, netns

from benchmarks.run import RESULTS, percentile
from scaigrid.worker.net.manager import (
    NetRequest,
    NetworkManager,
    create_netns,
    default_pool,
    ipr_in,
    run_in_netns,
)

SECTION = "## Network profiles (issue #7)"
SERVER = Path(__file__).resolve().parents[1] / "tests" / "network" / "inet_server.py"
DNS_IP, WEB_IP, HTTP_PORT = "198.18.0.53", "198.18.0.10", 8080
TRANSFER = 64 * 1024 * 1024


def _serve(ns: str, dns_ip: str, work: Path) -> subprocess.Popen[bytes]:
    zone = work / f"zone-{ns}.json"
    zone.write_text(json.dumps({"bench.test": [WEB_IP]}))
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            str(SERVER),
            "--http-port",
            str(HTTP_PORT),
            "--dns",
            dns_ip,
            "--zone",
            str(zone),
            "--log",
            str(work / f"log-{ns}"),
        ],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    return proc


def _lo_addresses(ns: str, *ips: str) -> None:
    def add(ipr: IPRoute) -> None:
        index = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=index, state="up")
        for ip in ips:
            ipr.addr("add", index=index, address=ip, prefixlen=32)

    ipr_in(ns, add)


def _bare_plumbing(name: str, peer_ns: str) -> None:
    """Namespace + veth + addresses + route, nothing else (the setup baseline)."""
    create_netns(name)

    def outer(ipr: IPRoute) -> None:
        ipr.link("add", ifname="bv", kind="veth", peer={"ifname": "eth0", "net_ns_fd": name})
        index = ipr.link_lookup(ifname="bv")[0]
        ipr.addr("add", index=index, address="10.251.0.1", prefixlen=30)
        ipr.link("set", index=index, state="up")

    def inner(ipr: IPRoute) -> None:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        index = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=index, address="10.251.0.2", prefixlen=30)
        ipr.link("set", index=index, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway="10.251.0.1")

    ipr_in(peer_ns, outer)
    ipr_in(name, inner)


def _delete_bv(ipr: IPRoute) -> None:
    ipr.link("del", index=ipr.link_lookup(ifname="bv")[0])


def _query(ns: str, server: str, name: str) -> float:
    def ask() -> float:
        start = time.perf_counter()
        DNSRecord.parse(DNSRecord.question(name, "A").send(server, 53, timeout=3))
        return (time.perf_counter() - start) * 1000

    return run_in_netns(ns, ask)


def _download_mbit(ns: str, ip: str) -> float:
    def get() -> float:
        start = time.perf_counter()
        received = 0
        with socket.create_connection((ip, HTTP_PORT), timeout=10) as sock:
            sock.sendall(f"GET /{TRANSFER} HTTP/1.0\r\n\r\n".encode())
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        assert received > TRANSFER
        return received * 8 / (time.perf_counter() - start) / 1e6

    return run_in_netns(ns, get)


async def _timed_async(action: Callable[[], Any], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await action()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def measure(n: int, transfers: int) -> dict[str, list[float]]:
    """Run every measurement; durations in ms, throughput in Mbit/s."""
    work = Path(tempfile.mkdtemp(prefix="sbbench-"))
    tag = secrets.token_hex(6)
    inet, plain_a, plain_b = f"sbbench-inet-{tag}", f"sbbench-a-{tag}", f"sbbench-b-{tag}"
    for ns in (inet, plain_a, plain_b):
        create_netns(ns)
    procs: list[subprocess.Popen[bytes]] = []
    mgr = NetworkManager(tag=tag, pool=default_pool(tag), uplink_netns=inet)
    results: dict[str, list[float]] = {}
    try:
        _lo_addresses(inet, DNS_IP, WEB_IP)
        procs.append(_serve(inet, DNS_IP, work))
        await mgr.start()
        for profile in ("registry", "allowlisted", "unrestricted"):
            names = ("bench.test",) if profile in ("registry", "allowlisted") else None
            request = NetRequest(profile, allowlist=names, upstreams=(DNS_IP,))
            samples = []
            for _ in range(n):
                bid = f"bnk_{secrets.token_hex(6)}"
                start = time.perf_counter()
                await mgr.attach(bid, request)
                samples.append((time.perf_counter() - start) * 1000)
                await mgr.detach(bid)
            results[f"setup_{profile}"] = samples
        bare = []
        for i in range(n):
            name = f"sbbench-bare-{tag}-{i}"
            start = time.perf_counter()
            await asyncio.to_thread(_bare_plumbing, name, plain_a)
            bare.append((time.perf_counter() - start) * 1000)
            await asyncio.to_thread(ipr_in, plain_a, _delete_bv)
            await asyncio.to_thread(netns.remove, name)
        results["setup_bare"] = bare

        bunker = await mgr.attach(
            "bnk_dns", NetRequest("allowlisted", allowlist=("bench.test",), upstreams=(DNS_IP,))
        )
        results["dns_allowed"] = [
            await asyncio.to_thread(_query, bunker.netns, bunker.gateway, "bench.test")
            for _ in range(n)
        ]
        results["dns_refused"] = [
            await asyncio.to_thread(_query, bunker.netns, bunker.gateway, "nope.test")
            for _ in range(n)
        ]
        free = await mgr.attach("bnk_http", NetRequest("unrestricted", upstreams=(DNS_IP,)))
        results["dns_direct"] = [
            await asyncio.to_thread(_query, free.netns, DNS_IP, "bench.test") for _ in range(n)
        ]
        results["http_bunker"] = [
            await asyncio.to_thread(_download_mbit, free.netns, WEB_IP) for _ in range(transfers)
        ]

        def pair(ipr: IPRoute) -> None:
            ipr.link("add", ifname="pa", kind="veth", peer={"ifname": "pb", "net_ns_fd": plain_b})
            index = ipr.link_lookup(ifname="pa")[0]
            ipr.addr("add", index=index, address="10.252.0.1", prefixlen=30)
            ipr.link("set", index=index, state="up")

        def pair_b(ipr: IPRoute) -> None:
            index = ipr.link_lookup(ifname="pb")[0]
            ipr.addr("add", index=index, address="10.252.0.2", prefixlen=30)
            ipr.link("set", index=index, state="up")

        await asyncio.to_thread(ipr_in, plain_a, pair)
        await asyncio.to_thread(ipr_in, plain_b, pair_b)
        await asyncio.to_thread(_lo_addresses, plain_b, "10.252.1.53")
        procs.append(_serve(plain_b, "10.252.1.53", work))
        results["http_plain"] = [
            await asyncio.to_thread(_download_mbit, plain_a, "10.252.0.2") for _ in range(transfers)
        ]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        await mgr.close()
        for ns in (inet, plain_a, plain_b):
            netns.remove(ns)
    return results


def report(results: dict[str, list[float]], command: str) -> str:
    """Render the results as a Markdown section."""

    def row(label: str, key: str, base_label: str, base_key: str, unit: str) -> str:
        ours, base = results[key], results[base_key]
        p50, base_p50 = statistics.median(ours), statistics.median(base)
        return (
            f"| {label} | {len(ours)} | {p50:.1f} | {percentile(ours, 99):.1f} | {base_label} | "
            f"{base_p50:.1f} | {percentile(base, 99):.1f} | {p50 / base_p50:.2f} | {unit} |"
        )

    bare = "bare netns + veth + addrs + route"
    return (
        "\n".join(
            [
                SECTION,
                "",
                f"Command: `{command}`  ",
                f"Machine: {platform.node()}, {platform.machine()}, 2 cores shared with other "
                f"engineers' runs; run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
                "`isolated` adds no network setup (the driver's private loopback namespace). "
                "The HTTP row is in Mbit/s (higher is better; its p99 column is the 99th "
                "percentile of the samples, i.e. the fastest transfer).",
                "",
                "| measurement | n | p50 | p99 | baseline | p50 | p99 | ratio p50 | unit |",
                "|---|---|---|---|---|---|---|---|---|",
                row("network setup, `registry`", "setup_registry", bare, "setup_bare", "ms"),
                row("network setup, `allowlisted`", "setup_allowlisted", bare, "setup_bare", "ms"),
                row(
                    "network setup, `unrestricted`", "setup_unrestricted", bare, "setup_bare", "ms"
                ),
                row(
                    "DNS allowed name via bunker resolver",
                    "dns_allowed",
                    "direct to upstream",
                    "dns_direct",
                    "ms",
                ),
                row(
                    "DNS refused name via bunker resolver",
                    "dns_refused",
                    "direct to upstream",
                    "dns_direct",
                    "ms",
                ),
                row(
                    "HTTP 64 MiB GET, internet ns → bunker",
                    "http_bunker",
                    "plain ns ↔ ns veth",
                    "http_plain",
                    "Mbit/s",
                ),
            ]
        )
        + "\n"
    )


def write_section(section: str) -> None:
    """Replace (or append) this section of RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        tail = rest[rest.find("\n## ") + 1 :] if "\n## " in rest else ""
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


def main() -> None:
    """Parse arguments, measure, print (and optionally record) the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--transfers", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="record in benchmarks/RESULTS.md")
    args = parser.parse_args()
    results = asyncio.run(measure(args.n, args.transfers))
    command = f".venv/bin/python -m benchmarks.network --n {args.n} --transfers {args.transfers}"
    section = report(results, command)
    print(section)
    if args.write:
        write_section(section)


if __name__ == "__main__":
    main()

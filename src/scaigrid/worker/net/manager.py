"""Per-worker bunker networking (SPEC §8, HOST-NOTES §3).

Layout on one worker (``<tag>`` = 12 hex digits derived from the worker's data directory, so
workers sharing a host never collide):

* **Router namespace** ``sb<tag>-rtr`` holds the host side of every bunker's veth, the
  nftables table (:mod:`scaigrid.worker.net.nft`) and the DNS resolver sockets. The root
  namespace's firewall is never touched. Its ``uplink`` veth leads to the uplink namespace
  (the root namespace unless ``uplink_netns`` names another); bunker egress is masqueraded
  out of it.
* **Bunker namespace** ``sb<tag>-<bunker_id>`` with ``lo`` and ``eth0`` (the bunker's end
  of veth ``v<slot>``), IPv6 disabled. Bunkers join it through ``BunkerSpec.netns_path``.
* **Owned bunker namespace** (``transit`` bunkers, ``attach(..., owner_id_base=...)``): the
  same, but created inside a user namespace with the bunker's id mapping (owned by a uid
  leased for that bunker alone), bind-mounted at
  ``/run/scaibunker/userns/<netns name>`` (:mod:`scaigrid.worker.net.userns`), so the
  bunker's root (which joins both) can configure its own interfaces. The router drops every
  packet from its ``eth0`` whose source is not its address (:func:`nft.bunker_add`).
* **Addresses** from a pool of /30 blocks: block 0 is the uplink (``.1`` uplink side,
  ``.2`` router), block ``n`` is bunker slot ``n`` (``.1`` gateway and resolver, ``.2``
  bunker).

``isolated`` bunkers get nothing here (the driver gives them a private loopback-only
namespace). :meth:`NetworkManager.start` removes every namespace of a previous run of the
same worker (which removes its links and rules with it) before building the router afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

import structlog
from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from scaigrid.worker.net import nft
from scaigrid.worker.net.audit import EgressAudit, flow_record, now_iso
from scaigrid.worker.net.flows import Flow, read_flows
from scaigrid.worker.net.l2 import InterfaceRequest, L2Error, L2Manager
from scaigrid.worker.net.nsexec import NetnsExecutor
from scaigrid.worker.net.policy import NamePolicy
from scaigrid.worker.net.resolver import BunkerResolver, QueryRecord, parse_upstream
from scaigrid.worker.net.userns import (
    create_owned_netns,
    remove_userns,
    userns_leftovers,
)
from scaigrid.worker.rootfs.idshift import ID_RANGE_SIZE

log = structlog.get_logger(__name__)

NETNS_DIR: Final = Path("/run/netns")
CLONE_NEWNET: Final = 0x40000000
#: Seconds between records of a flow that stays open (SPEC §8.7).
FLOW_REPORT_EVERY_S: Final = 60.0
#: Seconds between reads of the per-bunker egress byte counters (the heartbeat interval).
EGRESS_REFRESH_S: Final = 5.0
#: Profiles that get a namespace and egress from this manager.
EGRESS_PROFILES: Final = frozenset({"registry", "allowlisted", "unrestricted", "transit"})
#: Destinations no bunker reaches under any profile (SPEC §8.1), besides the pool itself and
#: the worker's own addresses.
ALWAYS_DENIED: Final = (
    "0.0.0.0/8",
    "127.0.0.0/8",
    # Shared address space (RFC 6598): every worker's bunker pool and uplink link live here,
    # so other workers' bunkers and routers on the same host are never reachable.
    "100.64.0.0/10",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")

T = TypeVar("T")


class NetworkError(RuntimeError):
    """Bunker networking could not be set up or torn down."""


def worker_tag(data_dir: Path) -> str:
    """12 hex digits of the SHA-256 of the resolved data directory (as the cgroup parent)."""
    return hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]


def default_pool(tag: str) -> ipaddress.IPv4Network:
    """A /20 of ``100.64.0.0/10`` chosen by ``tag`` (1024 choices)."""
    index = int(tag, 16) % 1024
    return ipaddress.IPv4Network((int(_CGNAT.network_address) + index * 4096, 20))


@dataclass(frozen=True)
class NetRequest:
    """The network part of ``bunker.create``.

    Attributes:
        profile: SPEC §8 profile.
        allowlist: names for ``registry``/``allowlisted`` (normalised by the controller).
        upstreams: ``ip[:port]`` DNS resolvers the bunker's resolver asks.
        bandwidth_mbit: egress cap in Mbit/s, ``None`` for none.
        tenant_id: owning tenant (written into audit records).
        audit: record DNS lookups and denied flows (module config ``egress_audit``).
        interfaces: ``transit`` interfaces on tenant bridges (:mod:`scaigrid.worker.net.l2`).
    """

    profile: str
    allowlist: tuple[str, ...] | None = None
    upstreams: tuple[str, ...] = ()
    bandwidth_mbit: int | None = None
    tenant_id: str | None = None
    audit: bool = True
    interfaces: tuple[InterfaceRequest, ...] = ()


@dataclass
class _Tracked:
    """A conntrack flow being audited: its last reading and what was already reported."""

    last: Flow
    reported: tuple[int, int, int, int] = (0, 0, 0, 0)
    reported_at: float = field(default_factory=time.monotonic)


@dataclass
class Attachment:
    """One bunker's network.

    Attributes:
        bunker_id: ``bnk_`` id.
        slot: address block index.
        netns: namespace name (under ``/run/netns``).
        address: the bunker's ``eth0`` address.
        gateway: its gateway and DNS resolver address.
        ifname: the router-side interface name.
        userns_path: the user namespace owning ``netns`` (``transit`` bunkers), else
            ``None`` (the namespace belongs to the initial user namespace).
    """

    bunker_id: str
    slot: int
    netns: str
    address: str
    gateway: str
    ifname: str
    resolver: BunkerResolver | None = None
    tenant_id: str | None = None
    audit: bool = False
    open_egress: bool = False
    collected_at: str = field(default_factory=now_iso)
    names: dict[str, str] = field(default_factory=dict)
    flows: dict[int, _Tracked] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    egress_bytes: int = 0
    userns_path: str | None = None

    @property
    def netns_path(self) -> str:
        """Path a driver joins."""
        return str(NETNS_DIR / self.netns)


QuerySink = Callable[[str, QueryRecord], None]


def run_in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a short-lived thread inside namespace ``name``.

    Raises:
        OSError: the namespace does not exist; anything ``fn`` raises.
    """

    def inside() -> T:
        netns.setns(name, flags=0)
        return fn()

    return _on_thread(inside)


def create_netns(name: str) -> None:
    """Create the named namespace ``/run/netns/<name>`` without forking.

    pyroute2's ``netns.create`` and ``IPRoute(netns=...)`` fork helper processes and signal
    them; a forked child inherits asyncio's signal wake-up descriptor, so the worker's loop
    would see those signals as its own. Here a short-lived thread unshares its own network
    namespace and pyroute2 bind-mounts that thread's namespace at the name.

    Raises:
        OSError: unshare or mount failed.
    """

    def create() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"unshare(CLONE_NEWNET): {os.strerror(errno)}")
        netns.attach(name, f"self/task/{threading.get_native_id()}")

    _on_thread(create)


def ipr_in(name: str | None, fn: Callable[[IPRoute], T]) -> T:
    """Run ``fn`` with an ``IPRoute`` opened inside namespace ``name`` (``None``: this one),
    on a short-lived thread."""

    def call() -> T:
        with IPRoute() as ipr:
            return fn(ipr)

    return run_in_netns(name, call) if name else _on_thread(call)


def _on_thread(fn: Callable[[], T]) -> T:
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="netns-helper")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _write_sysctl(key: str, value: str) -> None:
    Path("/proc/sys", *key.split(".")).write_text(value)


class NetworkManager:
    """Creates and removes bunker networks on one worker.

    Args:
        tag: worker tag (:func:`worker_tag`); prefixes every namespace name.
        pool: IPv4 network of /30 blocks (at least a /29); ``None`` picks a /20 of
            ``100.64.0.0/10`` at start: :func:`default_pool`, or the next one holding no
            address of the uplink namespace (so workers on one host do not collide).
        uplink_netns: namespace the router's uplink leads to; ``None`` for the root namespace.
        deny: extra CIDRs no bunker may reach (control plane, storage, databases).
        on_query: ``(bunker_id, record)`` for every DNS query a bunker makes.
        audit: where egress audit records go (``None``: none are kept).
    """

    def __init__(
        self,
        *,
        tag: str,
        pool: ipaddress.IPv4Network | None = None,
        uplink_netns: str | None = None,
        deny: Sequence[str] = (),
        on_query: QuerySink | None = None,
        audit: EgressAudit | None = None,
    ) -> None:
        if pool is not None and pool.prefixlen > 29:
            raise ValueError("the address pool must be at least a /29")
        self.tag = tag
        self._fixed_pool = pool is not None
        self.pool = pool if pool is not None else default_pool(tag)
        self.uplink_netns = uplink_netns
        self.deny = tuple(deny)
        self.router = f"sb{tag}-rtr"
        self.uplink_peer = f"sbu{tag[:10]}"
        self._on_query = on_query
        self.audit = audit
        self._exec: NetnsExecutor | None = None
        self._nft: nft.Nft | None = None
        self._attached: dict[str, Attachment] = {}
        self._final_egress: dict[str, int] = {}
        self._egress_task: asyncio.Task[None] | None = None
        self._denied: list[ipaddress.IPv4Network] = []
        self._lock = asyncio.Lock()
        self.l2 = L2Manager(tag, in_netns=run_in_netns, ipr_in=ipr_in, create_netns=create_netns)

    # -- addresses ---------------------------------------------------------------------

    def _block(self, slot: int) -> tuple[str, str]:
        base = int(self.pool.network_address) + slot * 4
        return str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2))

    def _free_slot(self) -> int:
        used = {a.slot for a in self._attached.values()}
        for slot in range(1, self.pool.num_addresses // 4):
            if slot not in used:
                return slot
        raise NetworkError("the bunker address pool is exhausted")

    # -- lifecycle ---------------------------------------------------------------------

    def leftovers(self) -> list[str]:
        """Namespaces of this worker that exist now (router and bunkers), and
        ``userns/<name>`` for each bind-mounted user namespace of an owned one."""
        prefix = f"sb{self.tag}-"
        return sorted(
            [n for n in netns.listnetns() if n.startswith(prefix)]
            + [f"userns/{n}" for n in userns_leftovers(prefix)]
        )

    async def start(self) -> list[str]:
        """Remove a previous run's namespaces, then build the router; return what was removed.

        Raises:
            NetworkError: the router could not be built (nothing is left behind).
        """
        removed = await asyncio.to_thread(self._reconcile)
        try:
            if not self._fixed_pool:
                self.pool = await asyncio.to_thread(self._choose_pool)
            await asyncio.to_thread(self._build_router)
            self._exec = NetnsExecutor(self.router)
            self._nft = await self._exec.run(nft.Nft)
            deny = [*ALWAYS_DENIED, str(self.pool), *self.deny, *await self._worker_addresses()]
            await self._exec.run(self._nft.run, nft.base_ruleset(deny))
            self._denied = [ipaddress.IPv4Network(d, strict=False) for d in deny]
            await self.l2.start()
            if self.audit is not None:
                self.audit.start(self.collect_audit)
            self._egress_task = asyncio.create_task(self._egress_loop(), name="net-egress")
        except (OSError, NetlinkError, nft.NftError, L2Error) as exc:
            await self.close()
            raise NetworkError(f"router namespace {self.router}: {exc}") from exc
        log.info("net_router_ready", router=self.router, pool=str(self.pool), removed=removed)
        return removed

    def _reconcile(self) -> list[str]:
        removed = self.leftovers()
        for name in removed:
            if name.startswith("userns/"):
                remove_userns(name.removeprefix("userns/"))
            else:
                netns.remove(name)
        self._delete_uplink_peer()
        for name in removed:
            log.info("net_leftover_removed", netns=name)
        return removed

    def _choose_pool(self) -> ipaddress.IPv4Network:
        """The first /20 from :func:`default_pool` on that no uplink-side address falls in."""

        def taken(ipr: IPRoute) -> list[ipaddress.IPv4Address]:
            return [
                ipaddress.IPv4Address(a.get("IFA_ADDRESS"))
                for a in ipr.get_addr(family=socket.AF_INET)
                if a.get("IFA_ADDRESS")
            ]

        used = ipr_in(self.uplink_netns, taken)
        first = default_pool(self.tag)
        start = (int(first.network_address) - int(_CGNAT.network_address)) // 4096
        for step in range(1024):
            index = (start + step) % 1024
            pool = ipaddress.IPv4Network((int(_CGNAT.network_address) + index * 4096, 20))
            if not any(address in pool for address in used):
                return pool
        raise NetworkError("every /20 of 100.64.0.0/10 is in use on the uplink")

    def _delete_uplink_peer(self) -> None:
        def delete(ipr: IPRoute) -> None:
            found = ipr.link_lookup(ifname=self.uplink_peer)
            if found:
                ipr.link("del", index=found[0])

        ipr_in(self.uplink_netns, delete)

    def _build_router(self) -> None:
        create_netns(self.router)
        run_in_netns(self.router, lambda: _write_sysctl("net.ipv4.ip_forward", "1"))
        run_in_netns(self.router, lambda: _write_sysctl("net.ipv6.conf.all.disable_ipv6", "1"))
        run_in_netns(self.router, lambda: _write_sysctl("net.ipv4.conf.all.rp_filter", "1"))
        run_in_netns(self.router, lambda: _write_sysctl("net.netfilter.nf_conntrack_acct", "1"))
        run_in_netns(
            self.router, lambda: _write_sysctl("net.netfilter.nf_conntrack_timestamp", "1")
        )
        outer, inner = self._block(0)

        def outside(ipr: IPRoute) -> None:
            ipr.link(
                "add",
                ifname=self.uplink_peer,
                kind="veth",
                peer={"ifname": nft.UPLINK_IF, "net_ns_fd": self.router},
            )
            index = ipr.link_lookup(ifname=self.uplink_peer)[0]
            ipr.addr("add", index=index, address=outer, prefixlen=30)
            ipr.link("set", index=index, state="up")

        def inside(ipr: IPRoute) -> None:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            index = ipr.link_lookup(ifname=nft.UPLINK_IF)[0]
            ipr.addr("add", index=index, address=inner, prefixlen=30)
            ipr.link("set", index=index, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=outer)

        ipr_in(self.uplink_netns, outside)
        ipr_in(self.router, inside)

    async def _worker_addresses(self) -> list[str]:
        def collect(ipr: IPRoute) -> list[str]:
            return [
                str(a.get("IFA_ADDRESS"))
                for a in ipr.get_addr(family=socket.AF_INET)
                if a.get("IFA_ADDRESS")
            ]

        outer, _ = self._block(0)
        return sorted({*await asyncio.to_thread(ipr_in, None, collect), outer})

    async def close(self) -> None:
        """Detach every bunker and remove the router namespace (worker shutdown)."""
        if self._egress_task is not None:
            self._egress_task.cancel()
            await asyncio.gather(self._egress_task, return_exceptions=True)
            self._egress_task = None
        for bunker_id in list(self._attached):
            with contextlib.suppress(NetworkError):
                await self.detach(bunker_id)
        if self.audit is not None:
            await self.audit.close()
        await self.l2.close()
        if self._exec is not None:
            self._exec.close()
            self._exec = None
        self._nft = None
        await asyncio.to_thread(self._reconcile)

    # -- bunkers -----------------------------------------------------------------------

    async def attach(
        self, bunker_id: str, request: NetRequest, *, owner_id_base: int | None = None
    ) -> Attachment:
        """Build ``bunker_id``'s namespace, addresses, rules and resolver.

        Args:
            bunker_id: ``bnk_`` id.
            request: the network request.
            owner_id_base: host uid/gid of the bunker's root: the namespace is then created
                inside a new user namespace mapping bunker ids 0..65535 there
                (:attr:`Attachment.userns_path`), so root in a bunker that joins both
                configures its own interfaces (``transit``). ``None``: owned by the
                initial user namespace, as for every other profile.

        Raises:
            NetworkError: not started, pool exhausted, or a netlink/nftables failure (whatever
                was built is removed again).
            ValueError: an upstream resolver is not ``ip[:port]``.
        """
        if request.profile not in EGRESS_PROFILES:
            raise ValueError(f"profile {request.profile!r} gets no network from the worker")
        upstreams = [parse_upstream(u) for u in request.upstreams]
        if self._exec is None or self._nft is None:
            raise NetworkError("bunker networking is not started")
        async with self._lock:
            if bunker_id in self._attached:
                return self._attached[bunker_id]
            slot = self._free_slot()
            gateway, address = self._block(slot)
            attachment = Attachment(
                bunker_id,
                slot,
                f"sb{self.tag}-{bunker_id}",
                address,
                gateway,
                f"v{slot}",
                tenant_id=request.tenant_id,
                audit=request.audit and self.audit is not None,
                open_egress=request.profile in ("unrestricted", "transit"),
            )
            self._attached[bunker_id] = attachment
        try:
            await asyncio.to_thread(
                self._build_bunker, attachment, request.bandwidth_mbit, owner_id_base
            )
            if request.interfaces:
                await self.l2.attach(bunker_id, attachment.netns, request.interfaces)
            open_egress = request.profile in ("unrestricted", "transit")
            await self._exec.run(
                self._nft.run,
                nft.bunker_add(
                    slot,
                    attachment.ifname,
                    gateway,
                    open_egress=open_egress,
                    source=address,
                    # A bunker owning its namespace can remove its tbf: police it here.
                    police_mbit=request.bandwidth_mbit if owner_id_base is not None else None,
                ),
            )
            policy = NamePolicy(None if open_egress else (request.allowlist or ()))
            attachment.resolver = await self._start_resolver(attachment, policy, upstreams)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.detach(bunker_id))
            if isinstance(exc, (OSError, NetlinkError, nft.NftError, L2Error)):
                raise NetworkError(f"network of bunker {bunker_id}: {exc}") from exc
            raise
        log.info(
            "net_bunker_attached",
            bunker_id=bunker_id,
            profile=request.profile,
            address=address,
            slot=slot,
        )
        return attachment

    def _build_bunker(
        self, a: Attachment, bandwidth_mbit: int | None, owner_id_base: int | None
    ) -> None:
        if owner_id_base is None:
            create_netns(a.netns)
        else:
            a.userns_path = str(create_owned_netns(a.netns, owner_id_base, ID_RANGE_SIZE))
        run_in_netns(a.netns, lambda: _write_sysctl("net.ipv6.conf.all.disable_ipv6", "1"))
        run_in_netns(a.netns, lambda: _write_sysctl("net.ipv6.conf.default.disable_ipv6", "1"))

        def router_side(ipr: IPRoute) -> None:
            ipr.link(
                "add", ifname=a.ifname, kind="veth", peer={"ifname": "eth0", "net_ns_fd": a.netns}
            )
            index = ipr.link_lookup(ifname=a.ifname)[0]
            ipr.addr("add", index=index, address=a.gateway, prefixlen=30)
            ipr.link("set", index=index, state="up")

        def bunker_side(ipr: IPRoute) -> None:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            index = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=index, address=a.address, prefixlen=30)
            ipr.link("set", index=index, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=a.gateway)
            if bandwidth_mbit is not None:
                ipr.tc(
                    "add",
                    "tbf",
                    index,
                    0x10000,
                    rate=f"{bandwidth_mbit}mbit",
                    burst=max(16 * 1024, bandwidth_mbit * 1_000_000 // 8 // 100),
                    latency="50ms",
                )

        ipr_in(self.router, router_side)
        ipr_in(a.netns, bunker_side)

    async def _start_resolver(
        self,
        a: Attachment,
        policy: NamePolicy,
        upstreams: list[tuple[str, int]],
    ) -> BunkerResolver:
        assert self._exec is not None and self._nft is not None
        executor, rules = self._exec, self._nft

        def bound() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.bind((a.gateway, 53))
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
            return sock

        async def new_socket() -> socket.socket:
            return await executor.run(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)

        async def on_answer(addresses: list[str], ttl_s: int) -> None:
            await executor.run(rules.run, nft.allow_addresses(a.slot, addresses, ttl_s))

        def on_query(record: QueryRecord) -> None:
            log.info(
                "dns_query",
                bunker_id=a.bunker_id,
                name=record.name,
                qtype=record.qtype,
                verdict=record.verdict,
                rcode=record.rcode,
                addresses=list(record.addresses),
            )
            if self._on_query is not None:
                self._on_query(a.bunker_id, record)
            for address in record.addresses:
                a.names[address] = record.name
            if a.audit and self.audit is not None:
                self.audit.add(
                    flow_record(
                        bunker_id=a.bunker_id,
                        tenant_id=a.tenant_id,
                        proto="dns",
                        src_ip=record.src[0],
                        src_port=record.src[1],
                        dst_ip=None,
                        dst_port=53,
                        dns_name=record.name,
                        verdict=record.verdict,
                        packets_out=1,
                        dns_qtype=record.qtype,
                        dns_rcode=record.rcode,
                        dns_answers=list(record.addresses),
                    )
                )

        resolver = BunkerResolver(
            policy=policy,
            upstreams=upstreams,
            new_socket=new_socket,
            on_answer=on_answer,
            on_query=on_query,
        )
        await resolver.serve(await executor.run(bound))
        return resolver

    async def detach(self, bunker_id: str) -> None:
        """Remove ``bunker_id``'s resolver, rules and namespace (idempotent).

        Raises:
            NetworkError: the namespace or rules could not be removed.
        """
        async with self._lock:
            attachment = self._attached.pop(bunker_id, None)
        try:
            await self.l2.detach(bunker_id)
        except L2Error as exc:
            raise NetworkError(f"network of bunker {bunker_id}: {exc}") from exc
        if attachment is None:
            name = f"sb{self.tag}-{bunker_id}"
            if (NETNS_DIR / name).exists():
                await asyncio.to_thread(netns.remove, name)
            await asyncio.to_thread(remove_userns, name)
            return
        if attachment.resolver is not None:
            await attachment.resolver.close()
        if attachment.audit and self.audit is not None:
            with contextlib.suppress(nft.NftError):
                await self._collect(attachment)
            with contextlib.suppress(OSError, NetlinkError):
                await self._collect_flows([attachment], final=True)
            await self.audit.flush(bunker_id)
        with contextlib.suppress(nft.NftError):
            await self.refresh_egress([attachment])
        self._final_egress[bunker_id] = attachment.egress_bytes
        try:
            if self._exec is not None and self._nft is not None:
                with contextlib.suppress(nft.NftError):
                    await self._exec.run(
                        self._nft.run,
                        nft.bunker_delete(attachment.slot, attachment.ifname, attachment.gateway),
                    )
            await asyncio.to_thread(ipr_in, self.router, self._link_deleter(attachment.ifname))
            if (NETNS_DIR / attachment.netns).exists():
                await asyncio.to_thread(netns.remove, attachment.netns)
            await asyncio.to_thread(remove_userns, attachment.netns)
        except (OSError, NetlinkError) as exc:
            raise NetworkError(f"network of bunker {bunker_id}: {exc}") from exc
        log.info("net_bunker_detached", bunker_id=bunker_id)

    @staticmethod
    def _link_deleter(ifname: str) -> Callable[[IPRoute], None]:
        """Delete ``ifname`` now (a veth dies with its namespace only once the kernel gets to
        it, and the slot may be reused before that)."""

        def delete(ipr: IPRoute) -> None:
            found = ipr.link_lookup(ifname=ifname)
            if found:
                ipr.link("del", index=found[0])

        return delete

    async def collect_audit(self) -> None:
        """Turn denied-flow counters and conntrack flows into audit records (each flush)."""
        await self.collect_denied()
        try:
            await self._collect_flows(
                [a for a in self._attached.values() if a.audit and a.open_egress]
            )
        except (OSError, NetlinkError) as exc:
            log.warning("egress_flow_collect_failed", error=str(exc))

    async def _collect_flows(self, attachments: list[Attachment], *, final: bool = False) -> None:
        """Records for the allowed flows of ``attachments`` (``unrestricted``/``transit``):
        once when a flow ends (or leaves the table), every :data:`FLOW_REPORT_EVERY_S` while
        it stays open; ``final`` ends every flow (the bunker is going away)."""
        if self._exec is None or not attachments:
            return
        by_address = {a.address: a for a in attachments if a.open_egress}
        if not by_address:
            return
        current: dict[str, dict[int, Flow]] = {address: {} for address in by_address}
        for flow in await self._exec.run(read_flows):
            owner = by_address.get(flow.src_ip)
            if owner is not None and flow.dst_ip != owner.gateway:
                current[flow.src_ip][flow.ct_id] = flow
        now = time.monotonic()
        for address, a in by_address.items():
            seen = current[address]
            a.done &= set(seen)
            for ct_id, flow in seen.items():
                if ct_id in a.done:
                    continue
                tracked = a.flows.setdefault(ct_id, _Tracked(flow))
                tracked.last = flow
                if flow.ended or final:
                    self._report_flow(a, tracked, still_open=False)
                    a.flows.pop(ct_id, None)
                    a.done.add(ct_id)
                elif now - tracked.reported_at >= FLOW_REPORT_EVERY_S:
                    self._report_flow(a, tracked, still_open=True)
            for ct_id in [c for c in a.flows if c not in seen]:
                self._report_flow(a, a.flows.pop(ct_id), still_open=False)

    def _report_flow(self, a: Attachment, tracked: _Tracked, *, still_open: bool) -> None:
        if self.audit is None:
            return
        flow = tracked.last
        counters = (flow.packets_out, flow.bytes_out, flow.packets_in, flow.bytes_in)
        delta = [
            max(0, now - before) for now, before in zip(counters, tracked.reported, strict=True)
        ]
        started = (
            datetime.fromtimestamp(flow.started_ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            if flow.started_ns
            else None
        )
        self.audit.add(
            flow_record(
                bunker_id=a.bunker_id,
                tenant_id=a.tenant_id,
                proto=flow.proto,
                src_ip=flow.src_ip,
                src_port=flow.src_port,
                dst_ip=flow.dst_ip,
                dst_port=flow.dst_port,
                dns_name=a.names.get(flow.dst_ip),
                verdict="allow",
                packets_out=delta[0],
                bytes_out=delta[1],
                packets_in=delta[2],
                bytes_in=delta[3],
                started_at=started,
                still_open=still_open,
            )
        )
        tracked.reported = counters
        tracked.reported_at = time.monotonic()

    async def collect_denied(self) -> None:
        """Turn the denied-flow counters of every audited bunker into audit records."""
        for attachment in list(self._attached.values()):
            if attachment.audit:
                try:
                    await self._collect(attachment)
                except nft.NftError as exc:
                    log.warning(
                        "egress_denied_collect_failed",
                        bunker_id=attachment.bunker_id,
                        error=str(exc),
                    )

    async def _collect(self, a: Attachment) -> None:
        """Records for ``denied_<slot>`` entries since the last collection, then reset them."""
        if self._exec is None or self._nft is None or self.audit is None:
            return
        output = await self._exec.run(self._nft.run, [nft.list_set(a.slot)])
        started, a.collected_at = a.collected_at, now_iso()
        entries: list[tuple[str, str, int]] = []
        for obj in output.get("nftables", []):
            listed = obj.get("set") if isinstance(obj, dict) else None
            if not isinstance(listed, dict):
                continue
            for dst_ip, proto, dst_port, packets, nbytes in nft.denied_elements(listed):
                entries.append((dst_ip, proto, dst_port))
                self.audit.add(
                    flow_record(
                        bunker_id=a.bunker_id,
                        tenant_id=a.tenant_id,
                        proto=proto,
                        src_ip=a.address,
                        src_port=None,
                        dst_ip=dst_ip,
                        dst_port=dst_port,
                        verdict="deny",
                        packets_out=packets,
                        bytes_out=nbytes,
                        started_at=started,
                        ended_at=a.collected_at,
                    )
                )
        if entries:
            await self._exec.run(self._nft.run, nft.delete_denied(a.slot, entries))

    async def refresh_egress(self, attachments: Sequence[Attachment] | None = None) -> None:
        """Read the ``egress_<slot>`` counters into :attr:`Attachment.egress_bytes` of
        ``attachments`` (default: every attached bunker).

        Raises:
            nft.NftError: the counters could not be listed.
        """
        if self._exec is None or self._nft is None:
            return
        found = nft.counter_bytes(await self._exec.run(self._nft.run, [nft.list_counters()]))
        for attachment in list(self._attached.values()) if attachments is None else attachments:
            attachment.egress_bytes = found.get(
                nft.egress_counter(attachment.slot), attachment.egress_bytes
            )

    async def deny_new_worker_addresses(self) -> list[str]:
        """Add the worker host's addresses that appeared since the router was built (another
        interface, another worker's uplink) to ``deny4``; return those added.

        Raises:
            nft.NftError: the set could not be updated.
        """
        if self._exec is None or self._nft is None:
            return []
        fresh = [
            address
            for address in await self._worker_addresses()
            if not any(ipaddress.IPv4Address(address) in net for net in self._denied)
        ]
        if fresh:
            await self._exec.run(self._nft.run, nft.deny_addresses(fresh))
            self._denied += [ipaddress.IPv4Network(a) for a in fresh]
            log.info("net_worker_addresses_denied", addresses=fresh)
        return fresh

    async def _egress_loop(self) -> None:
        while True:
            await asyncio.sleep(EGRESS_REFRESH_S)
            try:
                await self.refresh_egress()
                await self.deny_new_worker_addresses()
            except nft.NftError as exc:
                log.warning("egress_counter_read_failed", error=str(exc))
            except RuntimeError:
                # The namespace executor was shut down under us (the manager is going away).
                return

    def egress_bytes(self, bunker_id: str) -> int | None:
        """Bytes ``bunker_id`` has sent out of the uplink since it was attached, as of the
        last :meth:`refresh_egress`; ``None`` for a bunker without a network attachment."""
        attachment = self._attached.get(bunker_id)
        return None if attachment is None else attachment.egress_bytes

    def pop_final_egress(self, bunker_id: str) -> int | None:
        """The egress byte count read when ``bunker_id`` was detached (once), else ``None``."""
        return self._final_egress.pop(bunker_id, None)

    def attachment(self, bunker_id: str) -> Attachment | None:
        """The attachment of ``bunker_id``, if it has one."""
        return self._attached.get(bunker_id)

    async def ruleset(self) -> list[dict[str, Any]]:
        """The worker's nftables table as JSON objects (for inspection and tests)."""
        if self._exec is None or self._nft is None:
            return []
        return await self._exec.run(self._nft.ruleset)

"""Tenant bridges and transit interfaces on one worker (SPEC §8.6, §8.8).

Layout (``<tag>`` as in :mod:`scaigrid.worker.net.manager`):

* **Bridge namespace** ``sb<tag>-l2`` holds every tenant bridge of the worker and the host
  side of every transit interface. It has no route and no link to the router or the uplink,
  so a bridge is never linked to the uplink. br_netfilter is switched off there
  (``bridge-nf-call-*``), so bridged frames never meet an IP-family firewall; IPv6 is
  disabled so the namespace itself sends nothing onto a bridge.
* **Bridge** device ``<device>`` (named by the controller, see :func:`bridge_device`); with a
  ``vlan_id`` it runs with VLAN filtering and ports are untagged members of that VLAN only.
  On a kernel without ``CONFIG_BRIDGE_VLAN_FILTERING`` (this project's CI host) the bridge is
  a plain one and its ports go into ``set untagged``, whose 802.1Q/802.1ad-tagged frames
  are dropped: the segment carries only untagged frames, which is what the bunkers see
  with filtering too (a bridge has no trunk port: it is never linked to anything else).
* **Interface**: a veth pair, ``if_name`` with the interface's MAC inside the bunker's
  namespace, port :func:`port_name` on the bridge in the bridge namespace.
* **spoof_guard**: nftables table ``bridge scaibunker_l2`` (JSON API), chain ``prerouting``
  drops every frame that enters the bridge from a guarded port (``set guarded``) with a
  source MAC other than that port's (``set guard``: ``ifname . ether_addr``). Ports with
  ``spoof_guard: false`` are not in ``guarded``.

The bridge namespace is removed with the worker's other namespaces when the worker starts
(:meth:`NetworkManager.start <scaigrid.worker.net.manager.NetworkManager.start>`), so a
restarted worker has no bridges until the controller re-creates them on reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog
from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from scaigrid.worker.net import nft
from scaigrid.worker.net.nsexec import NetnsExecutor

log = structlog.get_logger(__name__)

TABLE: Final = "scaibunker_l2"
FAMILY: Final = "bridge"
#: Interface names a bunker may use (SPEC §8.6).
IF_NAME: Final = re.compile(r"^[a-z0-9_.-]{1,15}$")
RESERVED_IF_NAMES: Final = frozenset({"lo", "eth0"})
MAC: Final = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
DEVICE: Final = re.compile(r"^[a-z0-9]{1,15}$")
#: Bridge VLAN flags (``linux/if_bridge.h``): ``BRIDGE_VLAN_INFO_PVID | _UNTAGGED``.
_PVID_UNTAGGED: Final = 0x2 | 0x4
_NETNS_DIR: Final = Path("/run/netns")


class L2Error(RuntimeError):
    """A bridge or interface could not be created or removed; the message says why."""


class BridgeInUse(L2Error):
    """A bridge still has bunker interfaces attached."""


class BridgeMissing(L2Error):
    """An interface names a bridge this worker does not have."""


def bridge_device(bridge_id: str) -> str:
    """The worker device name of bridge ``bridge_id``: ``br`` + 12 hex digits (stable; the
    controller names devices the same way and sends the name in ``bridge.create``)."""
    return "br" + hashlib.sha256(bridge_id.encode()).hexdigest()[:12]


def port_name(bunker_id: str, index: int) -> str:
    """Bridge-side name of interface ``index`` (0-7) of ``bunker_id``."""
    return f"p{hashlib.sha256(bunker_id.encode()).hexdigest()[:12]}{index:x}"


def generated_mac(bunker_id: str, if_name: str) -> str:
    """A stable locally administered unicast MAC for an interface given none."""
    digest = hashlib.sha256(f"{bunker_id}/{if_name}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


@dataclass(frozen=True)
class InterfaceRequest:
    """One transit interface of ``bunker.create``.

    Attributes:
        if_name: name inside the bunker (``IF_NAME``, not ``lo``/``eth0``).
        mac: the interface's unicast MAC, lower case ``xx:xx:xx:xx:xx:xx``.
        spoof_guard: drop frames from the bunker whose source MAC is not ``mac``.
        device: the bridge's device name on this worker.
    """

    if_name: str
    mac: str
    spoof_guard: bool
    device: str

    @classmethod
    def parse(cls, value: Any) -> InterfaceRequest:
        """Check one ``{if_name, mac, spoof_guard, device}`` object.

        Raises:
            ValueError: a field breaks its rule; the message names it.
        """
        if not isinstance(value, dict):
            raise ValueError("an interface must be an object")
        if_name, mac, device = value.get("if_name"), value.get("mac"), value.get("device")
        guard = value.get("spoof_guard", True)
        if not isinstance(if_name, str) or not IF_NAME.match(if_name):
            raise ValueError("if_name must be 1-15 characters of [a-z0-9_.-]")
        if if_name in RESERVED_IF_NAMES:
            raise ValueError(f"if_name {if_name!r} is reserved")
        if not isinstance(mac, str) or not MAC.match(mac.lower()) or int(mac[:2], 16) & 1:
            raise ValueError("mac must be a unicast xx:xx:xx:xx:xx:xx address")
        if not isinstance(device, str) or not DEVICE.match(device):
            raise ValueError("device must be a bridge device name")
        if not isinstance(guard, bool):
            raise ValueError("spoof_guard must be a boolean")
        return cls(if_name, mac.lower(), guard, device)


@dataclass(frozen=True)
class _Port:
    name: str
    mac: str
    guarded: bool
    device: str
    untagged: bool = False


def _obj(kind: str, **fields: Any) -> dict[str, Any]:
    return {kind: {"family": FAMILY, "table": TABLE, **fields}}


def _elements(name: str, elem: list[Any]) -> dict[str, Any]:
    return {"element": {"family": FAMILY, "table": TABLE, "name": name, "elem": elem}}


def base_ruleset() -> list[dict[str, Any]]:
    """Commands creating ``bridge scaibunker_l2`` (see the module docstring)."""
    iifname = {"meta": {"key": "iifname"}}
    saddr = {"payload": {"protocol": "ether", "field": "saddr"}}
    return [
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
        {"add": _obj("set", name="guarded", type="ifname")},
        {"add": _obj("set", name="guard", type=["ifname", "ether_addr"])},
        {"add": _obj("set", name="untagged", type="ifname")},
        {
            "add": _obj(
                "chain",
                name="prerouting",
                type="filter",
                hook="prerouting",
                prio=-200,
                policy="accept",
            )
        },
        {
            "add": {
                "rule": {
                    "family": FAMILY,
                    "table": TABLE,
                    "chain": "prerouting",
                    "expr": [
                        {"match": {"op": "==", "left": iifname, "right": "@guarded"}},
                        {
                            "match": {
                                "op": "!=",
                                "left": {"concat": [iifname, saddr]},
                                "right": "@guard",
                            }
                        },
                        {"counter": None},
                        {"drop": None},
                    ],
                }
            }
        },
        {
            "add": {
                "rule": {
                    "family": FAMILY,
                    "table": TABLE,
                    "chain": "prerouting",
                    "expr": [
                        {"match": {"op": "==", "left": iifname, "right": "@untagged"}},
                        {
                            "match": {
                                "op": "==",
                                "left": {"payload": {"protocol": "ether", "field": "type"}},
                                "right": {"set": ["8021q", "8021ad"]},
                            }
                        },
                        {"counter": None},
                        {"drop": None},
                    ],
                }
            }
        },
    ]


def guard_add(port: str, mac: str) -> list[dict[str, Any]]:
    """Commands guarding ``port``: only frames with source ``mac`` pass."""
    return [
        {"add": _elements("guarded", [port])},
        {"add": _elements("guard", [{"concat": [port, mac]}])},
    ]


def guard_delete(port: str, mac: str) -> list[dict[str, Any]]:
    """Commands removing what :func:`guard_add` added."""
    return [
        {"delete": _elements("guarded", [port])},
        {"delete": _elements("guard", [{"concat": [port, mac]}])},
    ]


def untagged_add(port: str) -> list[dict[str, Any]]:
    """Commands dropping tagged frames from ``port`` (VLAN bridges without kernel filtering)."""
    return [{"add": _elements("untagged", [port])}]


def untagged_delete(port: str) -> list[dict[str, Any]]:
    """Commands removing what :func:`untagged_add` added."""
    return [{"delete": _elements("untagged", [port])}]


def _write_sysctl(key: str, value: str) -> None:
    path = Path("/proc/sys", *key.split("."))
    if path.exists():
        path.write_text(value)


class L2Manager:
    """Bridges and transit interfaces of one worker (see the module docstring).

    Args:
        tag: the worker tag; the bridge namespace is ``sb<tag>-l2``.
        in_netns: ``(namespace, fn)`` runs ``fn`` on a thread inside the namespace (the
            network manager's ``run_in_netns``).
        ipr_in: ``(namespace, fn)`` runs ``fn(IPRoute)`` inside the namespace.
        create_netns: creates a named namespace without forking.
    """

    def __init__(
        self,
        tag: str,
        *,
        in_netns: Callable[[str, Callable[[], Any]], Any],
        ipr_in: Callable[[str, Callable[[IPRoute], Any]], Any],
        create_netns: Callable[[str], None],
    ) -> None:
        self.netns = f"sb{tag}-l2"
        self._in_netns = in_netns
        self._ipr_in = ipr_in
        self._create_netns = create_netns
        self._exec: NetnsExecutor | None = None
        self._nft: nft.Nft | None = None
        self._ports: dict[str, list[_Port]] = {}
        self._vlans: dict[str, int | None] = {}
        #: VLAN bridges made without kernel VLAN filtering (see the module docstring).
        self._emulated: set[str] = set()
        self._lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Build the bridge namespace and its (empty) spoof-guard table.

        Raises:
            L2Error: the namespace or table could not be made (nothing is left behind).
        """
        try:
            await asyncio.to_thread(self._build)
            self._exec = NetnsExecutor(self.netns)
            self._nft = await self._exec.run(nft.Nft)
            await self._exec.run(self._nft.run, base_ruleset())
        except (OSError, NetlinkError, nft.NftError) as exc:
            await self.close()
            raise L2Error(f"bridge namespace {self.netns}: {exc}") from exc

    def _build(self) -> None:
        self._create_netns(self.netns)

        def settings() -> None:
            for key in ("all", "default"):
                _write_sysctl(f"net.ipv6.conf.{key}.disable_ipv6", "1")
            for family in ("iptables", "ip6tables", "arptables"):
                _write_sysctl(f"net.bridge.bridge-nf-call-{family}", "0")

        self._in_netns(self.netns, settings)

        def loopback(ipr: IPRoute) -> None:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

        self._ipr_in(self.netns, loopback)

    async def close(self) -> None:
        """Remove the bridge namespace with every bridge and port in it (worker shutdown)."""
        if self._exec is not None:
            self._exec.close()
            self._exec = None
        self._nft = None
        self._ports.clear()
        self._vlans.clear()
        if (_NETNS_DIR / self.netns).exists():
            await asyncio.to_thread(netns.remove, self.netns)

    # -- bridges -----------------------------------------------------------------------

    async def create_bridge(self, device: str, vlan_id: int | None) -> None:
        """Create bridge ``device`` (idempotent: an existing one is kept as it is).

        Raises:
            ValueError: a bad device name or VLAN id.
            L2Error: not started, or netlink refused.
        """
        if not DEVICE.match(device):
            raise ValueError(f"bad bridge device name {device!r}")
        if vlan_id is not None and not 1 <= vlan_id <= 4094:
            raise ValueError("vlan_id must be 1-4094")
        if self._exec is None:
            raise L2Error("bridges are not started on this worker")

        def create(ipr: IPRoute) -> bool:
            """Make the bridge; return whether VLAN filtering had to be emulated."""
            if ipr.link_lookup(ifname=device):
                return device in self._emulated
            emulated = False
            options: dict[str, Any] = {"ifname": device, "kind": "bridge"}
            if vlan_id is not None:
                try:
                    ipr.link("add", **options, br_vlan_filtering=1, br_vlan_default_pvid=0)
                except NetlinkError as exc:
                    if exc.code != errno.EOPNOTSUPP:
                        raise
                    emulated = True
            if vlan_id is None or emulated:
                ipr.link("add", **options)
            ipr.link("set", index=ipr.link_lookup(ifname=device)[0], state="up")
            return emulated

        async with self._lock:
            try:
                emulated = bool(await asyncio.to_thread(self._ipr_in, self.netns, create))
            except (OSError, NetlinkError) as exc:
                raise L2Error(f"bridge {device}: {exc}") from exc
            self._vlans[device] = vlan_id
            if emulated:
                self._emulated.add(device)
        log.info("l2_bridge_created", device=device, vlan_id=vlan_id, vlan_emulated=emulated)

    async def delete_bridge(self, device: str) -> bool:
        """Remove bridge ``device``; return whether it existed.

        Raises:
            BridgeInUse: a bunker interface is still attached to it.
            L2Error: netlink refused.
        """
        async with self._lock:
            if any(p.device == device for ports in self._ports.values() for p in ports):
                raise BridgeInUse(f"bridge {device} still has bunker interfaces")

            def delete(ipr: IPRoute) -> bool:
                found = ipr.link_lookup(ifname=device)
                if found:
                    ipr.link("del", index=found[0])
                return bool(found)

            try:
                existed = bool(await asyncio.to_thread(self._ipr_in, self.netns, delete))
            except FileNotFoundError:
                existed = False
            except (OSError, NetlinkError) as exc:
                raise L2Error(f"bridge {device}: {exc}") from exc
            self._vlans.pop(device, None)
            self._emulated.discard(device)
        log.info("l2_bridge_deleted", device=device, existed=existed)
        return existed

    def bridges(self) -> list[str]:
        """Device names of the bridges that exist now."""
        if self._exec is None:
            return []

        def names(ipr: IPRoute) -> list[str]:
            out = []
            for link in ipr.get_links():
                info = link.get_attr("IFLA_LINKINFO")
                if info is not None and info.get_attr("IFLA_INFO_KIND") == "bridge":
                    out.append(str(link.get_attr("IFLA_IFNAME")))
            return sorted(out)

        return list(self._ipr_in(self.netns, names))

    def ports(self) -> list[str]:
        """Names of the bridge-side interface ports that exist now."""
        if self._exec is None:
            return []

        def names(ipr: IPRoute) -> list[str]:
            return sorted(
                str(link.get_attr("IFLA_IFNAME"))
                for link in ipr.get_links()
                if str(link.get_attr("IFLA_IFNAME")).startswith("p")
            )

        return list(self._ipr_in(self.netns, names))

    # -- interfaces --------------------------------------------------------------------

    async def attach(
        self, bunker_id: str, bunker_netns: str, interfaces: Sequence[InterfaceRequest]
    ) -> None:
        """Give ``bunker_id`` (namespace ``bunker_netns``) its interfaces on their bridges.

        Raises:
            BridgeMissing: an interface names a bridge this worker does not have.
            L2Error: not started, or netlink/nftables refused (what was made is removed).
        """
        if self._exec is None or self._nft is None:
            raise L2Error("bridges are not started on this worker")
        if len(interfaces) > 8:
            raise ValueError("at most 8 interfaces")
        async with self._lock:
            missing = sorted({i.device for i in interfaces} - set(self._vlans))
            if missing:
                raise BridgeMissing(f"bridges {missing} do not exist on this worker")
            ports = [
                _Port(
                    port_name(bunker_id, n),
                    i.mac,
                    i.spoof_guard,
                    i.device,
                    untagged=i.device in self._emulated,
                )
                for n, i in enumerate(interfaces)
            ]
            self._ports[bunker_id] = ports
            try:
                for port, interface in zip(ports, interfaces, strict=True):
                    vlan_id = None if port.untagged else self._vlans.get(port.device)
                    await asyncio.to_thread(self._plug, port, interface, bunker_netns, vlan_id)
                    if port.guarded:
                        await self._exec.run(self._nft.run, guard_add(port.name, port.mac))
                    if port.untagged:
                        await self._exec.run(self._nft.run, untagged_add(port.name))
            except (OSError, NetlinkError, nft.NftError) as exc:
                await self._unplug(bunker_id)
                raise L2Error(f"interfaces of bunker {bunker_id}: {exc}") from exc
        log.info("l2_interfaces_attached", bunker_id=bunker_id, count=len(ports))

    def _plug(
        self, port: _Port, interface: InterfaceRequest, bunker_netns: str, vlan_id: int | None
    ) -> None:
        def bridge_side(ipr: IPRoute) -> None:
            ipr.link(
                "add",
                ifname=port.name,
                kind="veth",
                peer={"ifname": interface.if_name, "net_ns_fd": bunker_netns},
            )
            index = ipr.link_lookup(ifname=port.name)[0]
            bridge = ipr.link_lookup(ifname=port.device)[0]
            ipr.link("set", index=index, master=bridge)
            if vlan_id is not None:
                ipr.vlan_filter(
                    "add", index=index, vlan_info={"vid": vlan_id, "flags": _PVID_UNTAGGED}
                )
            ipr.link("set", index=index, state="up")

        def bunker_side(ipr: IPRoute) -> None:
            index = ipr.link_lookup(ifname=interface.if_name)[0]
            ipr.link("set", index=index, address=interface.mac)
            ipr.link("set", index=index, state="up")

        self._ipr_in(self.netns, bridge_side)
        self._ipr_in(bunker_netns, bunker_side)

    async def detach(self, bunker_id: str) -> None:
        """Remove ``bunker_id``'s ports and guard entries (idempotent).

        Raises:
            L2Error: netlink refused.
        """
        async with self._lock:
            await self._unplug(bunker_id)

    async def _unplug(self, bunker_id: str) -> None:
        ports = self._ports.pop(bunker_id, None)
        if not ports:
            return
        if self._exec is not None and self._nft is not None:
            for port in ports:
                if port.guarded:
                    with contextlib.suppress(nft.NftError):
                        await self._exec.run(self._nft.run, guard_delete(port.name, port.mac))
                if port.untagged:
                    with contextlib.suppress(nft.NftError):
                        await self._exec.run(self._nft.run, untagged_delete(port.name))

        def delete(ipr: IPRoute) -> None:
            for port in ports:
                found = ipr.link_lookup(ifname=port.name)
                if found:
                    ipr.link("del", index=found[0])

        try:
            await asyncio.to_thread(self._ipr_in, self.netns, delete)
        except (OSError, NetlinkError) as exc:
            raise L2Error(f"interfaces of bunker {bunker_id}: {exc}") from exc
        log.info("l2_interfaces_detached", bunker_id=bunker_id, count=len(ports))

    async def ruleset(self) -> list[dict[str, Any]]:
        """The ``bridge scaibunker_l2`` table as JSON objects (for inspection and tests)."""
        if self._exec is None or self._nft is None:
            return []
        return await self._exec.run(self._list)

    def _list(self) -> list[dict[str, Any]]:
        assert self._nft is not None
        try:
            output = self._nft.run([{"list": {"table": {"family": FAMILY, "name": TABLE}}}])
        except nft.NftError:
            return []
        return list(output.get("nftables", []))

"""Guest networking for microVMs: the bunker's network namespace, rewired for a tap.

The network manager builds every bunker's namespace the same way for every driver: an
``eth0`` veth end holding the bunker's address (``/30``), a default route through the
router end (which is also the bunker's DNS resolver), and the profile's policy on the
router side. A container uses ``eth0`` directly. For a VM, :func:`attach_tap` moves the
address into the guest: it reads ``eth0``'s address, prefix, gateway and MTU, removes the
address, and bridges ``eth0`` with a new tap device (:data:`TAP`); the VMM, started inside
the namespace, opens the tap; the guest configures the same address, route and resolver
(:func:`guest_network_script`). Policy, DNS filtering and shaping stay where they were, so
every network profile works unchanged. Everything lives in the bunker's namespace and
goes away with it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import shlex
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute

from scaigrid.worker.net.manager import ipr_in

TAP = "vmtap0"
BRIDGE = "vmbr0"


class VmNetworkError(Exception):
    """The namespace could not be rewired for a VM; the message says why."""


@dataclass(frozen=True)
class GuestNetwork:
    """What the guest configures on its ``eth0``.

    Attributes:
        address: IPv4 address; prefixlen: its prefix length.
        gateway: default gateway (also the DNS resolver).
        mtu: link MTU.
        mac: the guest NIC's MAC address.
    """

    address: str
    prefixlen: int
    gateway: str
    mtu: int
    mac: str


def guest_mac(bunker_id: str) -> str:
    """A stable, locally administered unicast MAC for the bunker's guest NIC."""
    digest = hashlib.sha256(bunker_id.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def attach_tap(netns_path: str, bunker_id: str) -> GuestNetwork:
    """Rewire the namespace at ``netns_path`` for a VM (blocking; see the module docstring).

    Raises:
        VmNetworkError: no ``eth0`` with one IPv4 address and a default route.
    """
    name = os.path.basename(netns_path)

    def rewire(ipr: IPRoute) -> GuestNetwork:
        found = ipr.link_lookup(ifname="eth0")
        if not found:
            raise VmNetworkError("the bunker namespace has no eth0")
        index = found[0]
        addrs = [
            (str(a.get_attr("IFA_ADDRESS")), int(a["prefixlen"]))
            for a in ipr.get_addr(index=index, family=socket.AF_INET)
        ]
        gateways = [
            str(r.get_attr("RTA_GATEWAY"))
            for r in ipr.get_default_routes(family=socket.AF_INET)
            if r.get_attr("RTA_GATEWAY")
        ]
        if len(addrs) != 1 or not gateways:
            raise VmNetworkError(f"eth0 needs one IPv4 address and a gateway: {addrs} {gateways}")
        (link,) = ipr.get_links(index)
        mtu = int(link.get_attr("IFLA_MTU"))
        address, prefixlen = addrs[0]
        ipr.link("add", ifname=TAP, kind="tuntap", mode="tap")
        ipr.link("add", ifname=BRIDGE, kind="bridge")
        bridge = ipr.link_lookup(ifname=BRIDGE)[0]
        tap = ipr.link_lookup(ifname=TAP)[0]
        ipr.addr("del", index=index, address=address, prefixlen=prefixlen)
        ipr.link("set", index=index, master=bridge)
        ipr.link("set", index=tap, master=bridge, mtu=mtu, state="up")
        ipr.link("set", index=bridge, mtu=mtu, state="up")
        return GuestNetwork(address, prefixlen, gateways[0], mtu, guest_mac(bunker_id))

    return ipr_in(name, rewire)


def guest_network_script(net: GuestNetwork) -> list[str]:
    """Busybox commands for ``boot.sh``: address, MTU, route and resolver of the guest's
    ``eth0`` (run in the initramfs, before ``switch_root``; ``/newroot`` is the new root)."""
    address = ipaddress.IPv4Interface(f"{net.address}/{net.prefixlen}")
    gateway = ipaddress.IPv4Address(net.gateway)
    return [
        f"/bin/ip link set eth0 mtu {int(net.mtu)} up",
        f"/bin/ip addr add {shlex.quote(str(address))} dev eth0",
        f"/bin/ip route add default via {shlex.quote(str(gateway))}",
        "rm -f /newroot/etc/resolv.conf",
        f"echo {shlex.quote(f'nameserver {gateway}')} > /newroot/etc/resolv.conf",
    ]

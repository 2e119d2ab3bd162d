"""nftables through libnftables' JSON API (``libnftables-json(5)``), via Debian's
``python3-nftables`` binding.

The binding lives in ``/usr/lib/python3/dist-packages`` (Debian package ``python3-nftables``)
and is not on PyPI. Only that one module is loaded from its file, so nothing else from Debian's
``dist-packages`` can shadow the virtualenv's packages.

The ruleset of a worker lives in its router namespace, table ``inet scaibunker``:

* ``set deny4`` (intervals): always-dropped destinations (SPEC §8.1).
* ``chain forward`` (policy drop): packets to the uplink first visit ``iifname vmap @egress``
  (the bunker's ``e_<slot>`` counts them in ``counter egress_<slot>`` and returns), then
  established/related are accepted, then ``iifname vmap @bunkers`` jumps to the per-bunker
  chain ``b_<slot>``.
* ``chain input`` (policy drop): loopback, established/related, and UDP DNS to a bunker's gateway
  address from that bunker's interface (``set dns``: ``ifname . ipv4_addr``).
* ``chain postrouting`` (nat): masquerade out of the uplink.
* ``chain prerouting`` (filter, raw priority, before conntrack): ``iifname vmap @guard``
  jumps to the bunker's ``g_<slot>``, which drops (and counts) every IPv4 packet whose
  source is not the bunker's own address: a bunker that changes its ``eth0`` address (a
  ``transit`` bunker holds CAP_NET_ADMIN/CAP_NET_RAW in its namespace) can neither reach
  anything with a forged source nor have replies routed to another bunker. ``rp_filter``
  already drops most such packets; this rule holds without it, and drops them before
  conntrack could match them to another bunker's established flow.
* Per bunker: ``chain b_<slot>`` (deny4 → drop; profile rule; reject), ``set allow_<slot>``
  (ipv4 with timeouts) that the DNS resolver fills, and ``chain e_<slot>`` with ``counter
  egress_<slot>`` (every byte the bunker sent out of the uplink, for accounting), preceded
  for a capped ``transit`` bunker by a ``limit rate over`` drop (its own ``tbf`` is in a
  namespace it controls).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Final

TABLE: Final = "scaibunker"
FAMILY: Final = "inet"
UPLINK_IF: Final = "uplink"
#: Seconds a denied destination stays in ``denied_<slot>`` unread, and its size.
DENIED_TIMEOUT_S: Final = 3600
DENIED_SIZE: Final = 4096
NFT_BINDING = Path("/usr/lib/python3/dist-packages/nftables/nftables.py")


class NftError(RuntimeError):
    """libnftables rejected a command; the message is its error output."""


def _load_binding() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_debian_nftables", NFT_BINDING)
    if spec is None or spec.loader is None:
        raise NftError(f"{NFT_BINDING} is missing: install the Debian package python3-nftables")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Nft:
    """One libnftables context. Not thread-safe: use it from one thread (the one in the
    namespace whose ruleset it edits, see :class:`~scaigrid.worker.net.nsexec.NetnsExecutor`).
    """

    def __init__(self) -> None:
        binding = _load_binding()
        self._ctx = binding.Nftables()
        self._ctx.set_json_output(True)
        self._ctx.set_handle_output(True)

    def run(self, commands: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Apply ``commands`` (``libnftables-json`` command objects) atomically.

        Returns:
            The decoded JSON output (empty dict when there is none).

        Raises:
            NftError: the batch was rejected; nothing of it was applied.
        """
        rc, output, error = self._ctx.json_cmd({"nftables": list(commands)})
        if rc != 0:
            raise NftError(str(error).strip() or f"nft failed with rc {rc}")
        return output if isinstance(output, dict) else {}

    def ruleset(self) -> list[dict[str, Any]]:
        """The ``list table inet scaibunker`` objects, ``[]`` if the table does not exist."""
        rc, output, _ = self._ctx.cmd(f"list table {FAMILY} {TABLE}")
        if rc != 0:
            return []
        decoded = json.loads(output) if isinstance(output, str) and output else output
        return list(decoded.get("nftables", [])) if isinstance(decoded, dict) else []


def _obj(kind: str, **fields: Any) -> dict[str, Any]:
    return {kind: {"family": FAMILY, "table": TABLE, **fields}}


def _prefixes(cidrs: Iterable[str]) -> list[Any]:
    """Merge overlapping CIDRs (an interval set rejects overlaps) into nft prefixes."""
    networks = ipaddress.collapse_addresses(ipaddress.IPv4Network(c, strict=False) for c in cidrs)
    out: list[Any] = []
    for net in networks:
        if net.prefixlen == 32:
            out.append(str(net.network_address))
        else:
            out.append({"prefix": {"addr": str(net.network_address), "len": net.prefixlen}})
    return out


def deny_addresses(addresses: Iterable[str]) -> list[dict[str, Any]]:
    """Commands adding single IPv4 ``addresses`` to ``deny4`` (none may lie inside an interval
    the set already holds: the caller filters them)."""
    return [
        {
            "add": {
                "element": {
                    "family": FAMILY,
                    "table": TABLE,
                    "name": "deny4",
                    "elem": sorted(set(addresses)),
                }
            }
        }
    ]


def _match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _daddr() -> dict[str, Any]:
    return {"payload": {"protocol": "ip", "field": "daddr"}}


def _rule(chain: str, *expr: dict[str, Any]) -> dict[str, Any]:
    return {"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": chain, "expr": list(expr)}}}


def base_ruleset(deny: Iterable[str]) -> list[dict[str, Any]]:
    """Commands creating the worker's table (see the module docstring).

    Args:
        deny: IPv4 CIDRs or addresses that no bunker may reach.
    """
    established = _match({"ct": {"key": "state"}}, ["established", "related"], "in")
    return [
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
        {"add": _obj("set", name="deny4", type="ipv4_addr", flags=["interval"])},
        {
            "add": {
                "element": {
                    "family": FAMILY,
                    "table": TABLE,
                    "name": "deny4",
                    "elem": _prefixes(deny),
                }
            }
        },
        {"add": _obj("map", name="bunkers", type="ifname", map="verdict")},
        {"add": _obj("map", name="egress", type="ifname", map="verdict")},
        {"add": _obj("set", name="dns", type=["ifname", "ipv4_addr"])},
        {"add": _obj("map", name="guard", type="ifname", map="verdict")},
        {"add": _obj("chain", name="prerouting", type="filter", hook="prerouting", prio=-300)},
        _rule("prerouting", {"vmap": {"key": _meta("iifname"), "data": "@guard"}}),
        {
            "add": _obj(
                "chain", name="forward", type="filter", hook="forward", prio=0, policy="drop"
            )
        },
        {"add": _obj("chain", name="input", type="filter", hook="input", prio=0, policy="drop")},
        {
            "add": _obj(
                "chain",
                name="postrouting",
                type="nat",
                hook="postrouting",
                prio=100,
                policy="accept",
            )
        },
        _rule(
            "forward",
            _match(_meta("oifname"), UPLINK_IF),
            {"vmap": {"key": _meta("iifname"), "data": "@egress"}},
        ),
        _rule("forward", established, {"accept": None}),
        _rule("forward", {"vmap": {"key": _meta("iifname"), "data": "@bunkers"}}),
        _rule("input", _match(_meta("iifname"), "lo"), {"accept": None}),
        _rule("input", established, {"accept": None}),
        _rule(
            "input",
            _match(_meta("l4proto"), "udp"),
            _match({"payload": {"protocol": "th", "field": "dport"}}, 53),
            _match({"concat": [_meta("iifname"), _daddr()]}, "@dns"),
            {"accept": None},
        ),
        _rule("postrouting", _match(_meta("oifname"), UPLINK_IF), {"masquerade": None}),
    ]


def _note_denied(chain: str, denied: str, *conditions: dict[str, Any]) -> dict[str, Any]:
    """A rule counting TCP/UDP packets about to be denied in ``denied`` (no verdict)."""
    key = {
        "concat": [_daddr(), _meta("l4proto"), {"payload": {"protocol": "th", "field": "dport"}}]
    }
    update = {"op": "update", "elem": key, "set": f"@{denied}", "stmt": [{"counter": None}]}
    return _rule(
        chain,
        *conditions,
        _match(_meta("l4proto"), {"set": ["tcp", "udp"]}),
        {"set": update},
    )


def bunker_add(
    slot: int,
    ifname: str,
    gateway: str,
    *,
    open_egress: bool,
    source: str,
    police_mbit: int | None = None,
) -> list[dict[str, Any]]:
    """Commands adding one bunker's chains, allow set and map entries.

    Args:
        slot: the bunker's address slot (names ``b_<slot>``, ``g_<slot>``, ``allow_<slot>``).
        ifname: router-side interface of the bunker's veth.
        gateway: the bunker's gateway (and DNS resolver) address.
        open_egress: ``True`` for ``unrestricted``/``transit`` (any destination but deny4),
            ``False`` for ``registry``/``allowlisted`` (only ``allow_<slot>``).
        source: the bunker's own ``eth0`` address; IPv4 packets from ``ifname`` with any
            other source are dropped in ``g_<slot>`` (anti-spoofing, every profile).
        police_mbit: drop what the bunker sends to the uplink beyond this many Mbit/s, before
            ``egress_<slot>`` counts it: the cap of a bunker that could remove the ``tbf`` on
            its own ``eth0`` (``transit``); ``None``: none. The kernel's byte limit starts
            with one second of rate (plus the burst) in its bucket, so that much passes at
            once; the long-run rate is exact (16 Mbit/s measured over 16 MiB).
    """
    chain, allow, counter = f"b_{slot}", f"allow_{slot}", egress_counter(slot)
    guard = f"g_{slot}"
    saddr = {"payload": {"protocol": "ip", "field": "saddr"}}
    to_uplink = _match(_meta("oifname"), UPLINK_IF)
    egress = (
        _rule(chain, to_uplink, {"counter": None}, {"accept": None})
        if open_egress
        else _rule(
            chain, to_uplink, _match(_daddr(), f"@{allow}"), {"counter": None}, {"accept": None}
        )
    )
    denied = f"denied_{slot}"
    return [
        {"add": _obj("chain", name=guard)},
        _rule(guard, _match(saddr, source, "!="), {"counter": None}, {"drop": None}),
        {
            "add": {
                "element": {
                    "family": FAMILY,
                    "table": TABLE,
                    "name": "guard",
                    "elem": [[ifname, {"jump": {"target": guard}}]],
                }
            }
        },
        {"add": _obj("counter", name=counter)},
        {"add": _obj("chain", name=f"e_{slot}")},
        *(
            [
                _rule(
                    f"e_{slot}",
                    {
                        "limit": {
                            "rate": police_mbit * 125_000,
                            "rate_unit": "bytes",
                            "per": "second",
                            "burst": max(16 * 1024, police_mbit * 1250),
                            "burst_unit": "bytes",
                            "inv": True,
                        }
                    },
                    {"drop": None},
                )
            ]
            if police_mbit is not None
            else []
        ),
        _rule(f"e_{slot}", {"counter": counter}),
        {
            "add": {
                "element": {
                    "family": FAMILY,
                    "table": TABLE,
                    "name": "egress",
                    "elem": [[ifname, {"jump": {"target": f"e_{slot}"}}]],
                }
            }
        },
        {"add": _obj("set", name=allow, type="ipv4_addr", flags=["timeout"])},
        {
            "add": _obj(
                "set",
                name=denied,
                type=["ipv4_addr", "inet_proto", "inet_service"],
                flags=["timeout"],
                timeout=DENIED_TIMEOUT_S,
                size=DENIED_SIZE,
                stmt=[{"counter": None}],
            )
        },
        {"add": _obj("chain", name=chain)},
        _note_denied(chain, denied, _match(_daddr(), "@deny4")),
        _rule(chain, _match(_daddr(), "@deny4"), {"counter": None}, {"drop": None}),
        egress,
        _note_denied(chain, denied),
        _rule(chain, {"counter": None}, {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}),
        {
            "add": {
                "element": {
                    "family": FAMILY,
                    "table": TABLE,
                    "name": "bunkers",
                    "elem": [[ifname, {"jump": {"target": chain}}]],
                }
            }
        },
        {
            "add": {
                "element": {
                    "family": FAMILY,
                    "table": TABLE,
                    "name": "dns",
                    "elem": [{"concat": [ifname, gateway]}],
                }
            }
        },
    ]


def bunker_delete(slot: int, ifname: str, gateway: str) -> list[dict[str, Any]]:
    """Commands removing what :func:`bunker_add` created (the map entries first)."""
    return [
        {
            "delete": {
                "element": {"family": FAMILY, "table": TABLE, "name": "guard", "elem": [ifname]}
            }
        },
        {"flush": _obj("chain", name=f"g_{slot}")},
        {"delete": _obj("chain", name=f"g_{slot}")},
        {
            "delete": {
                "element": {"family": FAMILY, "table": TABLE, "name": "bunkers", "elem": [ifname]}
            }
        },
        {
            "delete": {
                "element": {"family": FAMILY, "table": TABLE, "name": "egress", "elem": [ifname]}
            }
        },
        {"flush": _obj("chain", name=f"e_{slot}")},
        {"delete": _obj("chain", name=f"e_{slot}")},
        {
            "delete": {
                "element": {
                    "family": FAMILY,
                    "table": TABLE,
                    "name": "dns",
                    "elem": [{"concat": [ifname, gateway]}],
                }
            }
        },
        {"flush": _obj("chain", name=f"b_{slot}")},
        {"delete": _obj("chain", name=f"b_{slot}")},
        {"delete": _obj("set", name=f"allow_{slot}")},
        {"delete": _obj("set", name=f"denied_{slot}")},
        {"delete": _obj("counter", name=egress_counter(slot))},
    ]


def egress_counter(slot: int) -> str:
    """Name of the named counter of bytes bunker ``slot`` sent out of the uplink."""
    return f"egress_{slot}"


def list_counters() -> dict[str, Any]:
    """The ``list counters`` command object for the worker's table."""
    return {"list": {"counters": {"family": FAMILY, "table": TABLE}}}


def counter_bytes(output: dict[str, Any]) -> dict[str, int]:
    """``{counter name: bytes}`` from the JSON output of :func:`list_counters`."""
    found: dict[str, int] = {}
    for obj in output.get("nftables", []):
        listed = obj.get("counter") if isinstance(obj, dict) else None
        if isinstance(listed, dict) and isinstance(listed.get("name"), str):
            found[listed["name"]] = int(listed.get("bytes", 0))
    return found


def denied_elements(ruleset_set: dict[str, Any]) -> list[tuple[str, str, int, int, int]]:
    """``(dst_ip, proto, dst_port, packets, bytes)`` of each element of a listed
    ``denied_<slot>`` set (the ``set`` object of ``list set`` JSON output)."""
    out: list[tuple[str, str, int, int, int]] = []
    for item in ruleset_set.get("elem", []):
        elem = item.get("elem", item) if isinstance(item, dict) else item
        value = elem.get("val", elem) if isinstance(elem, dict) else elem
        counter = elem.get("counter", {}) if isinstance(elem, dict) else {}
        parts = value.get("concat") if isinstance(value, dict) else None
        if not isinstance(parts, list) or len(parts) != 3:
            continue
        out.append(
            (
                str(parts[0]),
                str(parts[1]),
                int(parts[2]),
                int(counter.get("packets", 0)),
                int(counter.get("bytes", 0)),
            )
        )
    return out


def list_set(slot: int, prefix: str = "denied") -> dict[str, Any]:
    """The ``list set`` command object for ``<prefix>_<slot>``."""
    return {"list": _obj("set", name=f"{prefix}_{slot}")}


def delete_denied(slot: int, entries: list[tuple[str, str, int]]) -> list[dict[str, Any]]:
    """Commands removing read elements from ``denied_<slot>`` (so counters restart)."""
    elems = [{"concat": [ip, proto, port]} for ip, proto, port in entries]
    return [
        {
            "delete": {
                "element": {
                    "family": FAMILY,
                    "table": TABLE,
                    "name": f"denied_{slot}",
                    "elem": elems,
                }
            }
        }
    ]


def allow_addresses(slot: int, addresses: Iterable[str], timeout_s: int) -> list[dict[str, Any]]:
    """Commands adding ``addresses`` to ``allow_<slot>`` for ``timeout_s`` seconds."""
    elems = [{"elem": {"val": addr, "timeout": timeout_s}} for addr in addresses]
    return [
        {
            "add": {
                "element": {
                    "family": FAMILY,
                    "table": TABLE,
                    "name": f"allow_{slot}",
                    "elem": elems,
                }
            }
        }
    ]

"""Who may create which network profile (SPEC §8.1, §8.6), and what the worker is told."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from scaigrid import errors
from scaigrid.modules.scaibunker.network.config import NetworkConfig
from scaigrid.modules.scaibunker.network.interfaces import InterfaceSpec
from scaigrid.platform.auth.principal import Principal

#: Permission each profile needs; ``isolated`` needs none.
PROFILE_PERMISSION = {
    "registry": "scaibunker:network:registry",
    "allowlisted": "scaibunker:network:allowlisted",
    "unrestricted": "scaibunker:network:unrestricted",
    "transit": "scaibunker:network:transit",
}
L2_TRANSPARENCY = "scaibunker:l2_transparency"


def check_profile(
    principal: Principal, profile: str, interfaces: Sequence[InterfaceSpec] | None
) -> None:
    """Admit ``profile`` and its interfaces for ``principal`` (SPEC §2.3.1 steps 5, 7, 8).

    Raises:
        errors.TransitMissingInterfaces: ``transit`` without interfaces.
        errors.InterfacesNotAllowed: interfaces (even an empty list) with another profile.
        errors.NetworkProfileDenied: ``NETWORK_PROFILE_DENIED``, the permission is missing.
        errors.AuthzPermissionDenied: an interface has ``spoof_guard: false`` and the caller
            lacks ``scaibunker:l2_transparency`` (details name the key).
    """
    if profile == "transit" and not interfaces:
        raise errors.TransitMissingInterfaces("transit bunkers need at least one interface")
    if profile != "transit" and interfaces is not None:
        raise errors.InterfacesNotAllowed("interfaces need the transit profile")
    key = PROFILE_PERMISSION.get(profile)
    if key is not None and not principal.has(key):
        raise errors.NetworkProfileDenied(f"the {profile} network profile needs {key}")
    if any(not i.spoof_guard for i in interfaces or ()) and not principal.has(L2_TRANSPARENCY):
        raise errors.AuthzPermissionDenied(
            f"spoof_guard: false needs {L2_TRANSPARENCY}", details={"permission": L2_TRANSPARENCY}
        )


def worker_allowlist(
    config: NetworkConfig, profile: str, allowlist: list[str] | None
) -> list[str] | None:
    """The names the worker's resolver allows: ``registry_hosts`` for ``registry``, the
    bunker's list for ``allowlisted``, ``None`` (any) otherwise."""
    if profile == "registry":
        return list(config.registry_hosts)
    if profile == "allowlisted":
        return list(allowlist or [])
    return None


def worker_network(config: NetworkConfig) -> dict[str, Any]:
    """The ``network`` object of ``bunker.create``: ``{dns_upstreams, egress_audit}``."""
    return {"dns_upstreams": list(config.dns_upstreams), "egress_audit": config.egress_audit}

"""Who may create which network profile (SPEC §8.1, §8.6), and what the worker is told."""

from __future__ import annotations

from typing import Any

from scaigrid import errors
from scaigrid.modules.scaibunker.network.config import NetworkConfig
from scaigrid.platform.auth.principal import Principal

#: Permission each profile needs; ``isolated`` needs none.
PROFILE_PERMISSION = {
    "registry": "scaibunker:network:registry",
    "allowlisted": "scaibunker:network:allowlisted",
    "unrestricted": "scaibunker:network:unrestricted",
    "transit": "scaibunker:network:transit",
}


def check_profile(principal: Principal, profile: str, interfaces: list[Any] | None) -> None:
    """Admit ``profile`` for ``principal``.

    Raises:
        errors.NetworkProfileDenied: ``NETWORK_PROFILE_DENIED``, the permission is missing.
        errors.TransitMissingInterfaces: ``transit`` without interfaces.
        errors.InterfacesNotAllowed: interfaces with another profile.
        errors.ValidationFailed: transit interfaces (bridges are not available yet).
    """
    key = PROFILE_PERMISSION.get(profile)
    if key is not None and not principal.has(key):
        raise errors.NetworkProfileDenied(f"the {profile} network profile needs {key}")
    if profile == "transit":
        if not interfaces:
            raise errors.TransitMissingInterfaces("transit bunkers need at least one interface")
        raise errors.ValidationFailed(
            "tenant bridges are not available on this controller yet",
            details=[{"field": "interfaces", "message": "bridges are not available"}],
        )
    if interfaces is not None:
        raise errors.InterfacesNotAllowed("interfaces need the transit profile")


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

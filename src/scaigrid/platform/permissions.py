"""Built-in roles and the permission keys each one holds (SPEC §1.11).

This is the one place that maps a role to keys. Custom roles and direct grants (a later
issue) will add keys on top of these; built-in roles never lose keys.

Core keys (``modules:use``, ``modules:manage``, ``admin:access``) are not tabled in the SPEC;
the mapping here is the platform's decision: every role may *use* enabled modules (module keys
then decide what it can do), administrators (super, partner and tenant) may manage modules,
and every administrator and the partner viewer may reach the admin surface.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class Role(StrEnum):
    """Built-in roles, from the widest to the narrowest reach."""

    SUPER_ADMIN = "super_admin"
    PARTNER_ADMIN = "partner_admin"
    PARTNER_VIEWER = "partner_viewer"
    TENANT_ADMIN = "tenant_admin"
    TENANT_USER = "tenant_user"
    TENANT_VIEWER = "tenant_viewer"


MODULES_USE = "modules:use"
MODULES_MANAGE = "modules:manage"
ADMIN_ACCESS = "admin:access"

#: Core platform keys.
CORE_PERMISSIONS: frozenset[str] = frozenset({MODULES_USE, MODULES_MANAGE, ADMIN_ACCESS})

#: The sixteen ScaiBunker keys, in SPEC §1.11 table order.
SCAIBUNKER_PERMISSIONS: tuple[str, ...] = (
    "scaibunker:create",
    "scaibunker:create:session",
    "scaibunker:create:persistent",
    "scaibunker:execute",
    "scaibunker:shell",
    "scaibunker:files",
    "scaibunker:root",
    "scaibunker:network:registry",
    "scaibunker:network:allowlisted",
    "scaibunker:network:unrestricted",
    "scaibunker:network:transit",
    "scaibunker:l2_transparency",
    "scaibunker:images:manage",
    "scaibunker:admin",
    "scaibunker:admin:tenant",
    "scaibunker:admin:platform",
)

#: Every key the platform knows.
ALL_PERMISSIONS: frozenset[str] = CORE_PERMISSIONS | frozenset(SCAIBUNKER_PERMISSIONS)

_SCAIBUNKER = frozenset(SCAIBUNKER_PERMISSIONS)

ROLE_PERMISSIONS: Mapping[Role, frozenset[str]] = {
    Role.SUPER_ADMIN: ALL_PERMISSIONS,
    Role.PARTNER_ADMIN: CORE_PERMISSIONS | (_SCAIBUNKER - {"scaibunker:admin:platform"}),
    Role.PARTNER_VIEWER: frozenset({MODULES_USE, ADMIN_ACCESS}),
    Role.TENANT_ADMIN: CORE_PERMISSIONS
    | (_SCAIBUNKER - {"scaibunker:admin", "scaibunker:admin:platform"}),
    Role.TENANT_USER: frozenset({MODULES_USE}),
    Role.TENANT_VIEWER: frozenset({MODULES_USE}),
}


def permissions_for_role(role: Role | str) -> frozenset[str]:
    """Return the keys a built-in role holds.

    Raises:
        ValueError: ``role`` is not a built-in role.
    """
    return ROLE_PERMISSIONS[Role(role)]

"""Built-in role → permission keys (SPEC §1.11 "Default role mapping")."""

from __future__ import annotations

import pytest

from scaigrid.platform.auth.principal import Principal
from scaigrid.platform.permissions import (
    ALL_PERMISSIONS,
    SCAIBUNKER_PERMISSIONS,
    Role,
    permissions_for_role,
)

SCAIBUNKER = set(SCAIBUNKER_PERMISSIONS)


def test_the_sixteen_scaibunker_keys_of_the_spec() -> None:
    assert len(SCAIBUNKER) == 16
    assert {"scaibunker:create", "scaibunker:admin:platform", "scaibunker:l2_transparency"} <= (
        SCAIBUNKER
    )
    assert {"modules:use", "modules:manage", "admin:access"} <= ALL_PERMISSIONS


@pytest.mark.parametrize(
    ("role", "scaibunker_keys"),
    [
        (Role.SUPER_ADMIN, SCAIBUNKER),
        (Role.PARTNER_ADMIN, SCAIBUNKER - {"scaibunker:admin:platform"}),
        (Role.PARTNER_VIEWER, set()),
        (Role.TENANT_ADMIN, SCAIBUNKER - {"scaibunker:admin", "scaibunker:admin:platform"}),
        (Role.TENANT_USER, set()),
        (Role.TENANT_VIEWER, set()),
    ],
)
def test_role_mapping_matches_spec_table(role: Role, scaibunker_keys: set[str]) -> None:
    keys = permissions_for_role(role)
    assert {k for k in keys if k.startswith("scaibunker:")} == scaibunker_keys


def test_tenant_admin_holds_admin_tenant_and_every_role_may_use_modules() -> None:
    assert "scaibunker:admin:tenant" in permissions_for_role(Role.TENANT_ADMIN)
    assert all("modules:use" in permissions_for_role(role) for role in Role)
    assert "modules:manage" not in permissions_for_role(Role.TENANT_USER)
    assert permissions_for_role(Role.SUPER_ADMIN) == ALL_PERMISSIONS


def test_unknown_role_is_refused() -> None:
    with pytest.raises(ValueError):
        permissions_for_role("owner")


def test_principal_has_and_is_super_admin() -> None:
    principal = Principal(
        user_id="usr_1",
        tenant_id="ten_1",
        partner_id="ptn_1",
        role=Role.TENANT_ADMIN,
        api_key_id="key_1",
        permissions=permissions_for_role(Role.TENANT_ADMIN),
    )
    assert principal.has("scaibunker:create")
    assert not principal.has("scaibunker:admin")
    assert not principal.is_super_admin

"""The authenticated caller of a request."""

from __future__ import annotations

from dataclasses import dataclass

from scaigrid.platform.permissions import Role


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, where they sit in the hierarchy and what they may do.

    Attributes:
        user_id: ``usr_…`` of the caller (an API key's owner).
        tenant_id: ``ten_…`` of the caller's tenant.
        partner_id: ``ptn_…`` of that tenant's partner.
        role: the caller's built-in role.
        api_key_id: ``key_…`` of the credential used, or None for non-key credentials.
        permissions: every permission key the caller holds (SPEC §1.11).
    """

    user_id: str
    tenant_id: str
    partner_id: str
    role: Role
    api_key_id: str | None
    permissions: frozenset[str]

    def has(self, key: str) -> bool:
        """Return True when the caller holds permission ``key`` (e.g. ``scaibunker:create``)."""
        return key in self.permissions

    @property
    def is_super_admin(self) -> bool:
        """True for ``super_admin``: administrative keys reach every tenant (SPEC §1.3)."""
        return self.role is Role.SUPER_ADMIN

    @property
    def is_partner_admin(self) -> bool:
        """True for ``partner_admin``: administrative keys reach the partner's tenants."""
        return self.role is Role.PARTNER_ADMIN

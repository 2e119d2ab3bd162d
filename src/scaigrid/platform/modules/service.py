"""Module enablement and configuration per scope (SPEC §1.10).

A module is enabled for a tenant unless disabled for that tenant or for its partner (a
partner-level disable overrides a tenant-level enable). Configuration: the module's
``config_model`` (a pydantic model whose defaults are the ``global_config``) merged with
the overrides stored for the scope; a ``null`` value removes an override.

Functions flush but never commit.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.platform.handlers import field_path
from scaigrid.platform.modules.models import ModuleScope

TENANT = "tenant"
PARTNER = "partner"


async def _row(session: AsyncSession, module: str, scope_type: str, scope_id: str) -> ModuleScope:
    row = await session.get(ModuleScope, (module, scope_type, scope_id))
    if row is None:
        row = ModuleScope(
            module=module, scope_type=scope_type, scope_id=scope_id, enabled=True, config={}
        )
        session.add(row)
    return row


class EnabledCache:
    """Recent yes/no answers per ``(module, tenant_id, partner_id)`` — of :func:`is_enabled`
    (``app.state.module_enabled_cache``) and of the ``read_audit`` config
    (``app.state.read_audit_cache``) — so module routes cost no extra database round trip
    per request. An entry lives ``ttl_s`` seconds (``SCAIGRID_AUTH_CACHE_TTL_S``); an enable,
    disable or config change through this process clears the cache at once.
    """

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[tuple[str, str, str], tuple[float, bool]] = {}

    def get(self, key: tuple[str, str, str]) -> bool | None:
        """The cached answer for ``(module, tenant_id, partner_id)``, or None."""
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, key: tuple[str, str, str], enabled: bool) -> None:
        """Remember an answer for ``ttl_s`` seconds."""
        if self.ttl_s > 0:
            if len(self._entries) >= 10_000:
                self._entries.clear()
            self._entries[key] = (time.monotonic() + self.ttl_s, enabled)

    def clear(self) -> None:
        """Forget every answer (a scope was enabled or disabled)."""
        self._entries.clear()


async def is_enabled(session: AsyncSession, module: str, tenant_id: str, partner_id: str) -> bool:
    """True unless ``module`` is disabled for the tenant or for its partner."""
    query = select(ModuleScope.enabled).where(
        ModuleScope.module == module,
        ModuleScope.enabled.is_(False),
        (
            ((ModuleScope.scope_type == TENANT) & (ModuleScope.scope_id == tenant_id))
            | ((ModuleScope.scope_type == PARTNER) & (ModuleScope.scope_id == partner_id))
        ),
    )
    return await session.scalar(query.limit(1)) is None


async def set_enabled(
    session: AsyncSession, module: str, scope_type: str, scope_id: str, enabled: bool
) -> bool:
    """Enable or disable ``module`` for a scope; return whether it was enabled before."""
    row = await _row(session, module, scope_type, scope_id)
    before = bool(row.enabled) if row.enabled is not None else True
    row.enabled = enabled
    await session.flush()
    return before


def global_config(model: type[BaseModel] | None) -> dict[str, Any]:
    """The module's defaults (``{}`` for a module without configuration)."""
    return {} if model is None else model().model_dump(mode="json")


async def scope_config(
    session: AsyncSession, module: str, scope_type: str, scope_id: str
) -> dict[str, Any]:
    """The overrides stored for the scope."""
    row = await session.get(ModuleScope, (module, scope_type, scope_id))
    return dict(row.config) if row is not None else {}


async def put_config(
    session: AsyncSession,
    model: type[BaseModel] | None,
    module: str,
    scope_type: str,
    scope_id: str,
    changes: dict[str, Any],
) -> dict[str, Any]:
    """Merge ``changes`` into the scope's overrides (``None`` resets a key) and return them.

    Raises:
        ValidationFailed: unknown keys or invalid values, each named in ``details`` (422).
    """
    row = await _row(session, module, scope_type, scope_id)
    merged = dict(row.config or {})
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    if model is None:
        if merged:
            raise errors.ValidationFailed(f"Module {module} has no configuration")
    else:
        try:
            model.model_validate({**global_config(model), **merged})
        except ValidationError as exc:
            raise errors.ValidationFailed(
                "Invalid module configuration",
                details=[
                    {"field": field_path(e["loc"]), "message": e["msg"]} for e in exc.errors()
                ],
            ) from exc
    row.config = merged
    await session.flush()
    return merged


async def effective_value(
    session: AsyncSession,
    model: type[BaseModel] | None,
    module: str,
    tenant_id: str,
    partner_id: str,
    key: str,
) -> Any:
    """The value of config ``key`` for a tenant: its own override, else its partner's, else
    the global default (None when the module has no such key)."""
    rows = {
        row.scope_type: row.config
        for row in await session.scalars(
            select(ModuleScope).where(
                ModuleScope.module == module,
                ((ModuleScope.scope_type == TENANT) & (ModuleScope.scope_id == tenant_id))
                | ((ModuleScope.scope_type == PARTNER) & (ModuleScope.scope_id == partner_id)),
            )
        )
    }
    for scope_type in (TENANT, PARTNER):
        overrides = rows.get(scope_type) or {}
        if key in overrides:
            return overrides[key]
    return global_config(model).get(key)

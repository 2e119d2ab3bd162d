"""Module administration (SPEC §1.10) under ``/v1/modules``: catalogue, module record,
enable, disable and configuration per scope.

The scope of enable/disable/config is the caller's tenant unless ``tenant_id`` or
``partner_id`` names another one within the caller's reach; partner scopes need a
``partner_admin`` of that partner or a ``super_admin``. These routes need
``modules:manage``.
"""

from __future__ import annotations

from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import HTTPConnection

from scaigrid import __version__, errors
from scaigrid.platform.auth import CurrentPrincipal, Principal, require
from scaigrid.platform.db import get_session
from scaigrid.platform.envelope import ok, ok_list
from scaigrid.platform.modules import service
from scaigrid.platform.modules.loader import DisableAwareModule, PlatformModule
from scaigrid.platform.permissions import MODULES_MANAGE, Role
from scaigrid.platform.tenancy.models import Tenant
from scaigrid.platform.tenancy.router import administered_tenant

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/v1/modules", tags=["modules"])
Session = Annotated[AsyncSession, Depends(get_session)]
Manager = Annotated[Principal, Depends(require(MODULES_MANAGE))]


def _loaded(request: Request) -> dict[str, PlatformModule]:
    modules: dict[str, PlatformModule] = request.app.state.modules
    return modules


def _module(request: Request, name: str) -> PlatformModule:
    module = _loaded(request).get(name)
    if module is None:
        raise errors.NotFound(f"No module {name!r}")
    return module


def _config_model(module: PlatformModule) -> type[BaseModel] | None:
    model: type[BaseModel] | None = getattr(module, "config_model", None)
    return model


async def _record(session: AsyncSession, module: PlatformModule, p: Principal) -> dict[str, Any]:
    enabled = await service.is_enabled(session, module.name, p.tenant_id, p.partner_id)
    return {
        "id": module.name,
        "name": module.name,
        "status": "active" if enabled else "disabled",
        "version": __version__,
    }


@router.get("")
async def list_modules(
    request: Request, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """Every loaded module as ``{id, name, status, version}``; ``status`` is ``active`` or,
    when disabled for the caller's tenant or partner, ``disabled``."""
    records = [await _record(session, m, principal) for m in _loaded(request).values()]
    return ok_list(records, None)


@router.get("/{name}")
async def get_module(
    name: str, request: Request, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """One module record (404 ``NOT_FOUND`` for an unknown module)."""
    return ok(await _record(session, _module(request, name), principal))


async def _scope(
    session: AsyncSession, principal: Principal, tenant_id: str | None, partner_id: str | None
) -> tuple[str, str, list[str]]:
    """``(scope_type, scope_id, tenant ids it covers)`` for the request's scope."""
    if tenant_id is not None and partner_id is not None:
        raise errors.ValidationFailed("Give tenant_id or partner_id, not both")
    if partner_id is None:
        tenant = await administered_tenant(session, principal, tenant_id or principal.tenant_id)
        return service.TENANT, tenant.id, [tenant.id]
    allowed = principal.is_super_admin or (
        principal.role is Role.PARTNER_ADMIN and partner_id == principal.partner_id
    )
    if not allowed:
        raise errors.NotFound(f"No partner {partner_id}")
    tenants = list(await session.scalars(select(Tenant.id).where(Tenant.partner_id == partner_id)))
    return service.PARTNER, partner_id, tenants


async def _switch(
    request: Request,
    name: str,
    principal: Principal,
    session: AsyncSession,
    tenant_id: str | None,
    partner_id: str | None,
    enabled: bool,
) -> JSONResponse:
    module = _module(request, name)
    scope_type, scope_id, tenants = await _scope(session, principal, tenant_id, partner_id)
    await service.set_enabled(session, module.name, scope_type, scope_id, enabled)
    await session.commit()
    cache: service.EnabledCache | None = getattr(request.app.state, "module_enabled_cache", None)
    if cache is not None:
        cache.clear()
    log.info("module.switched", module=name, scope=scope_type, scope_id=scope_id, enabled=enabled)
    if not enabled and isinstance(module, DisableAwareModule):
        for tenant in tenants:
            await module.on_disable(request.app, tenant)
    return ok({"module": name, "scope_type": scope_type, "scope_id": scope_id, "enabled": enabled})


@router.post("/{name}/enable")
async def enable_module(
    name: str,
    request: Request,
    principal: Manager,
    session: Session,
    tenant_id: str | None = None,
    partner_id: str | None = None,
) -> JSONResponse:
    """Enable the module for the scope."""
    return await _switch(request, name, principal, session, tenant_id, partner_id, True)


@router.post("/{name}/disable")
async def disable_module(
    name: str,
    request: Request,
    principal: Manager,
    session: Session,
    tenant_id: str | None = None,
    partner_id: str | None = None,
) -> JSONResponse:
    """Disable the module for the scope: its routes answer 403 ``MODULE_NOT_ENABLED`` to the
    scope's callers, and the module ends what it runs there (``on_disable``); data is kept."""
    return await _switch(request, name, principal, session, tenant_id, partner_id, False)


@router.get("/{name}/config")
async def get_config(
    name: str,
    request: Request,
    principal: Manager,
    session: Session,
    tenant_id: str | None = None,
    partner_id: str | None = None,
) -> JSONResponse:
    """``{"global_config": defaults, "scope_config": overrides of the scope}``."""
    module = _module(request, name)
    scope_type, scope_id, _ = await _scope(session, principal, tenant_id, partner_id)
    return ok(
        {
            "global_config": service.global_config(_config_model(module)),
            "scope_config": await service.scope_config(session, name, scope_type, scope_id),
        }
    )


@router.put("/{name}/config")
async def put_config(
    name: str,
    request: Request,
    principal: Manager,
    session: Session,
    changes: Annotated[dict[str, Any], Body()],
    tenant_id: str | None = None,
    partner_id: str | None = None,
) -> JSONResponse:
    """Merge ``changes`` into the scope's overrides; ``null`` resets a key to the global
    value; unknown keys or invalid values → 422 ``VALIDATION_ERROR``."""
    module = _module(request, name)
    scope_type, scope_id, _ = await _scope(session, principal, tenant_id, partner_id)
    merged = await service.put_config(
        session, _config_model(module), name, scope_type, scope_id, changes
    )
    await session.commit()
    read_audit: service.EnabledCache | None = getattr(request.app.state, "read_audit_cache", None)
    if read_audit is not None:
        read_audit.clear()
    return ok(
        {"global_config": service.global_config(_config_model(module)), "scope_config": merged}
    )


def module_guard(name: str) -> Any:
    """Router dependency for a mounted module: marks the request so that
    :func:`~scaigrid.platform.auth.current_principal` refuses callers whose tenant or
    partner has the module disabled (403 ``MODULE_NOT_ENABLED``)."""

    async def mark(connection: HTTPConnection) -> None:
        # HTTPConnection, not Request: the guard also runs for WebSocket routes.
        connection.state.module = name

    return Depends(mark)

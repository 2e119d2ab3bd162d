"""Tenant bridges (SPEC §8.8) and the transit side of bunker creation (SPEC §2.3.1, §8.6).

Routes: ``POST/GET /bridges``, ``GET/DELETE /bridges/{id}``. A bridge is created on its
worker (task ``bridge.create``, ≤ 10 s) before its row is committed, so a listed bridge
exists on its worker; when the worker reconnects the controller re-creates its bridges
(:func:`recreate_bridges`). Deleting a bridge that a non-terminal bunker names is refused
(``RESOURCE_IN_USE``); the check and the delete run under the placement lock, as do the
bridge lookups of a transit create, so a bunker cannot attach to a bridge being deleted.

Visibility: ``scaibunker:admin`` within reach (every tenant for ``super_admin``, the
partner's tenants for ``partner_admin``, else the own tenant); ``scaibunker:network:transit``
reads its own tenant's bridges. Invisible bridges answer ``BRIDGE_NOT_FOUND``.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.ids import new_id
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.bunkers.schemas import iso
from scaigrid.modules.scaibunker.bunkers.states import TERMINAL
from scaigrid.modules.scaibunker.network.interfaces import (
    BRIDGE_NAME_PATTERN,
    InterfaceSpec,
    generated_mac,
)
from scaigrid.modules.scaibunker.network.models import Bridge
from scaigrid.modules.scaibunker.state import ModuleState, get_state
from scaigrid.modules.scaibunker.workers.hub import WorkerConnection
from scaigrid.modules.scaibunker.workers.models import Worker
from scaigrid.platform.audit.service import AuditEntry, AuditLog
from scaigrid.platform.auth import Principal, current_principal
from scaigrid.platform.db import get_session, utcnow
from scaigrid.platform.envelope import ok, ok_list, request_id_from_scope
from scaigrid.platform.pagination import Limit, id_cursor
from scaigrid.platform.tenancy.models import Tenant
from scaigrid.protocol.link import TaskKind

log = structlog.get_logger(__name__)

router = APIRouter(tags=["bridges"])
SessionDep = Annotated[AsyncSession, Depends(get_session)]
StateDep = Annotated[ModuleState, Depends(get_state)]
PrincipalDep = Annotated[Principal, Depends(current_principal)]

#: Seconds the worker has to create or delete a bridge (SPEC §8.8).
BRIDGE_TASK_TIMEOUT_S = 10.0
ADMIN = "scaibunker:admin"
TRANSIT = "scaibunker:network:transit"
L2_TRANSPARENCY = "scaibunker:l2_transparency"
L2_AUDIT_ACTION = "scaibunker.bunker.l2_transparency"


class CreateBridgeRequest(BaseModel):
    """Body of ``POST /bridges``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=BRIDGE_NAME_PATTERN)
    worker_id: str = Field(min_length=1, max_length=32)
    vlan_id: int | None = Field(default=None, ge=1, le=4094)
    tenant_id: str | None = Field(default=None, min_length=1, max_length=32)


def bridge_to_dict(bridge: Bridge) -> dict[str, Any]:
    """Render a bridge as its API object (SPEC §8.8)."""
    return {
        "id": bridge.id,
        "name": bridge.name,
        "tenant_id": bridge.tenant_id,
        "worker_id": bridge.worker_id,
        "vlan_id": bridge.vlan_id,
        "created_at": iso(bridge.created_at),
    }


def bridge_device(bridge_id: str) -> str:
    """The worker device name of bridge ``bridge_id``: ``br`` + 12 hex digits of its SHA-256
    (stable, at most 15 characters, unique per worker in practice)."""
    return "br" + hashlib.sha256(bridge_id.encode()).hexdigest()[:12]


# -- visibility ----------------------------------------------------------------------------


async def _admin_reaches(session: AsyncSession, principal: Principal, tenant_id: str) -> bool:
    """Whether ``principal``'s ``scaibunker:admin`` reaches ``tenant_id`` (SPEC §1.3)."""
    if not principal.has(ADMIN):
        return False
    if principal.is_super_admin or tenant_id == principal.tenant_id:
        return True
    if principal.is_partner_admin:
        tenant = await session.get(Tenant, tenant_id)
        return tenant is not None and tenant.partner_id == principal.partner_id
    return False


async def _may_read(session: AsyncSession, principal: Principal, bridge: Bridge) -> bool:
    if bridge.tenant_id == principal.tenant_id and principal.has(TRANSIT):
        return True
    return await _admin_reaches(session, principal, bridge.tenant_id)


async def _visible(session: AsyncSession, principal: Principal, bridge_id: str) -> Bridge:
    bridge = await session.get(Bridge, bridge_id)
    if bridge is None or not await _may_read(session, principal, bridge):
        raise errors.BridgeNotFound(f"bridge {bridge_id} not found")
    return bridge


def _require_any(principal: Principal, *keys: str) -> None:
    if not any(principal.has(key) for key in keys):
        raise errors.AuthzPermissionDenied(
            f"Missing permission {keys[0]}", details={"permission": keys[0]}
        )


# -- worker calls --------------------------------------------------------------------------


async def _create_on(connection: WorkerConnection, bridge: Bridge) -> None:
    await connection.call(
        TaskKind.BRIDGE_CREATE,
        {"bridge_id": bridge.id, "device": bridge.device, "vlan_id": bridge.vlan_id},
        timeout_s=BRIDGE_TASK_TIMEOUT_S,
    )


async def recreate_bridges(state: ModuleState, connection: WorkerConnection) -> int:
    """Reconcile the bridges of ``connection``'s worker (worker reconnect, SPEC §10.3):
    delete the devices the database no longer has (bridges deleted while the worker was
    away), then re-create every bridge it has (``bridge.create`` is idempotent on the
    worker). Returns how many were re-created; failures are logged, not raised."""
    async with state.db.sessionmaker() as session:
        rows = (
            await session.scalars(select(Bridge).where(Bridge.worker_id == connection.worker_id))
        ).all()
    known = {b.device for b in rows}
    try:
        listed = await connection.call(TaskKind.BRIDGE_LIST, {}, timeout_s=BRIDGE_TASK_TIMEOUT_S)
    except errors.ScaiGridError as exc:
        log.warning("bridge_list_failed", worker_id=connection.worker_id, code=exc.code)
        listed = {}
    devices = listed.get("devices")
    for device in devices if isinstance(devices, list) else []:
        if isinstance(device, str) and device not in known:
            try:
                await connection.call(
                    TaskKind.BRIDGE_DELETE, {"device": device}, timeout_s=BRIDGE_TASK_TIMEOUT_S
                )
            except errors.ScaiGridError as exc:
                log.warning("stale_bridge_delete_failed", device=device, code=exc.code)
            else:
                log.info("stale_bridge_deleted", worker_id=connection.worker_id, device=device)
    for bridge in rows:
        try:
            await _create_on(connection, bridge)
        except errors.ScaiGridError as exc:
            log.warning("bridge_recreate_failed", bridge_id=bridge.id, code=exc.code)
    if rows:
        log.info("bridges_recreated", worker_id=connection.worker_id, count=len(rows))
    return len(rows)


# -- routes --------------------------------------------------------------------------------


@router.post("/bridges", status_code=201)
async def create_bridge(
    body: CreateBridgeRequest, principal: PrincipalDep, state: StateDep, session: SessionDep
) -> JSONResponse:
    """Create a bridge on a worker the tenant can use; answer once the device exists.

    Raises:
        errors.AuthzPermissionDenied: no ``scaibunker:admin``, or the tenant is out of reach.
        errors.SlugConflict: the tenant already has a bridge of that name.
        errors.WorkerNotFound: unknown worker, or not usable by the tenant.
        errors.WorkerUnavailable: the worker is not connected or did not create it in 10 s.
    """
    _require_any(principal, ADMIN)
    tenant_id = body.tenant_id or principal.tenant_id
    if not await _admin_reaches(session, principal, tenant_id):
        raise errors.AuthzPermissionDenied(
            f"tenant {tenant_id} is not within reach", details={"permission": ADMIN}
        )
    taken = await session.scalars(
        select(Bridge.id).where(Bridge.tenant_id == tenant_id, Bridge.name == body.name)
    )
    if taken.first() is not None:
        raise errors.SlugConflict(f"the tenant already has a bridge named {body.name}")
    worker = await session.get(Worker, body.worker_id)
    if worker is None or worker.deleted_at is not None or worker.tenant_id not in (None, tenant_id):
        raise errors.WorkerNotFound(f"worker {body.worker_id} not found")
    connection = state.hub.get(worker.id)
    if connection is None:
        raise errors.WorkerUnavailable(f"worker {worker.id} is not connected")
    bridge_id = new_id("brg")
    bridge = Bridge(
        id=bridge_id,
        name=body.name,
        tenant_id=tenant_id,
        worker_id=worker.id,
        vlan_id=body.vlan_id,
        device=bridge_device(bridge_id),
        created_at=utcnow(),
    )
    try:
        await _create_on(connection, bridge)
    except errors.ScaiGridError as exc:
        if isinstance(exc, errors.ValidationFailed):
            raise
        raise errors.WorkerUnavailable(f"worker {worker.id} did not create the bridge") from exc
    session.add(bridge)
    try:
        await session.commit()
    except IntegrityError as exc:
        await session.rollback()
        await _delete_on(state, bridge)
        raise errors.SlugConflict(f"the tenant already has a bridge named {body.name}") from exc
    log.info("bridge_created", bridge_id=bridge.id, worker_id=worker.id, tenant_id=tenant_id)
    return ok(bridge_to_dict(bridge), status_code=201)


@router.get("/bridges")
async def list_bridges(
    principal: PrincipalDep,
    session: SessionDep,
    limit: Limit = 100,
    cursor: Annotated[str | None, id_cursor("brg")] = None,
    worker_id: str | None = None,
) -> JSONResponse:
    """The bridges the caller may read, newest first (cursor: the last id of a page)."""
    _require_any(principal, ADMIN, TRANSIT)
    query = select(Bridge).order_by(Bridge.id.desc())
    if principal.has(ADMIN) and principal.is_super_admin:
        pass
    elif principal.has(ADMIN) and principal.is_partner_admin:
        partner_tenants = select(Tenant.id).where(Tenant.partner_id == principal.partner_id)
        query = query.where(Bridge.tenant_id.in_(partner_tenants))
    else:
        query = query.where(Bridge.tenant_id == principal.tenant_id)
    if worker_id is not None:
        query = query.where(Bridge.worker_id == worker_id)
    if cursor:
        query = query.where(Bridge.id < cursor)
    rows = list((await session.scalars(query.limit(limit + 1))).all())
    more = len(rows) > limit
    page = rows[:limit]
    return ok_list([bridge_to_dict(b) for b in page], page[-1].id if more else None)


@router.get("/bridges/{bridge_id}")
async def get_bridge(bridge_id: str, principal: PrincipalDep, session: SessionDep) -> JSONResponse:
    """One bridge.

    Raises:
        errors.BridgeNotFound: unknown or invisible.
    """
    _require_any(principal, ADMIN, TRANSIT)
    return ok(bridge_to_dict(await _visible(session, principal, bridge_id)))


async def _delete_on(state: ModuleState, bridge: Bridge) -> None:
    connection = state.hub.get(bridge.worker_id)
    if connection is None:
        # A worker that is away removes every bridge when it restarts, and the controller
        # only re-creates bridges that still have rows.
        return
    try:
        await connection.call(
            TaskKind.BRIDGE_DELETE, {"device": bridge.device}, timeout_s=BRIDGE_TASK_TIMEOUT_S
        )
    except errors.ResourceInUse:
        raise
    except errors.ScaiGridError as exc:
        log.warning("bridge_delete_on_worker_failed", bridge_id=bridge.id, code=exc.code)


@router.delete("/bridges/{bridge_id}")
async def delete_bridge(
    bridge_id: str, principal: PrincipalDep, state: StateDep, session: SessionDep
) -> JSONResponse:
    """Delete a bridge no non-terminal bunker uses.

    Raises:
        errors.AuthzPermissionDenied: no ``scaibunker:admin``.
        errors.BridgeNotFound: unknown or invisible.
        errors.ResourceInUse: a non-terminal bunker is attached.
    """
    _require_any(principal, ADMIN)
    bridge = await _visible(session, principal, bridge_id)
    if not await _admin_reaches(session, principal, bridge.tenant_id):
        raise errors.BridgeNotFound(f"bridge {bridge_id} not found")
    async with state.placement_lock:
        users = await bunkers_using(session, bridge)
        if users:
            raise errors.ResourceInUse(
                f"bridge {bridge.name} is used by {len(users)} bunker(s)",
                details={"bunker_ids": users[:20]},
            )
        await _delete_on(state, bridge)
        await session.delete(bridge)
        await session.commit()
    log.info("bridge_deleted", bridge_id=bridge_id)
    return ok({"id": bridge_id, "deleted": True})


async def bunkers_using(session: AsyncSession, bridge: Bridge) -> list[str]:
    """Ids of the non-terminal bunkers of the bridge's tenant with an interface on it."""
    rows = await session.scalars(
        select(Bunker).where(
            Bunker.tenant_id == bridge.tenant_id,
            Bunker.network_profile == "transit",
            Bunker.status.not_in(TERMINAL),
        )
    )
    return [
        b.id for b in rows if any(i.get("bridge_name") == bridge.name for i in b.interfaces or [])
    ]


# -- transit bunkers -----------------------------------------------------------------------


async def resolve_interfaces(
    session: AsyncSession, tenant_id: str, interfaces: list[InterfaceSpec]
) -> tuple[str, list[dict[str, Any]]]:
    """Step 9 of SPEC §2.3.1: every ``bridge_name`` names a bridge of the tenant, all on one
    worker. Returns ``(worker_id, interfaces)`` with the stored interface objects
    ``{if_name, bridge_name, spoof_guard, mac}`` (``mac`` generated when not given).

    Raises:
        errors.ValidationFailed: an unknown bridge name (details name the element), or
            bridges on different workers.
    """
    names = sorted({i.bridge_name for i in interfaces})
    rows = (
        await session.scalars(
            select(Bridge).where(Bridge.tenant_id == tenant_id, Bridge.name.in_(names))
        )
    ).all()
    by_name = {b.name: b for b in rows}
    bad = [
        {
            "field": f"interfaces[{n}].bridge_name",
            "message": f"the tenant has no bridge named {i.bridge_name}",
        }
        for n, i in enumerate(interfaces)
        if i.bridge_name not in by_name
    ]
    if bad:
        raise errors.ValidationFailed("unknown bridge", details=bad)
    workers = {b.worker_id for b in rows}
    if len(workers) != 1:
        raise errors.ValidationFailed(
            "all bridges of a bunker must be on one worker",
            details=[{"field": "interfaces", "message": "bridges are on different workers"}],
        )
    stored = [
        {
            "if_name": i.if_name,
            "bridge_name": i.bridge_name,
            "spoof_guard": i.spoof_guard,
            "mac": i.mac or generated_mac(),
        }
        for i in interfaces
    ]
    return workers.pop(), stored


def transit_isolation(asked: str | None) -> str:
    """The isolation class a transit bunker runs in: ``container`` (the interfaces are veths
    in the bunker's network namespace, which only a container sees directly).

    Raises:
        errors.NoSuitableWorker: ``microvm`` was asked for.
    """
    if asked == "microvm":
        raise errors.NoSuitableWorker("transit interfaces are only offered to container bunkers")
    return "container"


async def worker_interfaces(session: AsyncSession, bunker: Bunker) -> list[dict[str, Any]]:
    """The ``bunker.interfaces`` of ``bunker.create``: ``[{if_name, mac, spoof_guard,
    device}]`` (empty for non-transit bunkers)."""
    if not bunker.interfaces:
        return []
    names = {i["bridge_name"] for i in bunker.interfaces}
    rows = (
        await session.scalars(
            select(Bridge).where(Bridge.tenant_id == bunker.tenant_id, Bridge.name.in_(names))
        )
    ).all()
    devices = {b.name: b.device for b in rows}
    return [
        {
            "if_name": i["if_name"],
            "mac": i["mac"],
            "spoof_guard": i["spoof_guard"],
            "device": devices.get(i["bridge_name"], ""),
        }
        for i in bunker.interfaces
    ]


async def audit_l2_transparency(request: Request, principal: Principal, bunker: Bunker) -> int:
    """Write one ``scaibunker.bunker.l2_transparency`` audit record per interface of
    ``bunker`` with ``spoof_guard: false`` (SPEC §1.7); return how many were written.

    The platform record has no details field: ``resource_type`` is ``bunker_interface`` and
    ``resource_id`` is ``<bunker_id>/<if_name>@<bridge_name>``.
    """
    audit: AuditLog | None = getattr(request.app.state, "audit", None)
    if audit is None:
        return 0
    open_ports = [i for i in bunker.interfaces or [] if not i.get("spoof_guard", True)]
    client = request.client
    for interface in open_ports:
        await audit.submit(
            AuditEntry(
                request_id=request_id_from_scope(request.scope),
                actor_id=principal.user_id,
                actor_type="api_key" if principal.api_key_id else "user",
                tenant_id=bunker.tenant_id,
                partner_id=principal.partner_id,
                action=L2_AUDIT_ACTION,
                resource_type="bunker_interface",
                resource_id=f"{bunker.id}/{interface['if_name']}@{interface['bridge_name']}",
                ip_address=client.host if client else None,
                user_agent=request.headers.get("user-agent"),
                outcome="SUCCESS",
                status_code=201,
            )
        )
    if open_ports:
        log.info("l2_transparency_audited", bunker_id=bunker.id, interfaces=len(open_ports))
    return len(open_ports)

"""HTTP routes of quota profiles, assignments and usage (SPEC §9.6)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.modules.scaibunker.bunkers.schemas import iso
from scaigrid.modules.scaibunker.quotas import service
from scaigrid.modules.scaibunker.quotas.models import (
    DEFAULT_PROFILE_ID,
    QuotaAssignment,
    QuotaBucketLock,
    QuotaProfile,
)
from scaigrid.modules.scaibunker.state import ModuleState, get_state
from scaigrid.platform.auth import Principal, current_principal, require
from scaigrid.platform.db import get_session, utcnow
from scaigrid.platform.envelope import ok, ok_list
from scaigrid.platform.iam.models import Group
from scaigrid.platform.pagination import Limit, UuidCursor
from scaigrid.platform.tenancy.models import User

router = APIRouter(tags=["quotas"])

StateDep = Annotated[ModuleState, Depends(get_state)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
PrincipalDep = Annotated[Principal, Depends(current_principal)]
CreatorDep = Annotated[Principal, Depends(require("scaibunker:create"))]

_CAPS = (
    "max_concurrent_bunkers",
    "max_persistent_bunkers",
    "max_cpu_millicores",
    "max_memory_mb",
    "max_disk_mb",
    "max_gpu_count",
    "per_bunker_max_cpu",
    "per_bunker_max_memory",
    "per_bunker_max_disk",
    "per_bunker_max_gpu",
)
_HEADROOM = (
    ("bunkers", "max_concurrent_bunkers"),
    ("persistent_bunkers", "max_persistent_bunkers"),
    ("cpu_millicores", "max_cpu_millicores"),
    ("memory_mb", "max_memory_mb"),
    ("disk_mb", "max_disk_mb"),
    ("gpu_count", "max_gpu_count"),
)


_VALID_MODES = frozenset({("user", "individual"), ("group", "shared"), ("group", "per_user")})


class QuotaProfileNotFound(errors.NotFound):
    """404 ``QUOTA_PROFILE_NOT_FOUND``."""

    code = "QUOTA_PROFILE_NOT_FOUND"


class QuotaAssignmentNotFound(errors.NotFound):
    """404 ``QUOTA_ASSIGNMENT_NOT_FOUND``."""

    code = "QUOTA_ASSIGNMENT_NOT_FOUND"


class ProfileUpdate(BaseModel):
    """Editable profile fields (SPEC §9.1); caps are non-negative integers."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=128)
    description: str | None = Field(default=None, max_length=4096)
    max_concurrent_bunkers: int | None = Field(default=None, ge=0)
    max_persistent_bunkers: int | None = Field(default=None, ge=0)
    max_cpu_millicores: int | None = Field(default=None, ge=0)
    max_memory_mb: int | None = Field(default=None, ge=0)
    max_disk_mb: int | None = Field(default=None, ge=0)
    max_gpu_count: int | None = Field(default=None, ge=0)
    per_bunker_max_cpu: int | None = Field(default=None, ge=0)
    per_bunker_max_memory: int | None = Field(default=None, ge=0)
    per_bunker_max_disk: int | None = Field(default=None, ge=0)
    per_bunker_max_gpu: int | None = Field(default=None, ge=0)


class ProfileCreate(ProfileUpdate):
    """``POST /quota-profiles``: every aggregate cap is required."""

    tenant_id: str | None = Field(default=None, max_length=32)
    name: str = Field(min_length=1, max_length=128)
    max_concurrent_bunkers: int = Field(ge=0)
    max_persistent_bunkers: int = Field(ge=0)
    max_cpu_millicores: int = Field(ge=0)
    max_memory_mb: int = Field(ge=0)
    max_disk_mb: int = Field(ge=0)
    max_gpu_count: int = Field(ge=0)


class AssignmentCreate(BaseModel):
    """``POST /quota-profiles/{id}/assignments`` (SPEC §9.2)."""

    model_config = ConfigDict(extra="forbid")

    target_kind: Literal["user", "group"]
    target_id: str = Field(min_length=1, max_length=36)
    mode: Literal["individual", "shared", "per_user"]


def profile_to_dict(profile: QuotaProfile) -> dict[str, Any]:
    """Render a profile as its API object (SPEC §9.1)."""
    data: dict[str, Any] = {
        "id": profile.id,
        "tenant_id": profile.tenant_id,
        "name": profile.name,
        "description": profile.description,
    }
    data.update({cap: getattr(profile, cap) for cap in _CAPS})
    data["created_at"] = iso(profile.created_at)
    data["updated_at"] = iso(profile.updated_at)
    return data


def assignment_to_dict(assignment: QuotaAssignment) -> dict[str, Any]:
    """Render an assignment as its API object (SPEC §9.2)."""
    return {
        "id": assignment.id,
        "profile_id": assignment.profile_id,
        "target_kind": assignment.target_kind,
        "target_id": assignment.target_id,
        "mode": assignment.mode,
        "created_at": iso(assignment.created_at),
    }


def _can_manage(principal: Principal, tenant_id: str | None) -> bool:
    if tenant_id is None:
        return principal.has("scaibunker:admin:platform")
    return principal.has("scaibunker:admin:platform") or (
        tenant_id == principal.tenant_id
        and (principal.has("scaibunker:admin:tenant") or principal.has("scaibunker:admin"))
    )


def _can_read(principal: Principal, profile: QuotaProfile) -> bool:
    if principal.has("scaibunker:admin:platform"):
        return True
    tenant_admin = principal.has("scaibunker:admin:tenant") or principal.has("scaibunker:admin")
    return tenant_admin and profile.tenant_id in (None, principal.tenant_id)


def _check_ceilings(state: ModuleState, values: dict[str, Any]) -> None:
    ceilings = state.config.platform_max
    limits = {
        "per_bunker_max_cpu": ceilings.cpu_millicores,
        "per_bunker_max_memory": ceilings.memory_mb,
        "per_bunker_max_disk": ceilings.disk_mb,
        "per_bunker_max_gpu": ceilings.gpu_count,
    }
    bad = [
        {"field": field, "message": f"must be at most {limit} (PLATFORM_MAX_*)"}
        for field, limit in limits.items()
        if values.get(field) is not None and values[field] > limit
    ]
    if bad:
        raise errors.ValidationFailed("a cap exceeds a platform ceiling", details=bad)


async def _visible_profile(
    session: AsyncSession, principal: Principal, profile_id: str
) -> QuotaProfile:
    profile = await session.get(QuotaProfile, profile_id)
    if profile is None or not _can_read(principal, profile):
        raise QuotaProfileNotFound(f"quota profile {profile_id} not found")
    return profile


def _deny(permission: str) -> errors.ScaiGridError:
    return errors.AuthzPermissionDenied(
        f"this needs {permission}", details={"permission": permission}
    )


@router.get("/quota-profiles/usage")
async def quota_usage(
    principal: CreatorDep,
    session: SessionDep,
    user_id: Annotated[str | None, Query(max_length=32)] = None,
) -> JSONResponse:
    """Usage, caps and headroom of every profile that applies to the caller (or ``user_id``)."""
    target = user_id or principal.user_id
    if target != principal.user_id and not (
        principal.has("scaibunker:admin:tenant") or principal.has("scaibunker:admin")
    ):
        raise _deny("scaibunker:admin:tenant")
    rows = []
    for profile, bucket, mode in await service.applicable(session, principal.tenant_id, target):
        current = (await service.usage(session, profile.id, bucket)).as_dict()
        rows.append(
            {
                "profile_id": profile.id,
                "profile_name": profile.name,
                "mode": mode,
                "bucket": bucket,
                "caps": {cap: getattr(profile, cap) for cap in _CAPS},
                "current": current,
                "headroom": {
                    key: max(0, getattr(profile, cap) - current[key]) for key, cap in _HEADROOM
                },
            }
        )
    return ok_list(rows, None)


@router.get("/quota-profiles")
async def list_profiles(
    principal: PrincipalDep,
    session: SessionDep,
    limit: Limit = 100,
    cursor: UuidCursor = None,
    tenant_id: Annotated[str | None, Query(max_length=32)] = None,
) -> JSONResponse:
    """Profiles the caller administers: its tenant's and the platform's, or all."""
    if not (principal.has("scaibunker:admin:platform") or principal.has("scaibunker:admin:tenant")):
        raise _deny("scaibunker:admin:tenant")
    query = select(QuotaProfile).order_by(QuotaProfile.id.desc())
    if not principal.has("scaibunker:admin:platform"):
        query = query.where(
            QuotaProfile.tenant_id.is_(None) | (QuotaProfile.tenant_id == principal.tenant_id)
        )
    if tenant_id is not None:
        query = query.where(QuotaProfile.tenant_id == tenant_id)
    if cursor:
        query = query.where(QuotaProfile.id < cursor)
    rows = list((await session.scalars(query.limit(limit + 1))).all())
    page = rows[:limit]
    return ok_list([profile_to_dict(p) for p in page], page[-1].id if len(rows) > limit else None)


@router.post("/quota-profiles", status_code=201)
async def create_profile(
    body: ProfileCreate, principal: PrincipalDep, state: StateDep, session: SessionDep
) -> JSONResponse:
    """Create a tenant profile (``scaibunker:admin:tenant``) or a platform one."""
    if not _can_manage(principal, body.tenant_id):
        raise _deny(
            "scaibunker:admin:platform" if body.tenant_id is None else "scaibunker:admin:tenant"
        )
    values = body.model_dump()
    _check_ceilings(state, values)
    now = utcnow()
    profile = QuotaProfile(id=str(uuid.uuid4()), created_at=now, updated_at=now, **values)
    session.add(profile)
    try:
        await session.commit()
    except IntegrityError as exc:
        raise errors.SlugConflict(f"a quota profile named {body.name!r} exists") from exc
    return ok(profile_to_dict(profile), status_code=201)


@router.patch("/quota-profiles/{profile_id}")
async def update_profile(
    profile_id: str,
    body: ProfileUpdate,
    principal: PrincipalDep,
    state: StateDep,
    session: SessionDep,
) -> JSONResponse:
    """Change caps (future admissions only; running bunkers are never evicted)."""
    profile = await _visible_profile(session, principal, profile_id)
    if not _can_manage(principal, profile.tenant_id):
        raise _deny("scaibunker:admin:platform")
    values = body.model_dump(exclude_unset=True)
    required = set(_CAPS[:6]) | {"name"}
    nulls = [k for k, v in values.items() if v is None and k in required]
    if nulls:
        raise errors.ValidationFailed(
            "these fields cannot be null",
            details=[{"field": k, "message": "must not be null"} for k in nulls],
        )
    _check_ceilings(state, values)
    for key, value in values.items():
        setattr(profile, key, value)
    profile.updated_at = utcnow()
    try:
        await session.commit()
    except IntegrityError as exc:
        raise errors.SlugConflict("a quota profile with this name exists") from exc
    return ok(profile_to_dict(profile))


@router.delete("/quota-profiles/{profile_id}")
async def delete_profile(
    profile_id: str, principal: PrincipalDep, session: SessionDep
) -> JSONResponse:
    """Delete a profile, its assignments and its bucket locks; admitted bunkers keep running."""
    profile = await _visible_profile(session, principal, profile_id)
    if not _can_manage(principal, profile.tenant_id):
        raise _deny("scaibunker:admin:platform")
    if profile.id == DEFAULT_PROFILE_ID:
        raise errors.ValidationFailed(
            "the default quota profile cannot be deleted",
            details=[{"field": "id", "message": "is default_quota_profile_id"}],
        )
    await session.execute(delete(QuotaAssignment).where(QuotaAssignment.profile_id == profile.id))
    await session.execute(delete(QuotaBucketLock).where(QuotaBucketLock.profile_id == profile.id))
    await session.delete(profile)
    await session.commit()
    return ok({"id": profile_id, "deleted": True})


@router.get("/quota-profiles/{profile_id}/assignments")
async def list_assignments(
    profile_id: str,
    principal: PrincipalDep,
    session: SessionDep,
    limit: Limit = 100,
    cursor: UuidCursor = None,
) -> JSONResponse:
    """Assignments of a profile the caller can see (only its own tenant's for tenant admins)."""
    profile = await _visible_profile(session, principal, profile_id)
    query = (
        select(QuotaAssignment)
        .where(QuotaAssignment.profile_id == profile.id)
        .order_by(QuotaAssignment.id.desc())
    )
    if not principal.has("scaibunker:admin:platform"):
        query = query.where(QuotaAssignment.tenant_id == principal.tenant_id)
    if cursor:
        query = query.where(QuotaAssignment.id < cursor)
    rows = list((await session.scalars(query.limit(limit + 1))).all())
    page = rows[:limit]
    return ok_list(
        [assignment_to_dict(a) for a in page], page[-1].id if len(rows) > limit else None
    )


@router.post("/quota-profiles/{profile_id}/assignments", status_code=201)
async def create_assignment(
    profile_id: str, body: AssignmentCreate, principal: PrincipalDep, session: SessionDep
) -> JSONResponse:
    """Assign a profile to a user (``individual``) or group (``shared``/``per_user``) of the
    caller's tenant (SPEC §9.2)."""
    if not (principal.has("scaibunker:admin:tenant") or principal.has("scaibunker:admin:platform")):
        raise _deny("scaibunker:admin:tenant")
    profile = await _visible_profile(session, principal, profile_id)
    if profile.tenant_id not in (None, principal.tenant_id):
        raise QuotaProfileNotFound(f"quota profile {profile_id} not found")
    if (body.target_kind, body.mode) not in _VALID_MODES:
        raise errors.ValidationFailed(
            "user targets take mode individual; group targets shared or per_user",
            details=[{"field": "mode", "message": f"{body.target_kind}/{body.mode}"}],
        )
    target: User | Group | None = (
        await session.get(User, body.target_id)
        if body.target_kind == "user"
        else await session.get(Group, body.target_id)
    )
    if target is None or target.tenant_id != principal.tenant_id:
        raise errors.ValidationFailed(
            f"no {body.target_kind} {body.target_id} in this tenant",
            details=[{"field": "target_id", "message": "unknown in the caller's tenant"}],
        )
    assignment = QuotaAssignment(
        id=str(uuid.uuid4()),
        profile_id=profile.id,
        tenant_id=principal.tenant_id,
        target_kind=body.target_kind,
        target_id=body.target_id,
        mode=body.mode,
        created_at=utcnow(),
    )
    session.add(assignment)
    try:
        await session.flush()
        await service.backfill(session, principal.tenant_id)
        await session.commit()
    except IntegrityError as exc:
        raise errors.SlugConflict(f"{body.target_kind} {body.target_id} has an assignment") from exc
    return ok(assignment_to_dict(assignment), status_code=201)


@router.delete("/quota-assignments/{assignment_id}")
async def delete_assignment(
    assignment_id: str, principal: PrincipalDep, session: SessionDep
) -> JSONResponse:
    """Remove an assignment of the caller's tenant (any, with ``scaibunker:admin:platform``)."""
    assignment = await session.get(QuotaAssignment, assignment_id)
    visible = assignment is not None and (
        principal.has("scaibunker:admin:platform")
        or (
            principal.has("scaibunker:admin:tenant") and assignment.tenant_id == principal.tenant_id
        )
    )
    if not visible or assignment is None:
        raise QuotaAssignmentNotFound(f"quota assignment {assignment_id} not found")
    await session.delete(assignment)
    await session.commit()
    return ok({"id": assignment_id, "deleted": True})

"""Quota resolution and admission (SPEC §9.3-9.5).

Usage of a (profile, bucket) is not a separate counter that can drift: it is the sum over the
non-terminal bunkers that recorded a :class:`QuotaContribution` for it. So a bunker reaching
any terminal state (terminated, failed, expired) releases its quota in every bucket at once,
a persistent bunker re-placed after worker loss keeps it, and after a controller restart the
"counters" are exactly what the database holds.

Admission is atomic per (profile, bucket): :func:`admit` locks one
:class:`QuotaBucketLock` row per applicable pair (``SELECT … FOR UPDATE``, in sorted order so
two admissions cannot deadlock) before summing and checking, and the caller inserts the bunker
and its contributions in the same transaction. On PostgreSQL and MariaDB the database is the
arbiter between controller processes; SQLite has no row locks and is served by one controller
process, whose :attr:`ModuleState.placement_lock` serialises admissions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, case, func, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.bunkers.states import TERMINAL
from scaigrid.modules.scaibunker.config import PlatformCeilings
from scaigrid.modules.scaibunker.quotas.models import (
    DEFAULT_PROFILE_ID,
    QuotaAssignment,
    QuotaBucketLock,
    QuotaContribution,
    QuotaProfile,
)
from scaigrid.platform.iam.service import group_closure

#: (usage key, aggregate cap field, per-bunker cap field, ask attribute)
_RESOURCES = (
    ("cpu_millicores", "max_cpu_millicores", "per_bunker_max_cpu", "cpu_millicores"),
    ("memory_mb", "max_memory_mb", "per_bunker_max_memory", "memory_mb"),
    ("disk_mb", "max_disk_mb", "per_bunker_max_disk", "disk_mb"),
    ("gpu_count", "max_gpu_count", "per_bunker_max_gpu", "gpu_count"),
)


@dataclass(frozen=True)
class Ask:
    """What one bunker would add: millicores, MiB, MiB, GPUs, and whether it is persistent."""

    cpu_millicores: int
    memory_mb: int
    disk_mb: int
    gpu_count: int
    persistent: bool


@dataclass(frozen=True)
class Usage:
    """Current live usage of one (profile, bucket)."""

    bunkers: int = 0
    persistent_bunkers: int = 0
    cpu_millicores: int = 0
    memory_mb: int = 0
    disk_mb: int = 0
    gpu_count: int = 0

    def as_dict(self) -> dict[str, int]:
        """The usage row's ``current`` object (SPEC §9.6)."""
        return {
            "bunkers": self.bunkers,
            "persistent_bunkers": self.persistent_bunkers,
            "cpu_millicores": self.cpu_millicores,
            "memory_mb": self.memory_mb,
            "disk_mb": self.disk_mb,
            "gpu_count": self.gpu_count,
        }


async def applicable(
    session: AsyncSession, tenant_id: str, user_id: str
) -> list[tuple[QuotaProfile, str, str]]:
    """Profiles that apply to a user: ``[(profile, bucket, mode)]`` (SPEC §9.4 steps 1-2).

    The user's direct ``individual`` assignment (bucket ``user:{user_id}``) and the
    assignments of every group the user is in, transitively through parent groups
    (``shared``: bucket ``group:{group_id}``; ``per_user``: bucket ``user:{user_id}``). With
    none, the default profile applies with bucket ``user:{user_id}``.
    """
    groups = await group_closure(session, user_id)
    targets = QuotaAssignment.target_kind == "user", QuotaAssignment.target_id == user_id
    rows = (
        await session.execute(
            select(QuotaProfile, QuotaAssignment)
            .join(QuotaAssignment, QuotaAssignment.profile_id == QuotaProfile.id)
            .where(
                QuotaAssignment.tenant_id == tenant_id,
                and_(*targets)
                | (
                    (QuotaAssignment.target_kind == "group") & QuotaAssignment.target_id.in_(groups)
                ),
            )
            .order_by(QuotaAssignment.id)
        )
    ).all()
    found = [
        (
            profile,
            f"group:{assignment.target_id}" if assignment.mode == "shared" else f"user:{user_id}",
            assignment.mode,
        )
        for profile, assignment in rows
    ]
    if found:
        return found
    default = await session.get(QuotaProfile, DEFAULT_PROFILE_ID)
    if default is None:
        raise errors.InternalError("the platform-default quota profile is missing")
    return [(default, f"user:{user_id}", "individual")]


async def usage(session: AsyncSession, profile_id: str, bucket: str) -> Usage:
    """Sum the live bunkers that contributed to ``(profile_id, bucket)``."""
    query = (
        select(
            func.count(),
            func.sum(case((Bunker.lifecycle_mode == "persistent", 1), else_=0)),
            func.sum(Bunker.cpu_millicores),
            func.sum(Bunker.memory_mb),
            func.sum(Bunker.disk_mb),
            func.sum(Bunker.gpu_count),
        )
        .select_from(QuotaContribution)
        .join(Bunker, Bunker.id == QuotaContribution.bunker_id)
        .where(
            QuotaContribution.profile_id == profile_id,
            QuotaContribution.bucket == bucket,
            Bunker.status.not_in(TERMINAL),
        )
    )
    if session.get_bind().dialect.name in ("mysql", "mariadb"):
        # InnoDB's plain reads use the transaction's first snapshot; a locking read sees
        # what the admission that held the bucket lock before us committed.
        query = query.with_for_update(read=True)
    row = (await session.execute(query)).one()
    return Usage(*(int(value or 0) for value in row))


async def _ensure_bucket_rows(session: AsyncSession, pairs: list[tuple[str, str]]) -> None:
    """Create missing :class:`QuotaBucketLock` rows in a short transaction of their own.

    Ends the session's current transaction first (it must hold no pending writes), so no
    request ever holds two pooled connections and a lost insert race cannot abort or
    deadlock the admission transaction.
    """
    rows = await session.execute(
        select(QuotaBucketLock.profile_id, QuotaBucketLock.bucket).where(
            QuotaBucketLock.profile_id.in_({p for p, _ in pairs})
        )
    )
    existing = {(str(profile_id), str(bucket)) for profile_id, bucket in rows}
    missing = [pair for pair in pairs if pair not in existing]
    if not missing:
        return
    await session.commit()
    dialect = session.get_bind().dialect.name
    async with AsyncSession(bind=session.bind) as side:
        for profile_id, bucket in missing:
            values = {"profile_id": profile_id, "bucket": bucket}
            if dialect == "postgresql":
                statement: Any = pg_insert(QuotaBucketLock).values(values).on_conflict_do_nothing()
            else:
                prefix = "OR IGNORE" if dialect == "sqlite" else "IGNORE"
                statement = insert(QuotaBucketLock).values(values).prefix_with(prefix)
            await side.execute(statement)
        await side.commit()


async def _lock(session: AsyncSession, profile_id: str, bucket: str) -> None:
    query = (
        select(QuotaBucketLock)
        .where(QuotaBucketLock.profile_id == profile_id, QuotaBucketLock.bucket == bucket)
        .with_for_update()
    )
    (await session.scalars(query)).one()


def _violation(
    field: str, profile_id: str | None, bucket: str, cap: int, current: int, requested: int
) -> dict[str, Any]:
    return {
        "field": field,
        "profile_id": profile_id,
        "bucket": bucket,
        "cap": cap,
        "current": current,
        "requested": requested,
        "message": f"{field} would be exceeded",
    }


async def admit(
    session: AsyncSession, tenant_id: str, user_id: str, ask: Ask, ceilings: PlatformCeilings
) -> list[tuple[str, str]]:
    """Check ``ask`` against the ceilings and every applicable profile, holding their locks.

    The caller then inserts the bunker and one :class:`QuotaContribution` per returned
    ``(profile_id, bucket)`` in the same transaction; its commit releases the locks. The
    session must hold no pending writes when called (see :func:`_ensure_bucket_rows`).

    Raises:
        errors.BunkerQuotaExceeded: 429; ``details`` has one entry per violated cap
            ``{field, profile_id, bucket, cap, current, requested, message}`` (SPEC §9.4).
    """
    violations = [
        _violation(field, None, "platform", cap, 0, value)
        for field, cap, value in (
            ("platform_max_cpu_millicores", ceilings.cpu_millicores, ask.cpu_millicores),
            ("platform_max_memory_mb", ceilings.memory_mb, ask.memory_mb),
            ("platform_max_disk_mb", ceilings.disk_mb, ask.disk_mb),
            ("platform_max_gpu_count", ceilings.gpu_count, ask.gpu_count),
        )
        if value > cap
    ]
    if violations:
        raise errors.BunkerQuotaExceeded(
            "the request exceeds a platform ceiling", details=violations
        )
    pairs = sorted(
        {
            (p.id, bucket): p for p, bucket, _ in await applicable(session, tenant_id, user_id)
        }.items()
    )
    await _ensure_bucket_rows(session, [pair for pair, _ in pairs])
    for (profile_id, bucket), _profile in pairs:
        await _lock(session, profile_id, bucket)
    for (profile_id, bucket), profile in pairs:
        current = await usage(session, profile_id, bucket)
        for key, cap_field, per_field, attr in _RESOURCES:
            asked = int(getattr(ask, attr))
            per_cap = getattr(profile, per_field)
            if per_cap is not None and asked > per_cap:
                violations.append(_violation(per_field, profile_id, bucket, per_cap, 0, asked))
            cap = int(getattr(profile, cap_field))
            now = int(getattr(current, key))
            if asked and now + asked > cap:
                violations.append(_violation(cap_field, profile_id, bucket, cap, now, asked))
        if current.bunkers + 1 > profile.max_concurrent_bunkers:
            violations.append(
                _violation(
                    "max_concurrent_bunkers",
                    profile_id,
                    bucket,
                    profile.max_concurrent_bunkers,
                    current.bunkers,
                    1,
                )
            )
        if ask.persistent and current.persistent_bunkers + 1 > profile.max_persistent_bunkers:
            violations.append(
                _violation(
                    "max_persistent_bunkers",
                    profile_id,
                    bucket,
                    profile.max_persistent_bunkers,
                    current.persistent_bunkers,
                    1,
                )
            )
    if violations:
        raise errors.BunkerQuotaExceeded("the bunker would exceed a quota", details=violations)
    return [pair for pair, _ in pairs]


async def backfill(session: AsyncSession, tenant_id: str) -> int:
    """Record the contributions live bunkers of ``tenant_id`` owe to assignments made after
    they were admitted (a new assignment counts what already runs); return how many were
    added. Call after the assignment is flushed, in its transaction."""
    bunkers = (
        await session.execute(
            select(Bunker.id, Bunker.owner_user_id).where(
                Bunker.tenant_id == tenant_id, Bunker.status.not_in(TERMINAL)
            )
        )
    ).all()
    added = 0
    for bunker_id, owner in bunkers:
        have = set(
            (
                await session.execute(
                    select(QuotaContribution.profile_id, QuotaContribution.bucket).where(
                        QuotaContribution.bunker_id == bunker_id
                    )
                )
            ).all()
        )
        for profile, bucket, _ in await applicable(session, tenant_id, owner):
            if (profile.id, bucket) not in have:
                session.add(
                    QuotaContribution(bunker_id=bunker_id, profile_id=profile.id, bucket=bucket)
                )
                added += 1
    return added


def record(session: AsyncSession, bunker_id: str, pairs: list[tuple[str, str]]) -> None:
    """Add the bunker's contributions (call after the bunker row is added)."""
    for profile_id, bucket in pairs:
        session.add(QuotaContribution(bunker_id=bunker_id, profile_id=profile_id, bucket=bucket))

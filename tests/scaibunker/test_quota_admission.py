"""Quota admission on real databases (SPEC §9.4-9.5): never over-admit, release on terminal.

On PostgreSQL and MariaDB the 50 admissions run in 50 sessions with no in-process lock, so the
database's row locks are the only arbiter. SQLite has no row locks; the controller serialises
its admissions with the placement lock, which the SQLite run uses the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from alembic import command
from alembic.config import Config

from scaigrid import errors
from scaigrid.ids import new_id
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.bunkers.states import transition
from scaigrid.modules.scaibunker.config import PlatformCeilings
from scaigrid.modules.scaibunker.quotas import service
from scaigrid.modules.scaibunker.quotas.models import DEFAULT_PROFILE_ID, QuotaProfile
from scaigrid.platform.db import Database, utcnow
from scaigrid.platform.migrate import run_alembic

TENANT = "ten_quota"
USER = "usr_quota"
ASK = service.Ask(cpu_millicores=100, memory_mb=128, disk_mb=64, gpu_count=0, persistent=False)


def _upgrade(config: Config) -> None:
    command.upgrade(config, "heads")


@pytest.fixture
async def db(empty_database_url: str) -> AsyncIterator[Database]:
    await run_alembic(empty_database_url, _upgrade)
    database = Database(empty_database_url)
    try:
        yield database
    finally:
        await database.dispose()


def _bunker(**overrides: Any) -> Bunker:
    now = utcnow()
    fields: dict[str, Any] = {
        "id": new_id("bnk"),
        "tenant_id": TENANT,
        "owner_user_id": USER,
        "image_name": "busybox",
        "image_id": "img_x",
        "lifecycle_mode": "ephemeral",
        "network_profile": "isolated",
        "cpu_millicores": ASK.cpu_millicores,
        "memory_mb": ASK.memory_mb,
        "disk_mb": ASK.disk_mb,
        "gpu_count": 0,
        "status": "pending",
        "status_reason": "created",
        "status_changed_at": now,
        "created_at": now,
        "label_set": {},
        "env_vars": {},
        "interfaces": [],
    }
    fields.update(overrides)
    return Bunker(**fields)


async def _create(db: Database, lock: contextlib.AbstractAsyncContextManager[Any]) -> str:
    """Admit and insert one bunker the way ``create_bunker`` does; return its id."""
    async with lock, db.sessionmaker() as session:
        pairs = await service.admit(session, TENANT, USER, ASK, PlatformCeilings())
        bunker = _bunker()
        session.add(bunker)
        await session.flush()
        service.record(session, bunker.id, pairs)
        await session.commit()
        return bunker.id


async def _set_caps(db: Database, **caps: int) -> None:
    async with db.sessionmaker() as session:
        profile = await session.get(QuotaProfile, DEFAULT_PROFILE_ID)
        assert profile is not None
        for key, value in caps.items():
            setattr(profile, key, value)
        await session.commit()


async def test_fifty_concurrent_creates_admit_exactly_five(db: Database) -> None:
    sqlite = db.engine.dialect.name == "sqlite"
    serial = asyncio.Lock()
    locks = [serial if sqlite else contextlib.nullcontext() for _ in range(50)]
    outcomes = await asyncio.gather(*(_create(db, lock) for lock in locks), return_exceptions=True)
    admitted = [o for o in outcomes if isinstance(o, str)]
    refused = [o for o in outcomes if isinstance(o, errors.BunkerQuotaExceeded)]
    unexpected = [o for o in outcomes if not isinstance(o, str | errors.BunkerQuotaExceeded)]
    assert unexpected == []
    assert (len(admitted), len(refused)) == (5, 45)
    async with db.sessionmaker() as session:
        current = await service.usage(session, DEFAULT_PROFILE_ID, f"user:{USER}")
    assert current.bunkers == 5
    assert current.cpu_millicores == 5 * ASK.cpu_millicores


async def test_refusal_names_profile_bucket_field_cap_current_requested(db: Database) -> None:
    await _set_caps(db, max_concurrent_bunkers=1)
    await _create(db, contextlib.nullcontext())
    with pytest.raises(errors.BunkerQuotaExceeded) as raised:
        await _create(db, contextlib.nullcontext())
    assert raised.value.status_code == 429
    assert raised.value.details == [
        {
            "field": "max_concurrent_bunkers",
            "profile_id": DEFAULT_PROFILE_ID,
            "bucket": f"user:{USER}",
            "cap": 1,
            "current": 1,
            "requested": 1,
            "message": "max_concurrent_bunkers would be exceeded",
        }
    ]


@pytest.mark.parametrize("end", ["terminated", "failed", "expired"])
async def test_terminal_states_release_quota(db: Database, end: str) -> None:
    await _set_caps(db, max_concurrent_bunkers=1)
    first = await _create(db, contextlib.nullcontext())
    async with db.sessionmaker() as session:
        bunker = await session.get(Bunker, first)
        assert bunker is not None
        if end == "failed":
            transition(session, bunker, "failed", "worker_lost")
        else:
            transition(session, bunker, "stopping", "api_terminate")
            transition(session, bunker, end, "api_terminate")
        await session.commit()
    await _create(db, contextlib.nullcontext())


async def test_ceilings_and_per_bunker_caps(db: Database) -> None:
    await _set_caps(db, per_bunker_max_memory=64)
    with pytest.raises(errors.BunkerQuotaExceeded) as raised:
        await _create(db, contextlib.nullcontext())
    details = raised.value.details
    assert isinstance(details, list)
    assert [d["field"] for d in details] == ["per_bunker_max_memory"]
    async with db.sessionmaker() as session:
        with pytest.raises(errors.BunkerQuotaExceeded) as ceiling:
            await service.admit(
                session,
                TENANT,
                USER,
                service.Ask(16001, 128, 64, 0, False),
                PlatformCeilings(),
            )
    assert isinstance(ceiling.value.details, list)
    detail = ceiling.value.details[0]
    assert (detail["profile_id"], detail["bucket"], detail["cap"]) == (None, "platform", 16000)

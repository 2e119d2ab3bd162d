"""Usage accounting (SPEC §1.9): exact to the state-change instant, on real databases, and
``GET /v1/accounting/usage`` through the real app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from alembic import command
from alembic.config import Config
from fastapi import FastAPI
from sqlalchemy import select

from scaigrid.ids import new_id
from scaigrid.modules.scaibunker.accounting.models import UsageRecord
from scaigrid.modules.scaibunker.accounting.service import (
    apply_egress_report,
    record_usage_once,
    seconds_in_states,
)
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.bunkers.states import record_creation, transition
from scaigrid.platform.db import Database
from scaigrid.platform.events.models import Event
from scaigrid.platform.migrate import run_alembic
from scaigrid.platform.permissions import Role

T0 = datetime(2026, 11, 29, 10, 0, 0, 250000, tzinfo=UTC)


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


async def _bunker_with_history(
    db: Database, steps: list[tuple[float, str]], *, tenant: str = "ten_a", user: str = "usr_a"
) -> str:
    """A bunker created at T0 that then moves through ``(seconds after T0, state)``."""
    bunker = Bunker(
        id=new_id("bnk"),
        tenant_id=tenant,
        owner_user_id=user,
        image_name="busybox",
        image_id="img_x",
        lifecycle_mode="session",
        network_profile="isolated",
        cpu_millicores=1000,
        memory_mb=256,
        disk_mb=100,
        gpu_count=0,
        status="pending",
        status_reason="created",
        status_changed_at=T0,
        created_at=T0,
        label_set={},
        env_vars={},
        interfaces=[],
    )
    async with db.sessionmaker() as session:
        session.add(bunker)
        await session.flush()
        record_creation(session, bunker)
        for offset, state in steps:
            transition(session, bunker, state, "test", at=T0 + timedelta(seconds=offset))
        await session.commit()
    return bunker.id


async def _records(db: Database, bunker_id: str) -> list[UsageRecord]:
    async with db.sessionmaker() as session:
        query = (
            select(UsageRecord)
            .where(UsageRecord.bunker_id == bunker_id)
            .order_by(UsageRecord.period_start)
        )
        return list((await session.scalars(query)).all())


def test_seconds_in_states_cuts_at_the_period_edges() -> None:
    history = [
        (T0, "pending"),
        (T0 + timedelta(seconds=5), "running"),
        (T0 + timedelta(seconds=35), "paused"),
        (T0 + timedelta(seconds=65), "running"),
    ]
    spent = seconds_in_states(history, T0 + timedelta(seconds=20), T0 + timedelta(seconds=80))
    assert (spent.running, spent.paused) == (30.0, 30.0)


async def test_ninety_seconds_alive_is_billed_ninety_seconds(db: Database) -> None:
    # pending 2 s, running 40 s, paused 30 s, running 20 s, then stopping and terminated:
    # 90 s running or paused, 60 s of it running.
    bunker_id = await _bunker_with_history(
        db,
        [
            (2, "provisioning"),
            (2, "running"),
            (42, "paused"),
            (72, "running"),
            (92, "stopping"),
            (93, "terminated"),
        ],
    )
    assert await record_usage_once(db, now=T0 + timedelta(seconds=60)) == 1
    assert await record_usage_once(db, now=T0 + timedelta(seconds=120)) == 1
    assert await record_usage_once(db, now=T0 + timedelta(seconds=180)) == 0
    records = await _records(db, bunker_id)
    assert [r.period_end - r.period_start for r in records] == [
        timedelta(seconds=60),
        timedelta(seconds=33),
    ]
    assert records[1].period_end == T0 + timedelta(seconds=93)
    assert sum(r.cpu_millicore_seconds for r in records) == pytest.approx(1000 * 60)
    assert sum(r.memory_mb_seconds for r in records) == pytest.approx(256 * 90)
    assert sum(r.disk_mb_seconds for r in records) == pytest.approx(100 * 90)
    assert records[0].cpu_millicore_seconds == pytest.approx(1000 * 40)
    assert records[0].memory_mb_seconds == pytest.approx(256 * 58)
    assert all(r.gpu_seconds == 0 and r.egress_bytes == 0 for r in records)
    assert records[0].lifecycle_mode == "session"
    async with db.sessionmaker() as session:
        events = (
            await session.scalars(select(Event).where(Event.event_type == "scaibunker.usage"))
        ).all()
    assert [e.payload["period_end"] for e in events] == [r.period_end.isoformat() for r in records]
    assert all(e.payload["bunker_id"] == bunker_id and e.tenant_id == "ten_a" for e in events)


async def test_measured_egress_is_billed_once_across_periods_and_workers(db: Database) -> None:
    bunker_id = await _bunker_with_history(db, [(0, "provisioning"), (0, "running")])
    async with db.sessionmaker() as session:
        bunker = await session.get(Bunker, bunker_id)
        assert bunker is not None
        apply_egress_report(bunker, 1000)
        apply_egress_report(bunker, 1500)
        await session.commit()
    await record_usage_once(db, now=T0 + timedelta(seconds=60))
    async with db.sessionmaker() as session:
        bunker = await session.get(Bunker, bunker_id)
        assert bunker is not None
        # A smaller report is a fresh counter (re-placed on another worker): all of it is new.
        apply_egress_report(bunker, 300)
        apply_egress_report(bunker, 300)
        await session.commit()
    await record_usage_once(db, now=T0 + timedelta(seconds=120))
    await record_usage_once(db, now=T0 + timedelta(seconds=180))
    records = await _records(db, bunker_id)
    assert [r.egress_bytes for r in records] == [1500, 300, 0]


async def test_paused_bunker_accrues_no_cpu(db: Database) -> None:
    bunker_id = await _bunker_with_history(db, [(0, "provisioning"), (0, "running"), (0, "paused")])
    await record_usage_once(db, now=T0 + timedelta(seconds=60))
    (record,) = await _records(db, bunker_id)
    assert record.cpu_millicore_seconds == 0
    assert record.memory_mb_seconds == pytest.approx(256 * 60)


@pytest.fixture
async def app_db(platform_app: FastAPI) -> Database:
    database: Database = platform_app.state.db
    return database


async def test_usage_route_aggregates_by_bunker_and_day(
    platform_client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    make_identity: Any,
    app_db: Database,
) -> None:
    other = await make_identity(Role.TENANT_ADMIN)
    mine = await _bunker_with_history(
        app_db, [(0, "provisioning"), (0, "running"), (30, "stopping"), (30, "terminated")]
    )
    theirs = await _bunker_with_history(
        app_db,
        [(0, "provisioning"), (0, "running")],
        tenant=other.tenant_id,
        user=other.user_id,
    )
    await record_usage_once(app_db, now=T0 + timedelta(seconds=60))
    response = await platform_client.get(
        "/v1/accounting/usage", headers=admin_headers, params={"bunker_id": mine}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["pagination"] == {"has_more": False, "next_cursor": None}
    (row,) = body["data"]
    assert (row["bunker_id"], row["day"], row["tenant_id"]) == (mine, "2026-11-29", "ten_a")
    assert row["cpu_millicore_seconds"] == pytest.approx(30000)

    own = await platform_client.get("/v1/accounting/usage", headers=other.headers)
    assert own.status_code == 200, own.text
    assert [r["bunker_id"] for r in own.json()["data"]] == [theirs]
    denied = await platform_client.get(
        "/v1/accounting/usage", headers=other.headers, params={"tenant_id": "ten_a"}
    )
    assert denied.status_code == 403

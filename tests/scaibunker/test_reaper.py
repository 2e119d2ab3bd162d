"""The reaper's provisioning-timeout sweep (SPEC §2.4 ``provisioning_timeout``) on real
databases: boots that no controller process follows any more (the controller restarted
mid-boot) fail; boots this process still follows, and persistent bunkers waiting for a
worker, are left alone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from tests.conftest import make_settings

from scaigrid.ids import new_id
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.bunkers.states import record_creation, transition
from scaigrid.modules.scaibunker.lifecycle import reap_once
from scaigrid.modules.scaibunker.state import ModuleState
from scaigrid.platform.db import Database, utcnow
from scaigrid.platform.migrate import run_alembic


def _upgrade(config: Config) -> None:
    command.upgrade(config, "heads")


@pytest.fixture
async def state(empty_database_url: str, tmp_path: Path) -> AsyncIterator[ModuleState]:
    await run_alembic(empty_database_url, _upgrade)
    database = Database(empty_database_url)
    try:
        yield ModuleState(database, make_settings(tmp_path, database_url=empty_database_url))
    finally:
        await database.dispose()


async def _bunker(
    state: ModuleState, status: str, *, age_s: float, worker_id: str | None, mode: str
) -> str:
    at = utcnow() - timedelta(seconds=age_s)
    bunker = Bunker(
        id=new_id("bnk"),
        tenant_id="ten_a",
        owner_user_id="usr_a",
        image_name="busybox",
        image_id="img_x",
        lifecycle_mode=mode,
        network_profile="isolated",
        cpu_millicores=1000,
        memory_mb=128,
        disk_mb=64,
        gpu_count=0,
        status="pending",
        status_reason="created",
        status_changed_at=at,
        created_at=at,
        worker_id=worker_id,
        label_set={},
        env_vars={},
        interfaces=[],
    )
    async with state.db.sessionmaker() as session:
        session.add(bunker)
        await session.flush()
        record_creation(session, bunker)
        if status != "pending":
            transition(session, bunker, status, "scheduled", at=at)
        await session.commit()
    return bunker.id


async def _status(state: ModuleState, bunker_id: str) -> tuple[str, str]:
    async with state.db.sessionmaker() as session:
        bunker = await session.get(Bunker, bunker_id)
        assert bunker is not None
        return bunker.status, bunker.status_reason


async def test_orphaned_boots_fail_with_provisioning_timeout(state: ModuleState) -> None:
    orphan = await _bunker(state, "provisioning", age_s=200, worker_id="wrk_a", mode="ephemeral")
    orphan_pending = await _bunker(state, "pending", age_s=200, worker_id="wrk_a", mode="session")
    followed = await _bunker(state, "provisioning", age_s=200, worker_id="wrk_a", mode="session")
    young = await _bunker(state, "provisioning", age_s=30, worker_id="wrk_a", mode="ephemeral")
    waiting = await _bunker(state, "pending", age_s=200, worker_id=None, mode="persistent")
    state.provisioning.add(followed)

    await reap_once(state)

    assert await _status(state, orphan) == ("failed", "provisioning_timeout")
    assert await _status(state, orphan_pending) == ("failed", "provisioning_timeout")
    assert await _status(state, followed) == ("provisioning", "scheduled")
    assert await _status(state, young) == ("provisioning", "scheduled")
    assert await _status(state, waiting) == ("pending", "created")

"""The worker link against a real WebSocket peer: joining, credentials, heartbeats, reconnects."""

from __future__ import annotations

import asyncio
import itertools
import stat

import pytest

from scaigrid.worker.link.client import LinkAuthRejected, LinkConfigError
from scaigrid.worker.link.credentials import store_credential

from .conftest import ControllerStub, LinkStarter


async def test_join_token_is_traded_for_a_stored_credential_used_on_reconnect(
    controller: ControllerStub, start_link: LinkStarter, tmp_path
) -> None:
    token = controller.new_join_token()
    link, _ = start_link(join_token=token)

    first = await controller.next_connection()
    assert first.authorization == f"Bearer {token}"
    register = first.register
    assert register is not None
    assert register["hostname"] == "test-worker"
    assert register["drivers"] == [{"name": "container", "isolation": "container", "accel": None}]
    await link.wait_connected()
    assert link.worker_id == controller.worker_id

    credential_file = tmp_path / "credential"
    (credential,) = controller.credentials
    assert credential.startswith("sbw_")
    assert credential_file.read_text().strip() == credential
    assert stat.S_IMODE(credential_file.stat().st_mode) == 0o600

    await first.drop()
    second = await controller.next_connection()
    assert second.authorization == f"Bearer {credential}"
    assert not controller.join_tokens, "the join token is consumed"


async def test_rejected_credential_is_fatal_without_retrying(
    controller: ControllerStub, start_link: LinkStarter, tmp_path
) -> None:
    store_credential(tmp_path / "credential", "sbw_revoked")
    _, task = start_link(join_token=controller.new_join_token())

    with pytest.raises(LinkAuthRejected, match="stored credential"):
        await asyncio.wait_for(task, 5)
    assert len(controller.attempts) == 1
    assert controller.attempts[0][1] == "Bearer sbw_revoked"


async def test_rejected_join_token_is_fatal(
    controller: ControllerStub, start_link: LinkStarter
) -> None:
    _, task = start_link(join_token="sbj_never_minted")
    with pytest.raises(LinkAuthRejected, match="join token"):
        await asyncio.wait_for(task, 5)
    assert len(controller.attempts) == 1


async def test_no_credential_and_no_join_token_is_a_config_error(
    start_link: LinkStarter,
) -> None:
    _, task = start_link()
    with pytest.raises(LinkConfigError):
        await asyncio.wait_for(task, 5)


async def test_heartbeats_arrive_at_the_interval_the_controller_asked_for(
    controller: ControllerStub, start_link: LinkStarter
) -> None:
    controller.heartbeat_interval_s = 0.1
    start_link(join_token=controller.new_join_token())
    conn = await controller.next_connection()

    loop = asyncio.get_running_loop()
    started = loop.time()
    beats = [await conn.next("heartbeat", timeout=2) for _ in range(3)]
    elapsed = loop.time() - started

    assert 0.25 <= elapsed < 2
    for beat in beats:
        assert beat["ts"].endswith("Z")
        assert set(beat["free"]) == {"cpu_millicores", "memory_mb", "disk_mb", "gpu_count"}
        assert beat["bunkers"] == []
        assert beat["image_cache"] == []


async def test_reconnect_backs_off_exponentially_with_jitter(
    controller: ControllerStub, start_link: LinkStarter
) -> None:
    controller.refuse_with = [503, 503, 503, 503, 503]
    start_link(join_token=controller.new_join_token(), backoff_initial_s=0.1, backoff_max_s=0.8)

    conn = await controller.next_connection(timeout=10)
    assert conn.register is not None
    times = [at for at, _ in controller.attempts]
    assert len(times) == 6
    gaps = [b - a for a, b in itertools.pairwise(times)]
    ceilings = [0.1, 0.2, 0.4, 0.8, 0.8]
    for gap, ceiling in zip(gaps, ceilings, strict=True):
        # jitter picks a delay in [ceiling/2, ceiling]; allow for scheduling slack
        assert ceiling / 2 - 0.01 <= gap <= ceiling + 0.25, (gaps, ceilings)


async def test_worker_reconnects_after_the_controller_drops_the_link(
    controller: ControllerStub, start_link: LinkStarter
) -> None:
    link, _ = start_link(join_token=controller.new_join_token())
    first = await controller.next_connection()
    await link.wait_connected()

    await first.drop()
    second = await controller.next_connection(timeout=5)
    assert second is not first
    assert second.register is not None
    await link.wait_connected()
    assert link.connected

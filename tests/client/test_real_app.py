"""The async client against the real controller app in process (``httpx.ASGITransport``).

No worker is connected, so these tests cover what the controller answers by itself:
envelopes, error codes with request ids, pagination, bunker reads and terminate, images.
Bunker rows are seeded straight into the database where a worker would have created them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from fastapi import FastAPI

from scaigrid.client import AsyncClient, BunkerNotFound, ValidationError
from scaigrid.client import errors as client_errors
from scaigrid.ids import new_id
from scaigrid.modules.scaibunker.bunkers.models import Bunker as BunkerRow
from scaigrid.platform.db import Database, utcnow
from tests.conftest import Identity, MakeIdentity

HOST = "http://testserver"


@pytest.fixture
async def identity(make_identity: MakeIdentity) -> Identity:
    """A tenant administrator (built-in roles below it hold no scaibunker keys) in a new
    tenant of its own."""
    return await make_identity(role="tenant_admin")


@pytest.fixture
async def real(platform_app: FastAPI, identity: Identity) -> AsyncIterator[AsyncClient]:
    """The SDK's async client on the real app, authenticated as ``identity``."""
    transport = httpx.ASGITransport(app=platform_app)
    async with AsyncClient(HOST, identity.key, transport=transport) as client:
        yield client


async def _seed_bunkers(
    app: FastAPI, owner: Identity, count: int, status: str = "running"
) -> list[str]:
    db: Database = app.state.db
    ids: list[str] = []
    now = utcnow()
    async with db.sessionmaker() as session:
        for index in range(count):
            bunker_id = new_id("bnk")
            ids.append(bunker_id)
            session.add(
                BunkerRow(
                    id=bunker_id,
                    tenant_id=owner.tenant_id,
                    owner_user_id=owner.user_id,
                    name=f"seeded-{index}",
                    image_name="debian-12",
                    image_id=new_id("img"),
                    lifecycle_mode="ephemeral",
                    network_profile="isolated",
                    cpu_millicores=1000,
                    memory_mb=512,
                    disk_mb=1024,
                    label_set={"parity": "odd" if index % 2 else "even"},
                    env_vars={"SECRET": "value"},
                    interfaces=[],
                    status=status,
                    status_reason="booted",
                    created_at=now + timedelta(milliseconds=index),
                )
            )
        await session.commit()
    return ids


async def test_unknown_bunker_is_bunker_not_found_with_the_request_id(
    real: AsyncClient,
) -> None:
    with pytest.raises(BunkerNotFound) as caught:
        await real.bunkers.get(new_id("bnk"))
    assert caught.value.status_code == 404
    assert caught.value.request_id is not None and caught.value.request_id.startswith("req_")


async def test_missing_and_unknown_keys_are_authentication_errors(platform_app: FastAPI) -> None:
    transport = httpx.ASGITransport(app=platform_app)
    async with AsyncClient(HOST, None, transport=transport) as anonymous:
        with pytest.raises(client_errors.AuthTokenMissing):
            await anonymous.bunkers.get("bnk_x")
    async with AsyncClient(HOST, "sgk_" + "x" * 40, transport=transport) as wrong:
        with pytest.raises(client_errors.AuthTokenInvalid):
            await wrong.bunkers.get("bnk_x")


async def test_create_errors_come_back_typed(real: AsyncClient) -> None:
    with pytest.raises(ValidationError) as caught:
        await real.bunkers.create(image="debian-12", cpu_millicores=10)
    assert any(d["field"] == "cpu_millicores" for d in caught.value.details)
    with pytest.raises(client_errors.ImageNotFound):
        await real.bunkers.create(image="no-such-image")


async def test_list_follows_the_real_cursor_across_pages(
    real: AsyncClient, platform_app: FastAPI, identity: Identity
) -> None:
    ids = await _seed_bunkers(platform_app, identity, 130)
    listed = [b async for b in real.bunkers.list()]
    assert [b.id for b in listed] == list(reversed(ids))
    assert {b.status for b in listed} == {"running"}
    odd = [b.name async for b in real.bunkers.list(label={"parity": "odd"}, limit=3)]
    assert odd == ["seeded-129", "seeded-127", "seeded-125"]
    assert [b async for b in real.bunkers.list(status="failed")] == []


async def test_get_and_terminate_a_bunker(
    real: AsyncClient, platform_app: FastAPI, identity: Identity
) -> None:
    [bunker_id] = await _seed_bunkers(platform_app, identity, 1)
    bunker = await real.bunkers.get(bunker_id)
    assert (bunker.name, bunker.status, bunker.memory_mb) == ("seeded-0", "running", 512)
    assert bunker.env_vars == {"SECRET": "***"}
    assert bunker.created_at is not None
    ended = await real.bunkers.terminate(bunker_id)
    assert ended.status in ("stopping", "terminated")
    assert (await real.bunkers.terminate(bunker_id)).id == bunker_id


async def test_exec_and_files_without_a_worker_are_agent_unavailable(
    real: AsyncClient, platform_app: FastAPI, identity: Identity
) -> None:
    [bunker_id] = await _seed_bunkers(platform_app, identity, 1)
    with pytest.raises(client_errors.AgentUnavailable):
        await real.bunkers.exec(bunker_id, ["true"])
    with pytest.raises(client_errors.AgentUnavailable):
        await real.files.write(bunker_id, "x.txt", b"data")
    [stopped] = await _seed_bunkers(platform_app, identity, 1, status="stopping")
    with pytest.raises(client_errors.BunkerNotRunning):
        await real.files.read(stopped, "x.txt")


async def test_images_register_list_get_deactivate(platform_app: FastAPI, admin_key: str) -> None:
    transport = httpx.ASGITransport(app=platform_app)
    async with AsyncClient(HOST, admin_key, transport=transport) as admin:
        source = {"kind": "debootstrap", "suite": "bookworm", "packages": ["curl"]}
        image = await admin.images.register("client-test", source, size_mib=1024)
        assert (image.name, image.status, image.size_mib) == ("client-test", "pending", 1024)
        assert image.source["packages"] == ["curl"]
        assert [i.id async for i in admin.images.list(name="client-test")] == [image.id]
        assert (await admin.images.get(image.id)).scope == "tenant"
        with pytest.raises(client_errors.SlugConflict):
            await admin.images.register("client-test", source)
        with pytest.raises(ValidationError):
            await admin.images.register("Bad Name", source)
        assert (await admin.images.deactivate(image.id)).status == "deactivated"
        with pytest.raises(client_errors.ImageNotFound):
            await admin.images.get(new_id("img"))
        pending = await admin.images.register("client-test-pending", source)
        with pytest.raises(client_errors.ImageNotReady):
            await admin.bunkers.create(image=pending.name)

"""Quota profile, assignment and usage routes on the real app; group buckets resolved through
nested groups (SPEC §9.1-9.6)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from scaigrid import errors
from scaigrid.ids import new_id
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.config import PlatformCeilings
from scaigrid.modules.scaibunker.quotas import service
from scaigrid.modules.scaibunker.quotas.models import DEFAULT_PROFILE_ID
from scaigrid.platform.db import Database, utcnow
from scaigrid.platform.iam.models import Group, GroupMember
from scaigrid.platform.permissions import Role

B = "/v1/modules/scaibunker"
CAPS = {
    "max_concurrent_bunkers": 1,
    "max_persistent_bunkers": 0,
    "max_cpu_millicores": 4000,
    "max_memory_mb": 4096,
    "max_disk_mb": 8192,
    "max_gpu_count": 0,
}
ASK = service.Ask(500, 128, 64, 0, False)


async def _admit_and_insert(db: Database, tenant_id: str, user_id: str) -> None:
    async with db.sessionmaker() as session:
        pairs = await service.admit(session, tenant_id, user_id, ASK, PlatformCeilings())
        now = utcnow()
        bunker = Bunker(
            id=new_id("bnk"),
            tenant_id=tenant_id,
            owner_user_id=user_id,
            image_name="busybox",
            image_id="img_x",
            lifecycle_mode="ephemeral",
            network_profile="isolated",
            cpu_millicores=ASK.cpu_millicores,
            memory_mb=ASK.memory_mb,
            disk_mb=ASK.disk_mb,
            gpu_count=0,
            status="running",
            status_reason="booted",
            status_changed_at=now,
            created_at=now,
            label_set={},
            env_vars={},
            interfaces=[],
        )
        session.add(bunker)
        await session.flush()
        service.record(session, bunker.id, pairs)
        await session.commit()


async def test_group_shared_profile_governs_every_member(
    platform_app: FastAPI, platform_client: httpx.AsyncClient, make_identity: Any
) -> None:
    admin = await make_identity(Role.TENANT_ADMIN)
    db: Database = platform_app.state.db
    async with db.sessionmaker() as session:
        parent = Group(tenant_id=admin.tenant_id, name="eng")
        session.add(parent)
        await session.flush()
        child = Group(tenant_id=admin.tenant_id, name="eng-data", parent_id=parent.id)
        session.add(child)
        await session.flush()
        session.add(GroupMember(group_id=child.id, user_id=admin.user_id))
        await session.commit()
        parent_id = parent.id

    created = await platform_client.post(
        f"{B}/quota-profiles",
        headers=admin.headers,
        json={"tenant_id": admin.tenant_id, "name": "team", **CAPS},
    )
    assert created.status_code == 201, created.text
    profile = created.json()["data"]
    duplicate = await platform_client.post(
        f"{B}/quota-profiles",
        headers=admin.headers,
        json={"tenant_id": admin.tenant_id, "name": "team", **CAPS},
    )
    assert duplicate.json()["error"]["code"] == "SLUG_CONFLICT"
    too_big = await platform_client.post(
        f"{B}/quota-profiles",
        headers=admin.headers,
        json={"tenant_id": admin.tenant_id, "name": "big", **CAPS, "per_bunker_max_cpu": 16001},
    )
    assert too_big.status_code == 422

    assign_url = f"{B}/quota-profiles/{profile['id']}/assignments"
    bad_mode = await platform_client.post(
        assign_url,
        headers=admin.headers,
        json={"target_kind": "user", "target_id": admin.user_id, "mode": "shared"},
    )
    assert bad_mode.status_code == 422
    unknown = await platform_client.post(
        assign_url,
        headers=admin.headers,
        json={"target_kind": "group", "target_id": "grp_nothere", "mode": "shared"},
    )
    assert unknown.status_code == 422
    assigned = await platform_client.post(
        assign_url,
        headers=admin.headers,
        json={"target_kind": "group", "target_id": parent_id, "mode": "shared"},
    )
    assert assigned.status_code == 201, assigned.text
    again = await platform_client.post(
        assign_url,
        headers=admin.headers,
        json={"target_kind": "group", "target_id": parent_id, "mode": "per_user"},
    )
    assert again.json()["error"]["code"] == "SLUG_CONFLICT"

    usage = await platform_client.get(f"{B}/quota-profiles/usage", headers=admin.headers)
    assert usage.status_code == 200, usage.text
    (row,) = usage.json()["data"]
    assert (row["profile_id"], row["mode"], row["bucket"]) == (
        profile["id"],
        "shared",
        f"group:{parent_id}",
    )
    assert row["current"]["bunkers"] == 0 and row["headroom"]["bunkers"] == 1

    await _admit_and_insert(db, admin.tenant_id, admin.user_id)
    with pytest.raises(errors.BunkerQuotaExceeded) as refused:
        await _admit_and_insert(db, admin.tenant_id, admin.user_id)
    assert isinstance(refused.value.details, list)
    (detail,) = refused.value.details
    assert (detail["field"], detail["bucket"], detail["cap"], detail["current"]) == (
        "max_concurrent_bunkers",
        f"group:{parent_id}",
        1,
        1,
    )
    usage = await platform_client.get(f"{B}/quota-profiles/usage", headers=admin.headers)
    assert usage.json()["data"][0]["current"]["memory_mb"] == ASK.memory_mb

    removed = await platform_client.delete(
        f"{B}/quota-assignments/{assigned.json()['data']['id']}", headers=admin.headers
    )
    assert removed.json()["data"] == {"id": assigned.json()["data"]["id"], "deleted": True}
    usage = await platform_client.get(f"{B}/quota-profiles/usage", headers=admin.headers)
    assert usage.json()["data"][0]["profile_id"] == DEFAULT_PROFILE_ID


async def test_default_profile_cannot_be_deleted_and_others_are_hidden(
    platform_client: httpx.AsyncClient, admin_headers: dict[str, str], make_identity: Any
) -> None:
    deleted = await platform_client.delete(
        f"{B}/quota-profiles/{DEFAULT_PROFILE_ID}", headers=admin_headers
    )
    assert deleted.status_code == 422
    user = await make_identity(Role.TENANT_USER)
    listed = await platform_client.get(f"{B}/quota-profiles", headers=user.headers)
    assert listed.status_code == 403
    admin = await make_identity(Role.TENANT_ADMIN)
    denied = await platform_client.patch(
        f"{B}/quota-profiles/{DEFAULT_PROFILE_ID}",
        headers=admin.headers,
        json={"max_concurrent_bunkers": 100},
    )
    assert denied.status_code == 403
    missing = await platform_client.get(
        f"{B}/quota-profiles/00000000-0000-4000-8000-00000000ffff/assignments",
        headers=admin.headers,
    )
    assert missing.json()["error"]["code"] == "QUOTA_PROFILE_NOT_FOUND"


async def test_a_new_assignment_counts_bunkers_that_already_run(
    platform_app: FastAPI, platform_client: httpx.AsyncClient, make_identity: Any
) -> None:
    admin = await make_identity(Role.TENANT_ADMIN)
    db: Database = platform_app.state.db
    await _admit_and_insert(db, admin.tenant_id, admin.user_id)  # under the default profile
    created = await platform_client.post(
        f"{B}/quota-profiles",
        headers=admin.headers,
        json={"tenant_id": admin.tenant_id, "name": "one", **CAPS},
    )
    profile = created.json()["data"]
    assigned = await platform_client.post(
        f"{B}/quota-profiles/{profile['id']}/assignments",
        headers=admin.headers,
        json={"target_kind": "user", "target_id": admin.user_id, "mode": "individual"},
    )
    assert assigned.status_code == 201, assigned.text
    usage = await platform_client.get(f"{B}/quota-profiles/usage", headers=admin.headers)
    (row,) = usage.json()["data"]
    assert (row["profile_id"], row["current"]["bunkers"]) == (profile["id"], 1)
    with pytest.raises(errors.BunkerQuotaExceeded):
        await _admit_and_insert(db, admin.tenant_id, admin.user_id)

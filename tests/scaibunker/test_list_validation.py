"""Bad input on the module's list endpoints (SPEC §1.4, §1.5): a cursor this server could
never have issued and an unknown enum filter answer 422 ``VALIDATION_ERROR`` naming the
query field; real cursors still page through every item exactly once.

The in-process app has no worker, so the endpoints below a bunker (processes, files) are
checked only for input validation, which happens before the bunker is looked up.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from tests.conftest import Identity, MakeIdentity

from scaigrid.ids import new_id
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.workers.models import Worker
from scaigrid.platform.db import Database, utcnow

B = "/v1/modules/scaibunker"
ANY_BUNKER = new_id("bnk")
OCI = {"kind": "oci", "ref": "registry.example/test/app:v1"}  # never pulled: no worker bakes
CAPS = {
    "max_concurrent_bunkers": 1,
    "max_persistent_bunkers": 0,
    "max_cpu_millicores": 4000,
    "max_memory_mb": 4096,
    "max_disk_mb": 8192,
    "max_gpu_count": 0,
}

#: (list URL, a cursor of the right shape for another listing) per endpoint family.
ID_LISTS = [
    ("/bunkers", new_id("snp")),
    ("/snapshots", new_id("bnk")),
    ("/images", new_id("avg")),
    ("/availability-groups", new_id("img")),
    ("/workers", new_id("brg")),
    ("/bridges", new_id("wrk")),
    (f"/bunkers/{ANY_BUNKER}/processes", new_id("bnk")),
    ("/quota-profiles", new_id("bnk")),
    ("/quota-profiles/00000000-0000-4000-8000-000000000001/assignments", new_id("bnk")),
]
#: Cursors no listing ever issues.
GARBAGE = ["garbage", "", "' OR 1=1 --", "bnk_", "99999999999999999999999999999999"]


def _field(response: httpx.Response) -> list[str]:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    return [d["field"] for d in error["details"]]


@pytest.fixture
async def admin(make_identity: MakeIdentity) -> Identity:
    """A tenant administrator: every listing here is open to it."""
    return await make_identity("tenant_admin")


@pytest.mark.parametrize(("path", "foreign"), ID_LISTS)
async def test_a_cursor_never_issued_is_a_validation_error(
    platform_client: httpx.AsyncClient, admin: Identity, path: str, foreign: str
) -> None:
    for cursor in [*GARBAGE, foreign, foreign.lower()]:
        response = await platform_client.get(
            B + path, params={"cursor": cursor}, headers=admin.headers
        )
        assert _field(response) == ["query.cursor"], cursor


@pytest.mark.parametrize(
    ("path", "cursor"),
    [
        (f"/bunkers/{ANY_BUNKER}/files/list", "abc"),
        (f"/bunkers/{ANY_BUNKER}/files/list", "-1"),
        (f"/bunkers/{ANY_BUNKER}/files/list", "1234567"),
        (f"/images/{new_id('img')}/scan", "x1"),
        (f"/images/{new_id('img')}/scan", "-5"),
    ],
)
async def test_an_offset_cursor_never_issued_is_a_validation_error(
    platform_client: httpx.AsyncClient, admin: Identity, path: str, cursor: str
) -> None:
    response = await platform_client.get(B + path, params={"cursor": cursor}, headers=admin.headers)
    assert _field(response) == ["query.cursor"]


async def test_accounting_usage_rejects_a_cursor_never_issued(
    platform_client: httpx.AsyncClient, admin: Identity
) -> None:
    for cursor in ("abc", "-1", "1.5", ""):
        response = await platform_client.get(
            "/v1/accounting/usage", params={"cursor": cursor}, headers=admin.headers
        )
        assert _field(response) == ["query.cursor"], cursor


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/bunkers", {"status": "bogus"}, "query.status[0]"),
        ("/bunkers", {"status": "running,bogus"}, "query.status[1]"),
        ("/bunkers", [("status", "paused"), ("status", "RUNNING")], "query.status[1]"),
        ("/bunkers", {"status": ""}, "query.status[0]"),
        ("/bunkers", {"lifecycle": "appliance"}, "query.lifecycle"),
        ("/bunkers", {"session_type": "chat"}, "query.session_type"),
        ("/bunkers", {"label": "no-equals-sign"}, "query.label[0]"),
        ("/bunkers", [("label", "a=b"), ("label", "=value")], "query.label[1]"),
        ("/workers", {"connection": "bogus"}, "query.connection"),
        ("/workers", {"admin_state": "paused"}, "query.admin_state"),
        ("/workers", {"label": "nolabel"}, "query.label[0]"),
        ("/snapshots", {"status": "bogus"}, "query.status"),
        ("/images", {"status": "bogus"}, "query.status"),
        ("/images", {"scope": "galaxy"}, "query.scope"),
        ("/availability-groups", {"scope": "partner"}, "query.scope"),
        (f"/bunkers/{ANY_BUNKER}/processes", {"status": "zombie"}, "query.status"),
    ],
)
async def test_an_unknown_filter_value_is_a_validation_error(
    platform_client: httpx.AsyncClient,
    admin: Identity,
    path: str,
    params: Any,
    field: str,
) -> None:
    response = await platform_client.get(B + path, params=params, headers=admin.headers)
    assert _field(response) == [field]


async def _walk(
    client: httpx.AsyncClient, url: str, who: Identity, limit: int, **params: Any
) -> list[dict[str, Any]]:
    """Every item of a listing, following ``next_cursor`` as received."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = {**params, "limit": limit, **({"cursor": cursor} if cursor else {})}
        response = await client.get(url, params=query, headers=who.headers)
        assert response.status_code == 200, response.text
        body = response.json()
        items.extend(body["data"])
        cursor = body["next_cursor"]
        assert body["has_more"] == (cursor is not None)
        if cursor is None:
            return items


async def _seed_bunkers(app: FastAPI, owner: Identity, statuses: list[str]) -> list[str]:
    db: Database = app.state.db
    ids: list[str] = []
    now = utcnow()
    async with db.sessionmaker() as session:
        for index, status in enumerate(statuses):
            ids.append(new_id("bnk"))
            session.add(
                Bunker(
                    id=ids[-1],
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
                    label_set={},
                    env_vars={},
                    interfaces=[],
                    status=status,
                    status_reason="booted",
                    created_at=now + timedelta(milliseconds=index),
                )
            )
        await session.commit()
    return ids


async def test_bunker_status_filters_take_lists_and_real_cursors_page_through(
    platform_app: FastAPI, platform_client: httpx.AsyncClient, admin: Identity
) -> None:
    statuses = ["running", "paused", "failed", "running", "expired", "paused", "running"]
    ids = await _seed_bunkers(platform_app, admin, statuses)
    every = await _walk(platform_client, f"{B}/bunkers", admin, 2)
    assert [b["id"] for b in every] == list(reversed(ids))
    live = await _walk(platform_client, f"{B}/bunkers", admin, 2, status="running,paused")
    wanted = [i for i, s in zip(ids, statuses, strict=True) if s in ("running", "paused")]
    assert [b["id"] for b in live] == list(reversed(wanted))
    repeated = await platform_client.get(
        f"{B}/bunkers",
        params=[("status", "failed"), ("status", "expired")],
        headers=admin.headers,
    )
    assert {b["status"] for b in repeated.json()["data"]} == {"failed", "expired"}


async def test_image_and_quota_profile_cursors_page_through(
    platform_client: httpx.AsyncClient, admin: Identity
) -> None:
    created = []
    for n in range(5):
        response = await platform_client.post(
            f"{B}/images", json={"name": f"paged-{n}", "source": OCI}, headers=admin.headers
        )
        assert response.status_code == 201, response.text
        created.append(response.json()["data"]["id"])
    mine = await _walk(platform_client, f"{B}/images", admin, 2, scope="tenant", status="pending")
    assert [i["id"] for i in mine] == list(reversed(created))

    profiles = set()
    for n in range(5):
        response = await platform_client.post(
            f"{B}/quota-profiles",
            json={"tenant_id": admin.tenant_id, "name": f"paged-{n}", **CAPS},
            headers=admin.headers,
        )
        assert response.status_code == 201, response.text
        profiles.add(response.json()["data"]["id"])
    listed = await _walk(platform_client, f"{B}/quota-profiles", admin, 2)
    listed_ids = [p["id"] for p in listed]
    assert len(listed_ids) == len(set(listed_ids))
    assert profiles <= set(listed_ids)


async def test_worker_filters_and_real_cursors_page_through(
    platform_app: FastAPI, platform_client: httpx.AsyncClient, admin: Identity
) -> None:
    db: Database = platform_app.state.db
    shapes = [
        ("online", "active", {"zone": "a"}),
        ("offline", "active", {"zone": "a", "gpu": "yes"}),
        ("online", "draining", {"zone": "b"}),
        ("online", "active", {"zone": "a", "gpu": "yes"}),
        ("offline", "draining", {}),
    ]
    ids: list[str] = []
    async with db.sessionmaker() as session:
        for connection, admin_state, labels in shapes:
            ids.append(new_id("wrk"))
            session.add(
                Worker(
                    id=ids[-1],
                    hostname=f"host-{len(ids)}",
                    tenant_id=admin.tenant_id,
                    labels=labels,
                    connection=connection,
                    admin_state=admin_state,
                    credential_hash=secrets.token_hex(32),
                )
            )
        await session.commit()
    url = f"{B}/workers"

    async def listed(**params: Any) -> list[str]:
        items = await _walk(platform_client, url, admin, 2, tenant_id=admin.tenant_id, **params)
        return [w["id"] for w in items]

    assert await listed() == list(reversed(ids))
    assert await listed(connection="online") == [ids[3], ids[2], ids[0]]
    assert await listed(admin_state="draining") == [ids[4], ids[2]]
    assert await listed(label=["zone=a", "gpu=yes"]) == [ids[3], ids[1]]
    assert await listed(connection="online", admin_state="active", label="zone=a") == [
        ids[3],
        ids[0],
    ]
    assert await listed(connection="stale") == []

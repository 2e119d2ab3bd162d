"""Module administration (SPEC §1.10): enable/disable per tenant and partner with
MODULE_NOT_ENABLED, bunkers ended on disable with their records kept, scope config merge,
null reset and 422 on bad keys."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import select

from scaigrid.ids import new_id
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.platform.db import Database

MakeIdentity = Callable[..., Awaitable[Any]]
BUNKERS = "/v1/modules/scaibunker/bunkers"
BASE = "/v1/modules/scaibunker"


def _code(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return str(response.json()["error"]["code"])


async def test_disable_answers_module_not_enabled_for_that_tenant_only(
    platform_client: httpx.AsyncClient, admin_headers: dict[str, str], make_identity: MakeIdentity
) -> None:
    client = platform_client
    boss = await make_identity(role="tenant_admin")
    member = await make_identity(role="tenant_admin", tenant=boss.tenant_slug)
    outsider = await make_identity(role="tenant_admin")
    assert (await client.get(BUNKERS, headers=member.headers)).status_code == 200

    user = await make_identity(role="tenant_user", tenant=boss.tenant_slug)
    assert _code(await client.post(f"{BASE}/disable", headers=user.headers), 403) == (
        "AUTHZ_PERMISSION_DENIED"
    )
    done = await client.post(f"{BASE}/disable", headers=boss.headers)
    assert done.status_code == 200 and done.json()["data"]["enabled"] is False
    assert _code(await client.get(BUNKERS, headers=member.headers), 403) == "MODULE_NOT_ENABLED"
    assert (await client.get(BUNKERS, headers=outsider.headers)).status_code == 200
    (record,) = (await client.get("/v1/modules", headers=member.headers)).json()["data"]
    assert record["status"] == "disabled"
    assert (await client.post(f"{BASE}/enable", headers=boss.headers)).status_code == 200
    assert (await client.get(BUNKERS, headers=member.headers)).status_code == 200


async def test_partner_disable_overrides_tenant_enable(
    platform_client: httpx.AsyncClient, admin_headers: dict[str, str], make_identity: MakeIdentity
) -> None:
    client = platform_client
    boss = await make_identity(role="tenant_admin")
    me = (await client.get(f"/v1/tenants/{boss.tenant_id}", headers=boss.headers)).json()["data"]
    partner = me["partner_id"]
    assert (await client.post(f"{BASE}/enable", headers=boss.headers)).status_code == 200
    # A tenant admin cannot switch its partner.
    response = await client.post(
        f"{BASE}/disable", params={"partner_id": partner}, headers=boss.headers
    )
    assert response.status_code == 404
    response = await client.post(
        f"{BASE}/disable", params={"partner_id": partner}, headers=admin_headers
    )
    assert response.status_code == 200
    assert _code(await client.get(BUNKERS, headers=boss.headers), 403) == "MODULE_NOT_ENABLED"
    await client.post(f"{BASE}/enable", params={"partner_id": partner}, headers=admin_headers)
    assert (await client.get(BUNKERS, headers=boss.headers)).status_code == 200


async def test_disable_ends_the_tenants_bunkers_and_keeps_their_records(
    platform_app: FastAPI, platform_client: httpx.AsyncClient, make_identity: MakeIdentity
) -> None:
    boss = await make_identity(role="tenant_admin")
    other = await make_identity(role="tenant_admin")
    db: Database = platform_app.state.db
    ids = {}
    async with db.sessionmaker() as session:
        for who in (boss, other):
            bunker = Bunker(
                id=new_id("bnk"),
                tenant_id=who.tenant_id,
                owner_user_id=who.user_id,
                image_name="debian-12",
                image_id=new_id("img"),
                lifecycle_mode="ephemeral",
                network_profile="isolated",
                cpu_millicores=1000,
                memory_mb=512,
                disk_mb=1024,
                status="pending",
                status_reason="created",
            )
            session.add(bunker)
            ids[who.tenant_id] = bunker.id
        await session.commit()
    assert (await platform_client.post(f"{BASE}/disable", headers=boss.headers)).status_code == 200
    async with db.sessionmaker() as session:
        rows = {b.tenant_id: b for b in await session.scalars(select(Bunker))}
    mine, theirs = rows[boss.tenant_id], rows[other.tenant_id]
    assert (mine.status, mine.status_reason) == ("terminated", "module_disabled")
    assert theirs.status == "pending"


async def test_config_merges_resets_with_null_and_refuses_bad_keys(
    platform_client: httpx.AsyncClient, make_identity: MakeIdentity
) -> None:
    client = platform_client
    boss = await make_identity(role="tenant_admin")
    url = f"{BASE}/config"
    got = (await client.get(url, headers=boss.headers)).json()["data"]
    assert got["global_config"]["read_audit"] is False
    assert got["global_config"]["exec_limits"]["default_timeout_s"] == 60
    assert got["scope_config"] == {}
    put = await client.put(
        url,
        json={"read_audit": True, "exec_limits": {"default_timeout_s": 30}},
        headers=boss.headers,
    )
    assert put.json()["data"]["scope_config"] == {
        "read_audit": True,
        "exec_limits": {"default_timeout_s": 30},
    }
    put = await client.put(url, json={"read_audit": None}, headers=boss.headers)
    assert put.json()["data"]["scope_config"] == {"exec_limits": {"default_timeout_s": 30}}
    for bad in ({"bogus": 1}, {"exec_limits": {"default_timeout_s": -1}}, {"read_audit": "maybe"}):
        response = await client.put(url, json=bad, headers=boss.headers)
        assert _code(response, 422) == "VALIDATION_ERROR"
        assert response.json()["error"]["details"]
    got = (await client.get(url, headers=boss.headers)).json()["data"]
    assert got["scope_config"] == {"exec_limits": {"default_timeout_s": 30}}
    user = await make_identity(role="tenant_user", tenant=boss.tenant_slug)
    assert _code(await client.get(url, headers=user.headers), 403) == "AUTHZ_PERMISSION_DENIED"


async def test_custom_roles_only_take_keys_of_enabled_modules(
    platform_client: httpx.AsyncClient, make_identity: MakeIdentity
) -> None:
    boss = await make_identity(role="tenant_admin")
    role = {"name": "r", "module_permissions": ["scaibunker:files"]}
    assert (await platform_client.post(f"{BASE}/disable", headers=boss.headers)).status_code == 200
    refused = await platform_client.post("/v1/iam/custom-roles", json=role, headers=boss.headers)
    assert _code(refused, 422) == "VALIDATION_ERROR"
    assert refused.json()["error"]["details"][0]["field"] == "module_permissions[0]"
    assert (await platform_client.post(f"{BASE}/enable", headers=boss.headers)).status_code == 200
    made = await platform_client.post("/v1/iam/custom-roles", json=role, headers=boss.headers)
    assert made.status_code == 201

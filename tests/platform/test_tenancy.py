"""Tenancy, identity and grants through the API: the walkthrough, reach (cross-tenant → 404),
privilege escalation (→ 403), revocation (→ 401 at once), nested groups, custom roles."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from scaigrid.platform.app import create_app
from scaigrid.settings import Settings

MakeIdentity = Callable[..., Awaitable[Any]]
BUNKERS = "/v1/modules/scaibunker/bunkers"


def _data(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()["data"]


def _code(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == "error"
    return str(body["error"]["code"])


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _tenant_with_admin(
    client: httpx.AsyncClient, admin: dict[str, str], slug: str
) -> tuple[str, dict[str, str]]:
    tenant = _data(await client.post("/v1/tenants", json={"name": slug}, headers=admin), 201)
    user = _data(
        await client.post(
            "/v1/users",
            json={"email": f"boss@{slug}.test", "role": "tenant_admin", "tenant_id": tenant["id"]},
            headers=admin,
        ),
        201,
    )
    key = _data(
        await client.post("/v1/api-keys", json={"name": "k", "user_id": user["id"]}, headers=admin),
        201,
    )
    return tenant["id"], _bearer(key["key"])


async def test_walkthrough_tenant_user_key_grant(
    platform_client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    client = platform_client
    tenant_id, boss = await _tenant_with_admin(client, admin_headers, "acme")
    dev = _data(await client.post("/v1/users", json={"email": "dev@acme.test"}, headers=boss), 201)
    assert dev["tenant_id"] == tenant_id and dev["role"] == "tenant_user"
    created = _data(
        await client.post("/v1/api-keys", json={"name": "ci", "user_id": dev["id"]}, headers=boss),
        201,
    )
    assert created["key"].startswith("sgk_") and created["key"].startswith(created["prefix"])
    dev_h = _bearer(created["key"])
    listed = await client.get("/v1/api-keys", params={"user_id": dev["id"]}, headers=boss)
    (item,) = _data(listed)
    assert "key" not in item and item["prefix"] == created["prefix"]
    assert created["key"] not in listed.text

    assert _code(await client.get(BUNKERS, headers=dev_h), 403) == "AUTHZ_PERMISSION_DENIED"
    grant = {"permissions": ["scaibunker:create", "scaibunker:execute"]}
    put = await client.put(f"/v1/users/{dev['id']}/module-permissions", json=grant, headers=boss)
    assert _data(put)["permissions"] == grant["permissions"]
    assert (await client.get(BUNKERS, headers=dev_h)).status_code == 200
    me = _data(await client.get(f"/v1/users/{dev['id']}", headers=dev_h))
    assert {"scaibunker:create", "scaibunker:execute", "modules:use"} <= set(me["permissions"])
    assert "scaibunker:files" not in me["permissions"]
    # A plain user sees only itself and cannot manage others.
    assert [u["id"] for u in _data(await client.get("/v1/users", headers=dev_h))] == [dev["id"]]
    assert (
        _code(await client.post("/v1/users", json={"email": "x@acme.test"}, headers=dev_h), 403)
        == "AUTHZ_PERMISSION_DENIED"
    )


async def test_cross_tenant_ids_are_404_and_change_nothing(
    platform_client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    client = platform_client
    tenant_a, boss_a = await _tenant_with_admin(client, admin_headers, "alpha")
    tenant_b, boss_b = await _tenant_with_admin(client, admin_headers, "beta")
    victim = _data(await client.post("/v1/users", json={"email": "v@b.test"}, headers=boss_b), 201)
    key_b = _data(
        await client.post(
            "/v1/api-keys", json={"name": "k", "user_id": victim["id"]}, headers=boss_b
        ),
        201,
    )
    group_b = _data(await client.post("/v1/groups", json={"name": "g"}, headers=boss_b), 201)

    attempts = [
        client.get(f"/v1/tenants/{tenant_b}", headers=boss_a),
        client.patch(f"/v1/tenants/{tenant_b}", json={"name": "pwned"}, headers=boss_a),
        client.get(f"/v1/users/{victim['id']}", headers=boss_a),
        client.patch(f"/v1/users/{victim['id']}", json={"display_name": "pwned"}, headers=boss_a),
        client.delete(f"/v1/users/{victim['id']}", headers=boss_a),
        client.get("/v1/users", params={"tenant_id": tenant_b}, headers=boss_a),
        client.put(
            f"/v1/users/{victim['id']}/module-permissions",
            json={"permissions": []},
            headers=boss_a,
        ),
        client.delete(f"/v1/api-keys/{key_b['id']}", headers=boss_a),
        client.get("/v1/api-keys", params={"user_id": victim["id"]}, headers=boss_a),
        client.get(f"/v1/groups/{group_b['id']}", headers=boss_a),
        client.put(f"/v1/groups/{group_b['id']}/members", json={"user_ids": []}, headers=boss_a),
        client.post(
            "/v1/users", json={"email": "spy@b.test", "tenant_id": tenant_b}, headers=boss_a
        ),
    ]
    for attempt in attempts:
        response = await attempt
        assert response.status_code == 404, response.text
        assert "beta" not in response.text and "v@b.test" not in response.text
    # Nothing changed in tenant B.
    assert _data(await client.get(f"/v1/tenants/{tenant_b}", headers=boss_b))["name"] == "beta"
    got = _data(await client.get(f"/v1/users/{victim['id']}", headers=boss_b))
    assert got["display_name"] == "v"
    assert (await client.get("/v1/modules", headers=_bearer(key_b["key"]))).status_code == 200
    tenants = _data(await client.get("/v1/tenants", headers=boss_a))
    assert [t["id"] for t in tenants] == [tenant_a]


async def test_partner_admin_reaches_only_its_partners_tenants(
    platform_client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    client = platform_client
    partner = _data(
        await client.post("/v1/partners", json={"name": "reseller"}, headers=admin_headers), 201
    )
    mine = _data(
        await client.post(
            "/v1/tenants", json={"name": "mine", "partner_id": partner["id"]}, headers=admin_headers
        ),
        201,
    )
    other, _ = await _tenant_with_admin(client, admin_headers, "other")
    padmin = _data(
        await client.post(
            "/v1/users",
            json={"email": "p@r.test", "role": "partner_admin", "tenant_id": mine["id"]},
            headers=admin_headers,
        ),
        201,
    )
    key = _data(
        await client.post(
            "/v1/api-keys", json={"name": "k", "user_id": padmin["id"]}, headers=admin_headers
        ),
        201,
    )
    ph = _bearer(key["key"])
    assert [t["id"] for t in _data(await client.get("/v1/tenants", headers=ph))] == [mine["id"]]
    assert (await client.get(f"/v1/tenants/{other}", headers=ph)).status_code == 404
    made = _data(await client.post("/v1/tenants", json={"name": "second"}, headers=ph), 201)
    assert made["partner_id"] == partner["id"]
    assert _code(await client.post("/v1/partners", json={"name": "x"}, headers=ph), 403)
    assert (await client.get(f"/v1/partners/{partner['id']}", headers=ph)).status_code == 200


async def test_privilege_escalation_is_refused(
    platform_client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    client = platform_client
    tenant_id, boss = await _tenant_with_admin(client, admin_headers, "esc")
    dev = _data(await client.post("/v1/users", json={"email": "d@esc.test"}, headers=boss), 201)
    refused = [
        client.put(
            f"/v1/users/{dev['id']}/module-permissions",
            json={"permissions": ["scaibunker:admin"]},
            headers=boss,
        ),
        client.put(
            f"/v1/users/{dev['id']}/module-permissions",
            json={"permissions": ["scaibunker:admin:platform"]},
            headers=boss,
        ),
        client.post("/v1/tenants", json={"name": "mine"}, headers=boss),
        client.post("/v1/partners", json={"name": "mine"}, headers=boss),
        client.post("/v1/users", json={"email": "s@esc.test", "role": "super_admin"}, headers=boss),
        client.post(
            "/v1/users", json={"email": "p@esc.test", "role": "partner_admin"}, headers=boss
        ),
        client.patch(f"/v1/users/{dev['id']}", json={"role": "super_admin"}, headers=boss),
        client.post(
            "/v1/iam/custom-roles",
            json={"name": "r", "module_permissions": ["scaibunker:admin:platform"]},
            headers=boss,
        ),
    ]
    for attempt in refused:
        response = await attempt
        assert _code(response, 403) == "AUTHZ_PERMISSION_DENIED", response.text
    # A role made by the platform admin cannot be handed out by the tenant admin.
    strong = _data(
        await client.post(
            "/v1/iam/custom-roles",
            json={
                "name": "ops",
                "module_permissions": ["scaibunker:admin"],
                "tenant_id": tenant_id,
            },
            headers=admin_headers,
        ),
        201,
    )
    response = await client.put(
        f"/v1/users/{dev['id']}/custom-roles", json={"role_ids": [strong["id"]]}, headers=boss
    )
    assert response.json()["error"]["details"] == {"permission": "scaibunker:admin"}
    group = _data(await client.post("/v1/groups", json={"name": "g"}, headers=boss), 201)
    response = await client.post(
        "/v1/role-mappings", json={"group_id": group["id"], "role": strong["id"]}, headers=boss
    )
    assert _code(response, 403) == "AUTHZ_PERMISSION_DENIED"
    me = _data(await client.get(f"/v1/users/{dev['id']}", headers=boss))
    assert "scaibunker:admin" not in me["permissions"]
    bad = await client.put(
        f"/v1/users/{dev['id']}/module-permissions",
        json={"permissions": ["scaibunker:create", "nope:x"]},
        headers=boss,
    )
    assert _code(bad, 422) == "VALIDATION_ERROR"
    assert bad.json()["error"]["details"][0]["field"] == "permissions[1]"


async def test_malformed_and_oversized_bodies_get_the_envelope(
    platform_client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    headers = {**admin_headers, "Content-Type": "application/json"}
    bad = await platform_client.post("/v1/tenants", content=b"{not json", headers=headers)
    assert _code(bad, 422) == "VALIDATION_ERROR"
    extra = await platform_client.post(
        "/v1/tenants", json={"name": "x", "evil": 1}, headers=headers
    )
    assert _code(extra, 422) == "VALIDATION_ERROR"
    huge = await platform_client.post(
        "/v1/tenants", content=b'{"name": "' + b"a" * (2 * 1024 * 1024) + b'"}', headers=headers
    )
    assert _code(huge, 413) == "VALIDATION_ERROR"
    slug = await platform_client.post(
        "/v1/tenants", json={"name": "x", "slug": "Not A Slug"}, headers=headers
    )
    assert _code(slug, 422) == "VALIDATION_ERROR"


async def test_nested_groups_and_custom_roles_grant_transitively(
    platform_client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    client = platform_client
    _tenant_id, boss = await _tenant_with_admin(client, admin_headers, "grp")
    dev = _data(await client.post("/v1/users", json={"email": "d@grp.test"}, headers=boss), 201)
    role = _data(
        await client.post(
            "/v1/iam/custom-roles",
            json={"name": "files", "module_permissions": ["scaibunker:files", "scaibunker:create"]},
            headers=boss,
        ),
        201,
    )
    parent = _data(await client.post("/v1/groups", json={"name": "eng"}, headers=boss), 201)
    child = _data(
        await client.post(
            "/v1/groups", json={"name": "eng-a", "parent_id": parent["id"]}, headers=boss
        ),
        201,
    )
    grandchild = _data(
        await client.post(
            "/v1/groups", json={"name": "eng-a1", "parent_id": child["id"]}, headers=boss
        ),
        201,
    )
    _data(
        await client.post(
            "/v1/role-mappings", json={"group_id": parent["id"], "role": role["id"]}, headers=boss
        ),
        201,
    )

    async def keys() -> set[str]:
        return set(_data(await client.get(f"/v1/users/{dev['id']}", headers=boss))["permissions"])

    assert "scaibunker:files" not in await keys()
    members = {"user_ids": [dev["id"]]}
    _data(await client.put(f"/v1/groups/{grandchild['id']}/members", json=members, headers=boss))
    assert {"scaibunker:files", "scaibunker:create"} <= await keys()
    _data(
        await client.put(
            f"/v1/groups/{grandchild['id']}/members", json={"user_ids": []}, headers=boss
        )
    )
    assert "scaibunker:files" not in await keys()
    _data(
        await client.put(
            f"/v1/users/{dev['id']}/custom-roles", json={"role_ids": [role["id"]]}, headers=boss
        )
    )
    assert "scaibunker:files" in await keys()
    _data(await client.delete(f"/v1/iam/custom-roles/{role['id']}", headers=boss))
    assert "scaibunker:files" not in await keys()


@pytest.fixture
async def cached_client(
    tmp_path: Path, migrated_sqlite_template: Path, settings_for: Callable[..., Settings]
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, dict[str, str]]]:
    """An app with the principal cache on (30 s) and its admin headers."""
    shutil.copy2(migrated_sqlite_template, tmp_path / "scaigrid.db")
    settings = settings_for(tmp_path, auth_cache_ttl_s=30)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield app, client, _bearer(settings.admin_key_file.read_text().strip())


async def test_revoking_a_key_through_the_api_ends_it_at_once_despite_the_cache(
    cached_client: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    _app, client, admin = cached_client
    _tenant_id, boss = await _tenant_with_admin(client, admin, "rev")
    key = _data(await client.post("/v1/api-keys", json={"name": "tmp"}, headers=boss), 201)
    headers = _bearer(key["key"])
    assert (await client.get("/v1/modules", headers=headers)).status_code == 200  # now cached
    revoked = _data(await client.delete(f"/v1/api-keys/{key['id']}", headers=boss))
    assert revoked["revoked_at"] is not None
    assert _code(await client.get("/v1/modules", headers=headers), 401) == "AUTH_TOKEN_INVALID"
    assert (await client.get("/v1/modules", headers=boss)).status_code == 200


async def test_identity_and_grants_on_every_database(
    empty_database_url: str, tmp_path: Path, settings_for: Callable[..., Settings]
) -> None:
    """The walkthrough and the cross-tenant rule on SQLite, PostgreSQL and MariaDB."""
    settings = settings_for(tmp_path, database_url=empty_database_url)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            admin = _bearer(settings.admin_key_file.read_text().strip())
            _tenant_a, boss_a = await _tenant_with_admin(client, admin, "db-a")
            _tenant_b, boss_b = await _tenant_with_admin(client, admin, "db-b")
            dev = _data(
                await client.post("/v1/users", json={"email": "d@a.test"}, headers=boss_a), 201
            )
            grant = {"permissions": ["scaibunker:create", "scaibunker:execute"]}
            url = f"/v1/users/{dev['id']}/module-permissions"
            assert (
                _data(await client.put(url, json=grant, headers=boss_a))["permissions"]
                == (grant["permissions"])
            )
            assert (await client.put(url, json=grant, headers=boss_b)).status_code == 404
            group = _data(await client.post("/v1/groups", json={"name": "g"}, headers=boss_a), 201)
            _data(
                await client.put(
                    f"/v1/groups/{group['id']}/members",
                    json={"user_ids": [dev["id"]]},
                    headers=boss_a,
                )
            )
            _data(
                await client.post(
                    "/v1/role-mappings",
                    json={"group_id": group["id"], "role": "tenant_admin"},
                    headers=boss_a,
                ),
                201,
            )
            keys = _data(await client.get(f"/v1/users/{dev['id']}", headers=boss_a))["permissions"]
            assert "scaibunker:admin:tenant" in keys
            audit = _data(await client.get("/v1/audit-log", headers=admin))
            assert len(audit) >= 8

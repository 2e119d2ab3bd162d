"""Cursors of the platform's list endpoints (SPEC §1.4): a cursor this server could never
have issued answers 422 ``VALIDATION_ERROR`` naming ``query.cursor``; real cursors page
through every item exactly once."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from tests.conftest import Identity, MakeIdentity

from scaigrid.ids import new_id

#: (list URL, a well-formed id of another listing).
LISTS = [
    ("/v1/partners", new_id("ten")),
    ("/v1/tenants", new_id("ptn")),
    ("/v1/users", new_id("key")),
    ("/v1/api-keys", new_id("usr")),
    ("/v1/webhooks", new_id("dlv")),
    ("/v1/iam/custom-roles", new_id("grp")),
    ("/v1/groups", new_id("rol")),
    ("/v1/role-mappings", new_id("grp")),
]
GARBAGE = ["garbage", "", "' OR 1=1 --", "usr_", "0" * 40]


def _fields(response: httpx.Response) -> list[str]:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    return [d["field"] for d in error["details"]]


@pytest.mark.parametrize(("url", "foreign"), LISTS)
async def test_a_cursor_never_issued_is_a_validation_error(
    platform_client: httpx.AsyncClient, admin_headers: dict[str, str], url: str, foreign: str
) -> None:
    for cursor in [*GARBAGE, foreign]:
        response = await platform_client.get(url, params={"cursor": cursor}, headers=admin_headers)
        assert _fields(response) == ["query.cursor"], cursor


async def test_webhook_deliveries_and_audit_log_reject_a_cursor_never_issued(
    platform_client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    # Query validation comes before the webhook is looked up.
    deliveries = f"/v1/webhooks/{new_id('whk')}/deliveries"
    for url, cursor in [(deliveries, "x"), (deliveries, new_id("whk")), ("/v1/audit-log", "x")]:
        response = await platform_client.get(url, params={"cursor": cursor}, headers=admin_headers)
        assert _fields(response) == ["query.cursor"], (url, cursor)


async def _walk(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], **params: Any
) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = {**params, "limit": 2, **({"cursor": cursor} if cursor else {})}
        response = await client.get(url, params=query, headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        items.extend(body["data"])
        cursor = body["next_cursor"]
        if cursor is None:
            return items


async def test_real_cursors_page_through_users_and_keys(
    platform_client: httpx.AsyncClient, make_identity: MakeIdentity
) -> None:
    admin: Identity = await make_identity("tenant_admin")
    users = {admin.user_id}
    for _ in range(4):
        users.add((await make_identity("tenant_user", tenant=admin.tenant_slug)).user_id)
    listed = [u["id"] for u in await _walk(platform_client, "/v1/users", admin.headers)]
    assert sorted(listed, reverse=True) == listed
    assert set(listed) == users
    keys = {admin.api_key_id}
    for n in range(4):
        created = await platform_client.post(
            "/v1/api-keys", json={"name": f"k{n}"}, headers=admin.headers
        )
        assert created.status_code == 201, created.text
        keys.add(created.json()["data"]["id"])
    listed = [k["id"] for k in await _walk(platform_client, "/v1/api-keys", admin.headers)]
    assert sorted(listed, reverse=True) == listed
    assert set(listed) == keys

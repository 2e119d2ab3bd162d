"""Bearer API keys: 401 codes, wrong-kind credentials, revocation, last_used_at throttling,
403 with the missing key named."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import update

from scaigrid import errors
from scaigrid.ids import new_secret
from scaigrid.platform.auth import Principal, require
from scaigrid.platform.auth.models import ApiKey
from scaigrid.platform.auth.service import PrincipalCache, authenticate, hash_key, revoke_api_key
from scaigrid.platform.db import Database, utcnow
from scaigrid.platform.envelope import ok
from scaigrid.platform.permissions import Role

MakeIdentity = Callable[..., Awaitable[Any]]


def _code(response: httpx.Response) -> str:
    body = response.json()
    assert body["status"] == "error"
    assert body["meta"]["request_id"] == response.headers["x-request-id"]
    return str(body["error"]["code"])


async def test_missing_header_is_auth_token_missing(platform_client: httpx.AsyncClient) -> None:
    response = await platform_client.get("/v1/modules")
    assert response.status_code == 401
    assert _code(response) == "AUTH_TOKEN_MISSING"


@pytest.mark.parametrize(
    "authorization",
    [
        f"Bearer {new_secret('sgk')}",  # well-formed but unknown
        "Bearer sgk_short",  # malformed
        f"Bearer {new_secret('sbj')}",  # worker join token
        f"Bearer {new_secret('sbw')}",  # worker credential
        "Bearer eyJ2IjoxLCJtIjpbIkdFVCJdfQ.c2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJl",  # capability
        "Basic dXNlcjpwYXNz",
        "Bearer",
    ],
)
async def test_unknown_malformed_and_wrong_kind_credentials_are_invalid(
    platform_client: httpx.AsyncClient, authorization: str
) -> None:
    response = await platform_client.get("/v1/modules", headers={"Authorization": authorization})
    assert response.status_code == 401
    assert _code(response) == "AUTH_TOKEN_INVALID"


async def test_revoked_key_is_invalid(
    platform_app: FastAPI, platform_client: httpx.AsyncClient, make_identity: MakeIdentity
) -> None:
    identity = await make_identity()
    assert (await platform_client.get("/v1/modules", headers=identity.headers)).status_code == 200
    db: Database = platform_app.state.db
    async with db.sessionmaker() as session:
        await revoke_api_key(session, identity.api_key_id)
        await session.commit()
    response = await platform_client.get("/v1/modules", headers=identity.headers)
    assert response.status_code == 401
    assert _code(response) == "AUTH_TOKEN_INVALID"


async def _last_used(db: Database, key_id: str) -> Any:
    async with db.sessionmaker() as session:
        key = await session.get(ApiKey, key_id)
        assert key is not None
        return key.last_used_at


async def test_last_used_at_is_written_at_most_once_a_minute(
    platform_app: FastAPI, platform_client: httpx.AsyncClient, make_identity: MakeIdentity
) -> None:
    db: Database = platform_app.state.db
    identity = await make_identity()
    assert await _last_used(db, identity.api_key_id) is None

    await platform_client.get("/v1/modules", headers=identity.headers)
    first = await _last_used(db, identity.api_key_id)
    assert first is not None and first.tzinfo is not None
    for _ in range(3):
        await platform_client.get("/v1/modules", headers=identity.headers)
    assert await _last_used(db, identity.api_key_id) == first

    stale = utcnow() - timedelta(minutes=2)
    async with db.sessionmaker() as session:
        await session.execute(
            update(ApiKey).where(ApiKey.id == identity.api_key_id).values(last_used_at=stale)
        )
        await session.commit()
    await platform_client.get("/v1/modules", headers=identity.headers)
    assert await _last_used(db, identity.api_key_id) > stale + timedelta(minutes=1)


@pytest.fixture
def guarded_app(platform_app: FastAPI) -> FastAPI:
    """The platform app plus a route that needs two keys and one that shows the principal."""

    async def needs_create_and_admin(
        principal: Annotated[Principal, Depends(require("modules:use", "scaibunker:admin"))],
    ) -> Any:
        return ok({"user_id": principal.user_id})

    async def whoami(principal: Annotated[Principal, Depends(require())]) -> Any:
        return ok(
            {
                "user_id": principal.user_id,
                "tenant_id": principal.tenant_id,
                "partner_id": principal.partner_id,
                "role": principal.role.value,
                "api_key_id": principal.api_key_id,
            }
        )

    platform_app.add_api_route("/test/admin-only", needs_create_and_admin)
    platform_app.add_api_route("/test/whoami", whoami)
    return platform_app


async def test_missing_permission_is_403_naming_the_key(
    guarded_app: FastAPI,
    platform_client: httpx.AsyncClient,
    make_identity: MakeIdentity,
    admin_headers: dict[str, str],
) -> None:
    tenant_admin = await make_identity(Role.TENANT_ADMIN)
    response = await platform_client.get("/test/admin-only", headers=tenant_admin.headers)
    assert response.status_code == 403
    assert _code(response) == "AUTHZ_PERMISSION_DENIED"
    assert response.json()["error"]["details"] == {"permission": "scaibunker:admin"}

    allowed = await platform_client.get("/test/admin-only", headers=admin_headers)
    assert allowed.status_code == 200


async def test_principal_carries_tenant_partner_and_key(
    guarded_app: FastAPI, platform_client: httpx.AsyncClient, make_identity: MakeIdentity
) -> None:
    alice = await make_identity(Role.TENANT_USER, tenant="acme")
    bob = await make_identity(Role.TENANT_VIEWER, tenant="globex")
    seen = [
        (await platform_client.get("/test/whoami", headers=who.headers)).json()["data"]
        for who in (alice, bob)
    ]
    assert seen[0]["tenant_id"] == alice.tenant_id != bob.tenant_id == seen[1]["tenant_id"]
    assert seen[0]["partner_id"].startswith("ptn_")
    assert (seen[0]["user_id"], seen[0]["api_key_id"], seen[0]["role"]) == (
        alice.user_id,
        alice.api_key_id,
        "tenant_user",
    )


async def test_principal_cache_skips_the_database_until_the_entry_expires(
    tmp_path: Path, make_identity: MakeIdentity, platform_app: FastAPI
) -> None:
    db: Database = platform_app.state.db
    identity = await make_identity()
    cache = PrincipalCache(ttl_s=60)
    first = await authenticate(db, identity.key, cache)
    async with db.sessionmaker() as session:
        await session.execute(
            update(ApiKey).where(ApiKey.id == identity.api_key_id).values(revoked_at=utcnow())
        )
        await session.commit()
    assert await authenticate(db, identity.key, cache) == first
    cache.invalidate(hash_key(identity.key))
    with pytest.raises(errors.AuthTokenInvalid):
        await authenticate(db, identity.key, cache)
    with pytest.raises(errors.AuthTokenInvalid):
        await authenticate(db, identity.key, PrincipalCache(ttl_s=0))

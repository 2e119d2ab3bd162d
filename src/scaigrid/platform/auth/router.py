"""API keys under ``/v1/api-keys`` (SPEC §1.2): create (the secret shown once), list
(prefix and metadata only), revoke.

A caller manages its own keys; administrators also manage the keys of users in tenants they
administer, but only of users whose role they may assign and whose keys they hold, so a key
never carries more than its creator could grant.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.platform.auth.dependencies import CurrentPrincipal
from scaigrid.platform.auth.models import ApiKey
from scaigrid.platform.auth.principal import Principal
from scaigrid.platform.auth.service import PrincipalCache, create_api_key, revoke_api_key
from scaigrid.platform.db import get_session
from scaigrid.platform.envelope import ok, ok_list
from scaigrid.platform.iam import service as iam
from scaigrid.platform.pagination import Limit, id_cursor, page
from scaigrid.platform.tenancy.models import User
from scaigrid.platform.tenancy.router import administered_user, visible_user

router = APIRouter(prefix="/v1/api-keys", tags=["api-keys"])
Session = Annotated[AsyncSession, Depends(get_session)]


class ApiKeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    user_id: str | None = Field(default=None, max_length=32)


def _out(key: ApiKey) -> dict[str, object]:
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "user_id": key.user_id,
        "tenant_id": key.tenant_id,
        "created_at": key.created_at,
        "last_used_at": key.last_used_at,
        "revoked_at": key.revoked_at,
    }


async def _owner(session: AsyncSession, principal: Principal, user_id: str | None) -> User:
    """The user whose keys the caller manages: itself, or an administered user whose
    permissions the caller holds.

    Raises:
        NotFound: invisible user (404).
        AuthzPermissionDenied: not administered, or holding keys the caller lacks (403).
    """
    if user_id is None or user_id == principal.user_id:
        return await visible_user(session, principal, principal.user_id)
    user = await administered_user(session, principal, user_id)
    iam.check_role_assignable(principal, user.role)
    iam.check_grantable(principal, await iam.effective_permissions(session, user))
    return user


@router.post("", status_code=201)
async def create_key(body: ApiKeyIn, principal: CurrentPrincipal, session: Session) -> JSONResponse:
    """Mint a key for the caller (or ``user_id``); ``data.key`` is the full ``sgk_`` secret,
    shown only in this answer."""
    owner = await _owner(session, principal, body.user_id)
    key, secret = await create_api_key(session, owner, body.name)
    await session.commit()
    return ok({**_out(key), "key": secret}, 201)


@router.get("")
async def list_keys(
    principal: CurrentPrincipal,
    session: Session,
    user_id: str | None = None,
    limit: Limit = 100,
    cursor: Annotated[str | None, id_cursor("key")] = None,
) -> JSONResponse:
    """Keys of the caller (or of ``user_id``), newest first, without secrets."""
    owner = await _owner(session, principal, user_id)
    query = select(ApiKey).where(ApiKey.user_id == owner.id)
    rows, nxt = await page(session, query, ApiKey.id, limit, cursor)
    return ok_list([_out(k) for k in rows], nxt)


@router.delete("/{key_id}")
async def revoke_key(
    request: Request, key_id: str, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """Revoke a key of the caller or of a user it administers; the key stops working at
    once on this controller (the principal cache entry is dropped)."""
    key = await session.get(ApiKey, key_id)
    if key is None:
        raise errors.NotFound(f"No API key {key_id}")
    if key.user_id != principal.user_id:
        try:
            await administered_user(session, principal, key.user_id)
        except errors.ScaiGridError as exc:
            raise errors.NotFound(f"No API key {key_id}") from exc
    await revoke_api_key(session, key.id)
    await session.commit()
    cache: PrincipalCache = request.app.state.principal_cache
    cache.invalidate(key.key_hash)
    return ok({"id": key.id, "deleted": True, "revoked_at": key.revoked_at})

"""API keys: minting, revoking and authenticating ``sgk_…`` bearer keys (SPEC §1.2)."""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta

import structlog
from sqlalchemy import or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.ids import new_secret
from scaigrid.platform.auth.models import KEY_PREFIX_LENGTH, ApiKey
from scaigrid.platform.auth.principal import Principal
from scaigrid.platform.db import Database, utcnow
from scaigrid.platform.permissions import Role, permissions_for_role
from scaigrid.platform.tenancy.models import Tenant, User

log = structlog.get_logger(__name__)

API_KEY_PREFIX = "sgk"
#: ``sgk_`` then at least 32 URL-safe base64 characters.
API_KEY_RE = re.compile(r"sgk_[A-Za-z0-9_-]{32,}")
#: ``last_used_at`` is written at most once per this interval per key, so authentication
#: does not add a database write to every request.
LAST_USED_RESOLUTION = timedelta(seconds=60)


def hash_key(secret: str) -> str:
    """Return the lowercase hex SHA-256 of an API key secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


async def create_api_key(session: AsyncSession, user: User, name: str) -> tuple[ApiKey, str]:
    """Mint a key for ``user``; return the row and the secret (shown once, never stored).

    The row is flushed, not committed.
    """
    secret = new_secret(API_KEY_PREFIX)
    key = ApiKey(
        user_id=user.id,
        tenant_id=user.tenant_id,
        name=name,
        prefix=secret[:KEY_PREFIX_LENGTH],
        key_hash=hash_key(secret),
    )
    session.add(key)
    await session.flush()
    log.info("auth.api_key_created", api_key_id=key.id, user_id=user.id)
    return key, secret


async def revoke_api_key(session: AsyncSession, ref: str) -> ApiKey:
    """Revoke a key given its id (``key_…``) or its secret (``sgk_…``); idempotent; flushed,
    not committed.

    Raises:
        NotFound: no such key.
    """
    if ref.startswith(f"{API_KEY_PREFIX}_"):
        key = await session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(ref)))
    else:
        key = await session.get(ApiKey, ref)
    if key is None:
        raise errors.NotFound("No such API key")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        await session.flush()
        log.info("auth.api_key_revoked", api_key_id=key.id)
    return key


async def authenticate(db: Database, secret: str) -> Principal:
    """Resolve an API key secret to the :class:`Principal` it acts for.

    Raises:
        AuthTokenInvalid: malformed, unknown or revoked key, or a credential of another kind
            (worker credentials, join tokens, capabilities).
    """
    if not API_KEY_RE.fullmatch(secret):
        raise errors.AuthTokenInvalid("The credential is not a valid API key")
    query = (
        select(ApiKey, User, Tenant)
        .join(User, User.id == ApiKey.user_id)
        .join(Tenant, Tenant.id == User.tenant_id)
        .where(ApiKey.key_hash == hash_key(secret))
    )
    async with db.sessionmaker() as session:
        row = (await session.execute(query)).first()
    if row is None:
        raise errors.AuthTokenInvalid("Unknown API key")
    key, user, tenant = row
    if key.revoked_at is not None:
        raise errors.AuthTokenInvalid("The API key has been revoked")
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_RESOLUTION:
        await _touch(db, key.id)
    role = Role(user.role)
    return Principal(
        user_id=user.id,
        tenant_id=tenant.id,
        partner_id=tenant.partner_id,
        role=role,
        api_key_id=key.id,
        permissions=permissions_for_role(role),
    )


async def _touch(db: Database, key_id: str) -> None:
    # Own short transaction, conditional so concurrent requests write at most once per
    # interval. A failure (e.g. SQLite busy) only loses a usage mark, never the request.
    now = utcnow()
    statement = (
        update(ApiKey)
        .where(
            ApiKey.id == key_id,
            or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < now - LAST_USED_RESOLUTION),
        )
        .values(last_used_at=now)
    )
    try:
        async with db.sessionmaker() as session:
            await session.execute(statement)
            await session.commit()
    except SQLAlchemyError:
        log.warning("auth.last_used_update_failed", api_key_id=key_id, exc_info=True)

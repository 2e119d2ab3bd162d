"""API keys: minting, revoking and authenticating ``sgk_…`` bearer keys (SPEC §1.2)."""

from __future__ import annotations

import hashlib
import re
import time
from datetime import datetime, timedelta

import structlog
from sqlalchemy import or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.ids import new_secret
from scaigrid.platform.auth.models import KEY_PREFIX_LENGTH, ApiKey
from scaigrid.platform.auth.principal import Principal
from scaigrid.platform.db import Database, utcnow
from scaigrid.platform.iam.service import effective_permissions
from scaigrid.platform.permissions import Role
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


class PrincipalCache:
    """Recently resolved API keys, so a busy key costs no database round trip per request.

    An entry lives ``ttl_s`` seconds (``SCAIGRID_AUTH_CACHE_TTL_S``), so a revoked key stops
    working within that time; :meth:`invalidate` drops a key at once.

    Args:
        ttl_s: lifetime of an entry, in seconds.
        max_entries: entries kept at most; the cache is emptied when it would grow past this.
    """

    def __init__(self, ttl_s: float = 5.0, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Principal, datetime]] = {}

    def get(self, key_hash: str) -> tuple[Principal, datetime] | None:
        """The cached ``(principal, last_used_at)`` of ``key_hash`` if not expired."""
        entry = self._entries.get(key_hash)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1], entry[2]

    def put(self, key_hash: str, principal: Principal, last_used_at: datetime) -> None:
        """Remember ``principal`` (and when its key was last marked used) for ``ttl_s``."""
        if self.ttl_s <= 0:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key_hash] = (time.monotonic() + self.ttl_s, principal, last_used_at)

    def invalidate(self, key_hash: str) -> None:
        """Forget ``key_hash`` (its key was revoked)."""
        self._entries.pop(key_hash, None)

    def clear(self) -> None:
        """Forget every entry (grants changed: permissions must be resolved again)."""
        self._entries.clear()


async def authenticate(db: Database, secret: str, cache: PrincipalCache | None = None) -> Principal:
    """Resolve an API key secret to the :class:`Principal` it acts for (cached, see
    :class:`PrincipalCache`).

    Raises:
        AuthTokenInvalid: malformed, unknown or revoked key, or a credential of another kind
            (worker credentials, join tokens, capabilities).
    """
    if not API_KEY_RE.fullmatch(secret):
        raise errors.AuthTokenInvalid("The credential is not a valid API key")
    key_hash = hash_key(secret)
    now = utcnow()
    if cache is not None and (cached := cache.get(key_hash)) is not None:
        known, marked_at = cached
        if now - marked_at >= LAST_USED_RESOLUTION and known.api_key_id is not None:
            await _touch(db, known.api_key_id)
            cache.put(key_hash, known, now)
        return known
    query = (
        select(ApiKey, User, Tenant)
        .join(User, User.id == ApiKey.user_id)
        .join(Tenant, Tenant.id == User.tenant_id)
        .where(ApiKey.key_hash == key_hash)
    )
    async with db.sessionmaker() as session:
        row = (await session.execute(query)).first()
        if row is None:
            raise errors.AuthTokenInvalid("Unknown API key")
        key, user, tenant = row
        if key.revoked_at is not None:
            raise errors.AuthTokenInvalid("The API key has been revoked")
        permissions = await effective_permissions(session, user)
    last_used_at: datetime | None = key.last_used_at
    if last_used_at is None or now - last_used_at >= LAST_USED_RESOLUTION:
        await _touch(db, key.id)
        last_used_at = now
    role = Role(user.role)
    principal = Principal(
        user_id=user.id,
        tenant_id=tenant.id,
        partner_id=tenant.partner_id,
        role=role,
        api_key_id=key.id,
        permissions=permissions,
    )
    if cache is not None:
        cache.put(key_hash, principal, last_used_at)
    return principal


async def principal_for_user(db: Database, user_id: str) -> Principal:
    """The :class:`Principal` of a user authenticated by a non-key credential (a JWT's
    ``sub``); ``api_key_id`` is None.

    Raises:
        AuthTokenInvalid: no such user.
    """
    query = select(User, Tenant).join(Tenant, Tenant.id == User.tenant_id).where(User.id == user_id)
    async with db.sessionmaker() as session:
        row = (await session.execute(query)).first()
        if row is None:
            raise errors.AuthTokenInvalid("The token's subject is not a user")
        user, tenant = row
        permissions = await effective_permissions(session, user)
    return Principal(
        user_id=user.id,
        tenant_id=tenant.id,
        partner_id=tenant.partner_id,
        role=Role(user.role),
        api_key_id=None,
        permissions=permissions,
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

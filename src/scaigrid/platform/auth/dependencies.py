"""FastAPI dependencies for authentication and permission checks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from scaigrid import errors
from scaigrid.platform.auth.jwt import JwtVerifier, looks_like_jwt
from scaigrid.platform.auth.principal import Principal
from scaigrid.platform.auth.service import authenticate, principal_for_user
from scaigrid.platform.db import get_database
from scaigrid.platform.modules.service import EnabledCache, is_enabled
from scaigrid.platform.ratelimit import Level, RateLimiter
from scaigrid.settings import Settings


async def current_principal(request: HTTPConnection) -> Principal:
    """Authenticate ``Authorization: Bearer sgk_…`` (or an RS256 JWT when the app has a
    ``jwt_verifier``) and return the caller.

    Works for HTTP requests and WebSocket upgrades. The principal is also stored in
    ``request.state.principal``.

    Raises:
        AuthTokenMissing: no ``Authorization`` header (401 ``AUTH_TOKEN_MISSING``).
        AuthTokenInvalid: not a bearer credential, or a malformed, unknown, revoked or
            non-user credential (401 ``AUTH_TOKEN_INVALID``).
        ModuleNotEnabled: the route belongs to a module disabled for the caller's tenant or
            partner (403 ``MODULE_NOT_ENABLED``).
        SessionExpired: an expired JWT (401 ``SESSION_EXPIRED``).
        RateLimited: a rate limit of SPEC §1.6 is reached (429 ``RATE_LIMITED``); the
            ``X-Scaigrid-Ratelimit-*`` headers go on every authenticated response.
    """
    header = request.headers.get("authorization")
    if not header:
        raise errors.AuthTokenMissing("An Authorization: Bearer credential is required")
    scheme, _, credential = header.partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise errors.AuthTokenInvalid("The Authorization header must be 'Bearer <credential>'")
    credential = credential.strip()
    verifier: JwtVerifier | None = getattr(request.app.state, "jwt_verifier", None)
    if verifier is not None and looks_like_jwt(credential):
        user_id = await verifier.subject(credential)
        principal = await principal_for_user(get_database(request), user_id)
    else:
        cache = getattr(request.app.state, "principal_cache", None)
        principal = await authenticate(get_database(request), credential, cache)
    request.state.principal = principal
    module: str | None = getattr(request.state, "module", None)
    if module is not None:
        key = (module, principal.tenant_id, principal.partner_id)
        cached: EnabledCache | None = getattr(request.app.state, "module_enabled_cache", None)
        enabled = cached.get(key) if cached is not None else None
        if enabled is None:
            async with get_database(request).sessionmaker() as session:
                enabled = await is_enabled(session, *key)
            if cached is not None:
                cached.put(key, enabled)
        if not enabled:
            raise errors.ModuleNotEnabled(f"The {module} module is not enabled for your tenant")
    limiter: RateLimiter | None = getattr(request.app.state, "rate_limiter", None)
    if limiter is not None:
        decision = await limiter.hit(rate_limit_levels(request.app.state.settings, principal))
        request.state.ratelimit_headers = decision.headers()
        decision.raise_if_denied()
    return principal


def rate_limit_levels(settings: Settings, principal: Principal) -> list[Level]:
    """The SPEC §1.6 levels that apply to ``principal``: its API key (when it used one), its
    user, tenant and partner, with the configured limits."""
    levels = [
        Level(f"rl:usr:{principal.user_id}", settings.rate_limit_user_per_min),
        Level(f"rl:ten:{principal.tenant_id}", settings.rate_limit_tenant_per_min),
        Level(f"rl:ptn:{principal.partner_id}", settings.rate_limit_partner_per_min),
    ]
    if principal.api_key_id is not None:
        levels.insert(0, Level(f"rl:key:{principal.api_key_id}", settings.rate_limit_key_per_min))
    return levels


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
"""``principal: CurrentPrincipal`` in a route signature: any authenticated caller."""


def require(*keys: str) -> Callable[[Principal], Awaitable[Principal]]:
    """Dependency factory: the caller must hold every permission key in ``keys``.

    Usage: ``principal: Annotated[Principal, Depends(require("scaibunker:create"))]``.

    Raises:
        AuthTokenMissing, AuthTokenInvalid: as :func:`current_principal`.
        AuthzPermissionDenied: a key is missing (403 ``AUTHZ_PERMISSION_DENIED``,
            ``details = {"permission": "<first missing key>"}``).
    """

    async def dependency(principal: CurrentPrincipal) -> Principal:
        for key in keys:
            if not principal.has(key):
                raise errors.AuthzPermissionDenied(
                    f"Missing permission {key}", details={"permission": key}
                )
        return principal

    return dependency

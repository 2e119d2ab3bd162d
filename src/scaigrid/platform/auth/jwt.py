"""Second credential type (SPEC §1.2): RS256 JWTs from one configured issuer.

The verification key is a PEM public key (``SCAIGRID_JWT_PUBLIC_KEY``) or the issuer's JWKS
(``SCAIGRID_JWT_JWKS_URL``, fetched with PyJWT's :class:`jwt.PyJWKClient`, cached 5 minutes).
``iss``, ``aud``, ``exp`` and ``sub`` are required; ``sub`` is the ScaiGrid user id
(``usr_…``) the token acts for. Verification is PyJWT's (https://pyjwt.readthedocs.io).
"""

from __future__ import annotations

import asyncio

import jwt
import structlog

from scaigrid import errors
from scaigrid.settings import Settings

log = structlog.get_logger(__name__)

#: Seconds a JWKS fetch may take.
JWKS_TIMEOUT_S = 5.0
#: Clock skew tolerated on ``exp`` / ``nbf``, in seconds.
LEEWAY_S = 30


def looks_like_jwt(credential: str) -> bool:
    """True for three dot-separated base64url parts (the JWS compact form)."""
    parts = credential.split(".")
    return len(parts) == 3 and all(parts)


class JwtVerifier:
    """Verifies bearer JWTs against the configured issuer, audience and key.

    Args:
        issuer: required ``iss``.
        audience: required ``aud``.
        public_key_pem: PEM public key, or None to use ``jwks_url``.
        jwks_url: the issuer's JWKS URL, or None to use ``public_key_pem``.
    """

    def __init__(
        self, issuer: str, audience: str, public_key_pem: str | None, jwks_url: str | None
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self._pem = public_key_pem
        self._jwks = (
            jwt.PyJWKClient(jwks_url, timeout=JWKS_TIMEOUT_S, lifespan=300) if jwks_url else None
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> JwtVerifier | None:
        """A verifier when ``jwt_issuer`` and a key source are configured, else None."""
        if not settings.jwt_issuer or not (settings.jwt_public_key or settings.jwt_jwks_url):
            return None
        return cls(
            settings.jwt_issuer,
            settings.jwt_audience,
            settings.jwt_public_key,
            settings.jwt_jwks_url,
        )

    async def subject(self, token: str) -> str:
        """Verify ``token`` and return its ``sub``.

        Raises:
            SessionExpired: the token has expired (401 ``SESSION_EXPIRED``).
            AuthTokenInvalid: bad signature, algorithm, issuer, audience or claims, or the
                JWKS cannot be fetched or lacks the key (401 ``AUTH_TOKEN_INVALID``).
        """
        try:
            if self._jwks is not None:
                signing = await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)
                key: object = signing.key
            else:
                key = self._pem
            claims = jwt.decode(
                token,
                key,  # type: ignore[arg-type]
                algorithms=["RS256"],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY_S,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise errors.SessionExpired("The token has expired") from exc
        except jwt.PyJWKClientError as exc:
            log.warning("auth.jwks_unavailable", error=str(exc))
            raise errors.AuthTokenInvalid("The token's signing key is not available") from exc
        except jwt.InvalidTokenError as exc:
            raise errors.AuthTokenInvalid(f"Invalid token: {exc}") from exc
        subject = claims["sub"]
        if not isinstance(subject, str):
            raise errors.AuthTokenInvalid("Invalid token: sub is not a string")
        return subject

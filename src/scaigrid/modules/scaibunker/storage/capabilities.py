"""Storage capability tokens (SPEC §11.3).

Format ``<payload>.<signature>``, both base64url without padding. ``payload`` is the JSON
``{"v": 1, "m": [methods], "k": key | "p": prefix, "exp": unix_s, "iat": unix_s}``; the
signature is HMAC-SHA256 over the *encoded* payload with the shared secret. Verification needs
only the secret(s): constant-time signature check against the current and the previous secret
(rotation), ``exp`` with 30 s clock-skew tolerance, the method in ``m`` and the key equal to
``k`` or starting with ``p``.

Every rejection of a presented token is :class:`~scaigrid.errors.AuthzPermissionDenied` (403,
as issue #8 asks: expired, tampered and wrong-scope tokens are refused alike, before any
object is touched); an absent token is ``AUTH_TOKEN_MISSING`` (401).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from scaigrid.errors import AuthzPermissionDenied, ValidationFailed

VERSION: Final = 1
DEFAULT_TTL_S: Final = 900
MAX_TTL_S: Final = 3600
CLOCK_SKEW_S: Final = 30
MIN_SECRET_BYTES: Final = 32
METHODS: Final = frozenset({"GET", "HEAD", "PUT", "DELETE"})
MAX_KEY_CHARS: Final = 1024
_KEY_RE: Final = re.compile(r"^scaibunker/[A-Za-z0-9._\-/]+$")
_MAX_TOKEN_CHARS: Final = 4096


def validate_key(key: str, *, prefix: bool = False) -> str:
    """Return ``key`` if it is a safe object key (or prefix, which must end in ``/``).

    Rules: starts with ``scaibunker/``; only ``A-Za-z0-9._-/``; at most 1024 characters; no
    empty, ``.`` or ``..`` segments.

    Raises:
        ValidationFailed: the key breaks a rule.
    """
    body = key[:-1] if prefix and key.endswith("/") else key
    segments = body.split("/")
    if (
        len(key) > MAX_KEY_CHARS
        or not _KEY_RE.match(key)
        or (prefix and not key.endswith("/"))
        or any(seg in ("", ".", "..") for seg in segments)
    ):
        raise ValidationFailed(
            "invalid object key", details=[{"field": "key", "message": "invalid object key"}]
        )
    return key


@dataclass(frozen=True)
class Capability:
    """A verified capability: ``methods``, exactly one of ``key``/``prefix``, ``exp``/``iat``
    in unix seconds."""

    methods: frozenset[str]
    key: str | None
    prefix: str | None
    exp: int
    iat: int

    def allows(self, method: str, key: str) -> bool:
        """True when ``method`` on ``key`` is in scope (HEAD is also allowed by GET)."""
        if method not in self.methods and not (method == "HEAD" and "GET" in self.methods):
            return False
        if self.key is not None:
            return key == self.key
        return self.prefix is not None and key.startswith(self.prefix)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: bytes, payload: str) -> str:
    return _b64(hmac.new(secret, payload.encode("ascii"), hashlib.sha256).digest())


def mint(
    secret: bytes,
    methods: Sequence[str],
    *,
    key: str | None = None,
    prefix: str | None = None,
    ttl_s: int = DEFAULT_TTL_S,
    now: float | None = None,
) -> tuple[str, int]:
    """Sign a capability; return ``(token, exp)`` with ``exp`` in unix seconds.

    Args:
        secret: the signing secret (at least 32 bytes).
        methods: subset of GET, HEAD, PUT, DELETE.
        key / prefix: exactly one; a prefix ends in ``/``.
        ttl_s: lifetime, 1..3600 s.

    Raises:
        ValueError: a short secret, unknown method, both or neither of key/prefix, bad ttl.
        ValidationFailed: the key or prefix is not a valid object key.
    """
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError("capability secret must be at least 32 bytes")
    if not methods or not set(methods) <= METHODS:
        raise ValueError(f"methods must be a non-empty subset of {sorted(METHODS)}")
    if (key is None) == (prefix is None):
        raise ValueError("exactly one of key and prefix")
    if not 1 <= ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl_s must be 1..{MAX_TTL_S}")
    iat = int(now if now is not None else time.time())
    exp = iat + ttl_s
    body: dict[str, object] = {"v": VERSION, "m": sorted(set(methods)), "exp": exp, "iat": iat}
    if key is not None:
        body["k"] = validate_key(key)
    else:
        assert prefix is not None
        body["p"] = validate_key(prefix, prefix=True)
    payload = _b64(json.dumps(body, separators=(",", ":"), sort_keys=True).encode())
    return f"{payload}.{_sign(secret, payload)}", exp


def _parse(payload: str) -> Capability:
    try:
        body = json.loads(_unb64(payload))
    except (ValueError, binascii.Error) as exc:
        raise AuthzPermissionDenied("malformed capability") from exc
    if not isinstance(body, dict) or body.get("v") != VERSION:
        raise AuthzPermissionDenied("malformed capability")
    methods, key, prefix = body.get("m"), body.get("k"), body.get("p")
    exp, iat = body.get("exp"), body.get("iat")
    if (
        not isinstance(methods, list)
        or not all(isinstance(m, str) for m in methods)
        or not isinstance(exp, int)
        or not isinstance(iat, int)
        or (key is None) == (prefix is None)
        or not isinstance(key if key is not None else prefix, str)
    ):
        raise AuthzPermissionDenied("malformed capability")
    return Capability(frozenset(methods), key, prefix, exp, iat)


def verify(
    token: str,
    secrets: Sequence[bytes],
    method: str,
    key: str,
    *,
    now: float | None = None,
) -> Capability:
    """Check ``token`` for ``method`` on ``key``; return the capability.

    Args:
        secrets: the current secret, then the previous one during rotation.

    Raises:
        AuthzPermissionDenied: malformed, bad signature, expired (beyond 30 s skew), or the
            method/key is out of scope.
    """
    if len(token) > _MAX_TOKEN_CHARS or token.count(".") != 1:
        raise AuthzPermissionDenied("malformed capability")
    payload, signature = token.split(".")
    if not any(
        hmac.compare_digest(_sign(secret, payload), signature) for secret in secrets if secret
    ):
        raise AuthzPermissionDenied("capability signature is invalid")
    cap = _parse(payload)
    if cap.exp + CLOCK_SKEW_S < (now if now is not None else time.time()):
        raise AuthzPermissionDenied("capability has expired")
    if not cap.allows(method, key):
        raise AuthzPermissionDenied("capability does not cover this method and key")
    return cap

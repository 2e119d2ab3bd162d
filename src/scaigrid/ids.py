"""Prefixed ULID identifiers (SPEC §1.12).

``new_id("bnk")`` → ``"bnk_01JDZ4Q7S8Y6V3N2K5M9T0R1WX"``: the prefix, an underscore and a
26-character Crockford base32 ULID (https://github.com/ulid/spec).
"""

from __future__ import annotations

import re
import secrets

from ulid import ULID

PREFIXES = frozenset(
    {
        "bnk",
        "img",
        "snp",
        "wrk",
        "brg",
        "avg",
        "exe",
        "shs",
        "wjt",
        "req",
        "ten",
        "usr",
        "ptn",
        "key",
        "rol",
        "grp",
        "rmp",
        "whk",
        "evt",
        "dlv",
    }
)

_ID_RE = re.compile(r"^(?P<prefix>[a-z]{3})_[0-9A-HJKMNP-TV-Z]{26}$")


def new_id(prefix: str) -> str:
    """Return a new identifier ``{prefix}_{ULID}``.

    Args:
        prefix: one of :data:`PREFIXES` (three lowercase letters).

    Raises:
        ValueError: the prefix is not a known one.
    """
    if prefix not in PREFIXES:
        raise ValueError(f"unknown id prefix {prefix!r}")
    return f"{prefix}_{ULID()}"


def is_id(value: str, prefix: str) -> bool:
    """Return True when ``value`` is a well-formed identifier with ``prefix``."""
    match = _ID_RE.match(value)
    return bool(match and match.group("prefix") == prefix)


def new_secret(prefix: str, nbytes: int = 32) -> str:
    """Return a random bearer secret ``{prefix}_{urlsafe-base64}``.

    Args:
        prefix: e.g. ``"sgk"`` (API key), ``"sbj"`` (join token), ``"sbw"`` (worker credential).
        nbytes: random bytes before encoding (32 → 43 characters).
    """
    return f"{prefix}_{secrets.token_urlsafe(nbytes)}"

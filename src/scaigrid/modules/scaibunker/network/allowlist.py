"""Allowlist entry rules (SPEC §8.4), checked at the API edge.

Accepted: plain hostnames and first-level wildcards (``*`` as the whole leftmost label,
followed by at least two labels). Labels are 1-63 characters from the RFC 1035 set (letters,
digits, hyphen; no leading or trailing hyphen); the whole name is at most 253 characters.
Rejected: schemes, paths, ports, IP literals, ``**``, mid-name and non-leftmost wildcards,
``*.com``. Entries are compared case-insensitively and stored lower-case without a trailing
dot, duplicates dropped.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Final

_LABEL: Final = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
MAX_NAME_LEN: Final = 253


def normalize_entry(raw: str) -> str:
    """Check one entry and return it lower-case without a trailing dot.

    Raises:
        ValueError: the entry breaks a rule; the message says which.
    """
    if not isinstance(raw, str) or not raw:
        raise ValueError("must be a non-empty hostname")
    if "://" in raw:
        raise ValueError("must not have a scheme prefix")
    if "/" in raw:
        raise ValueError("must not have a path")
    if ":" in raw or raw.startswith("["):
        raise ValueError("must not have a port or be an IPv6 literal")
    name = raw.lower()
    if name.endswith("."):
        name = name[:-1]
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        raise ValueError("must be a hostname, not an IP literal")
    if len(name) > MAX_NAME_LEN:
        raise ValueError(f"must be at most {MAX_NAME_LEN} characters")
    labels = name.split(".")
    if labels[0] == "*":
        if len(labels) < 3:
            raise ValueError("a wildcard must be followed by at least two labels")
        labels = labels[1:]
    for label in labels:
        if "*" in label:
            raise ValueError("'*' is only allowed as the whole leftmost label")
        if not _LABEL.match(label):
            raise ValueError(f"label {label!r} must be 1-63 letters, digits or inner hyphens")
    if all(label.isdigit() for label in labels):
        raise ValueError("must be a hostname, not an IP literal")
    return name


def dedupe(entries: Iterable[str]) -> list[str]:
    """Normalised entries in first-seen order without duplicates."""
    return list(dict.fromkeys(entries))

"""Timestamps in the SPEC's format (SPEC §0.4)."""

from __future__ import annotations

import time


def rfc3339(ts: float) -> str:
    """``2026-05-09T12:00:00Z`` for a UNIX timestamp (UTC, whole seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))

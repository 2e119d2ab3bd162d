"""Checks of operation arguments; every failure is ``VALIDATION_ERROR`` (422)."""

from __future__ import annotations

import os
from typing import Any

from scaigrid.agent.identity import HOME, IDENTITIES, Identity
from scaigrid.protocol.agent import AgentError

MAX_PATH_BYTES = 4096


def invalid(message: str, field: str | None = None) -> AgentError:
    """A ``VALIDATION_ERROR`` naming ``field``."""
    details = [{"field": field, "message": message}] if field else None
    return AgentError("VALIDATION_ERROR", message, details)


def get_bool(args: dict[str, Any], name: str, default: bool) -> bool:
    """``args[name]`` as a bool (absent or null → ``default``)."""
    value = args.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"{name} must be a boolean", name)
    return value


def get_int(
    args: dict[str, Any], name: str, default: int, *, low: int = 0, high: int = 1 << 62
) -> int:
    """``args[name]`` as an int within ``[low, high]`` (absent or null → ``default``)."""
    value = args.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(f"{name} must be an integer from {low} to {high}", name)
    return value


def get_str(args: dict[str, Any], name: str, default: str | None = None) -> str:
    """``args[name]`` as a string (absent → ``default``, required when that is None)."""
    value = args.get(name, default)
    if not isinstance(value, str):
        raise invalid(f"{name} must be a string", name)
    return value


def get_choice(args: dict[str, Any], name: str, choices: tuple[str, ...], default: str) -> str:
    """``args[name]``, one of ``choices``."""
    value = args.get(name)
    if value is None:
        return default
    if value not in choices:
        raise invalid(f"{name} must be one of {', '.join(choices)}", name)
    return str(value)


def get_identity(args: dict[str, Any]) -> Identity:
    """The acting guest user from ``args["user"]`` (default ``user``)."""
    return IDENTITIES[get_choice(args, "user", tuple(IDENTITIES), "user")]


def get_path(args: dict[str, Any], name: str = "path") -> str:
    """A guest path: non-empty, ≤ 4096 bytes, no NUL; relative ones resolve against
    ``/home/user``. Returns the absolute path (``..`` is left for the kernel to resolve,
    so symlinks keep their meaning).
    """
    value = args.get(name)
    if not isinstance(value, str) or not value:
        raise invalid(f"{name} must be a non-empty string", name)
    if "\x00" in value:
        raise invalid(f"{name} must not contain NUL", name)
    if len(os.fsencode(value)) > MAX_PATH_BYTES:
        raise invalid(f"{name} is longer than {MAX_PATH_BYTES} bytes", name)
    return value if value.startswith("/") else f"{HOME}/{value}"


def display_path(path: str) -> str:
    """The normalised absolute form of ``path`` used in results."""
    return "/" + os.path.normpath(path).lstrip("/")

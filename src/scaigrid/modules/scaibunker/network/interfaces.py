"""Transit interface elements of ``POST /bunkers`` (SPEC §2.2, §8.6), checked at the API edge.

Rules: ``if_name`` 1-15 characters of ``[a-z0-9_.-]``, not ``lo`` or ``eth0``, unique within
the bunker; ``bridge_name`` a bridge name (``[a-z0-9-]``, 1-63); ``spoof_guard`` default
``true``; ``mac`` a unicast ``xx:xx:xx:xx:xx:xx`` (stored lower case) or omitted (a locally
administered address is generated, :func:`generated_mac`); at most 8 elements.
"""

from __future__ import annotations

import re
import secrets
from typing import Annotated, Final

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

BRIDGE_NAME_PATTERN: Final = r"^[a-z0-9-]{1,63}$"
_MAC: Final = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
MAX_INTERFACES: Final = 8


class InterfaceSpec(BaseModel):
    """One ``interfaces`` element of a create request."""

    model_config = ConfigDict(extra="forbid")

    if_name: str = Field(pattern=r"^[a-z0-9_.-]{1,15}$")
    bridge_name: str = Field(pattern=BRIDGE_NAME_PATTERN)
    spoof_guard: bool = True
    mac: str | None = None

    @field_validator("if_name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in ("lo", "eth0"):
            raise ValueError(f"if_name {value!r} is reserved")
        return value

    @field_validator("mac")
    @classmethod
    def _unicast(cls, value: str | None) -> str | None:
        if value is None:
            return None
        mac = value.lower()
        if not _MAC.match(mac):
            raise ValueError("mac must be xx:xx:xx:xx:xx:xx")
        if int(mac[:2], 16) & 1:
            raise ValueError("mac must be a unicast address")
        if mac == "00:00:00:00:00:00":
            raise ValueError("mac must not be all zeros")
        return mac


def _unique_names(value: list[InterfaceSpec]) -> list[InterfaceSpec]:
    names = [i.if_name for i in value]
    if len(set(names)) != len(names):
        raise ValueError("if_name values must be unique within the bunker")
    return value


#: The ``interfaces`` field type of ``CreateBunkerRequest``.
Interfaces = Annotated[
    list[InterfaceSpec], Field(max_length=MAX_INTERFACES), AfterValidator(_unique_names)
]


def generated_mac() -> str:
    """A random locally administered unicast MAC (``02:xx:xx:xx:xx:xx``)."""
    return ":".join(f"{b:02x}" for b in (0x02, *secrets.token_bytes(5)))

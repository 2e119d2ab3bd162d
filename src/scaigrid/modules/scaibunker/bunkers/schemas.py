"""Request and response shapes of the bunker, exec and files routes (SPEC §2.2, §3.2, §4)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from scaigrid.modules.scaibunker.network.allowlist import dedupe, normalize_entry
from scaigrid.modules.scaibunker.network.interfaces import Interfaces

LifecycleMode = Literal["ephemeral", "session", "persistent"]
NetworkProfile = Literal["isolated", "registry", "allowlisted", "unrestricted", "transit"]
SessionType = Literal["standalone", "scaicore", "scaiwave", "api"]
ExecUser = Literal["user", "root"]
#: Bunker states (SPEC §2.4).
BunkerStatus = Literal[
    "pending", "provisioning", "running", "paused", "stopping", "terminated", "failed", "expired"
]
#: Exec/process record states (SPEC §3.3, §3.6).
ProcessStatus = Literal["running", "exited", "signaled", "timed_out", "oom_killed", "agent_lost"]


def _label_pair(value: str) -> str:
    key, sep, _ = value.partition("=")
    if not sep or not key:
        raise ValueError("label filters look like key=value")
    return value


#: One repeatable ``label=key=value`` list filter (SPEC §2.3.2, §10.2); errors name
#: ``query.label[i]``.
LabelPair = Annotated[str, AfterValidator(_label_pair)]


def label_filters(items: list[str] | None) -> dict[str, str]:
    """``["team=data", "tier=gold"]`` (each a :data:`LabelPair`) → ``{"team": "data", ...}``;
    a repeated key keeps its last value."""
    pairs = (item.partition("=") for item in items or [])
    return {key: value for key, _, value in pairs}


def split_commas(value: list[str] | None) -> list[str] | None:
    """Flatten a repeatable, comma-separated query parameter (``?status=a,b&status=c`` →
    ``["a", "b", "c"]``) so that each item is validated on its own (errors name
    ``query.status[i]``)."""
    if value is None:
        return None
    return [part for item in value for part in item.split(",")]


#: One ``network_allowlist`` entry (SPEC §8.4), normalised; errors name ``network_allowlist[i]``.
AllowlistEntry = Annotated[str, AfterValidator(normalize_entry)]
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ENV_TOTAL_MAX_BYTES = 32 * 1024


class _Strict(BaseModel):
    # Strict types: JSON ``true`` is not a number and ``"5"`` is not an int; a caller's typo
    # must fail loudly (VALIDATION_ERROR naming the field), never coerce.
    model_config = ConfigDict(extra="forbid", strict=True)


class CreateBunkerRequest(_Strict):
    """Body of ``POST /bunkers`` (SPEC §2.2). Resource fields left ``None`` take defaults."""

    image: str | None = Field(default=None, min_length=1, max_length=63)
    snapshot_id: str | None = None
    name: str | None = Field(default=None, min_length=1, max_length=128)
    lifecycle_mode: LifecycleMode = "ephemeral"
    network_profile: NetworkProfile = "isolated"
    network_allowlist: list[AllowlistEntry] | None = Field(
        default=None, min_length=1, max_length=256
    )
    cpu_millicores: int | None = Field(default=None, ge=100)
    memory_mb: int | None = Field(default=None, ge=128)
    disk_mb: int | None = Field(default=None, ge=64)
    gpu_count: int = Field(default=0, ge=0)
    gpu_type: str | None = None
    bandwidth_mbit: int | None = Field(default=None, ge=1, le=10000)
    max_lifetime_s: int | None = Field(default=None, gt=0)
    idle_timeout_s: int | None = Field(default=None, gt=0)
    session_type: SessionType = "standalone"
    session_ref: str | None = Field(default=None, min_length=1, max_length=255)
    label_set: dict[str, str] = Field(default_factory=dict, max_length=64)
    env_vars: dict[str, str] = Field(default_factory=dict, max_length=128)
    interfaces: Interfaces | None = None
    isolation: Literal["microvm", "container"] | None = None

    @field_validator("network_allowlist")
    @classmethod
    def _dedupe_allowlist(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else dedupe(value)

    @field_validator("label_set")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key, val in value.items():
            if not 1 <= len(key) <= 63:
                raise ValueError(f"label key {key!r} must be 1-63 characters")
            if len(val) > 255:
                raise ValueError(f"label {key!r} value must be at most 255 characters")
        return value

    @field_validator("env_vars")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        total = 0
        for key, val in value.items():
            if not _ENV_NAME.match(key):
                raise ValueError(f"environment variable name {key!r} is invalid")
            if "\0" in val:
                raise ValueError(f"environment variable {key!r} contains NUL")
            total += len(key.encode()) + len(val.encode())
        if total > ENV_TOTAL_MAX_BYTES:
            raise ValueError("environment variables exceed 32 KiB in total")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> CreateBunkerRequest:
        if self.image is None and self.snapshot_id is None:
            raise ValueError("image is required unless snapshot_id is given")
        if self.network_profile == "allowlisted" and not self.network_allowlist:
            raise ValueError("network_allowlist is required for the allowlisted profile")
        if self.network_profile != "allowlisted" and self.network_allowlist is not None:
            raise ValueError("network_allowlist is only allowed with the allowlisted profile")
        if self.bandwidth_mbit is not None and self.network_profile == "isolated":
            raise ValueError("bandwidth_mbit is not allowed with the isolated profile")
        if self.gpu_type is not None and self.gpu_count < 1:
            raise ValueError("gpu_type needs gpu_count >= 1")
        if self.session_type != "standalone" and self.session_ref is None:
            raise ValueError("session_ref is required unless session_type is standalone")
        return self


class ExecRequest(_Strict):
    """Body of ``POST /bunkers/{id}/exec`` (SPEC §3.2)."""

    command: str | list[str]
    timeout_s: int | None = Field(default=None, ge=1)
    cwd: str | None = Field(default=None, min_length=1, max_length=4096)
    env: dict[str, str] = Field(default_factory=dict)
    stdin: str | None = None
    stdin_b64: str | None = None
    stdin_open: bool = False
    user: ExecUser = "user"
    background: bool = False
    max_output_bytes: int | None = Field(default=None, ge=1)
    encoding: Literal["utf8", "base64"] = "utf8"

    @field_validator("command")
    @classmethod
    def _command(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str):
            if not value or "\0" in value:
                raise ValueError("command must be a non-empty string without NUL")
        elif not value or not value[0] or any("\0" in arg for arg in value):
            raise ValueError("command argv must be non-empty, argv[0] non-empty, no NUL")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key, val in value.items():
            if not _ENV_NAME.match(key) or "\0" in val:
                raise ValueError(f"environment variable {key!r} is invalid")
        return value

    @model_validator(mode="after")
    def _stdin(self) -> ExecRequest:
        if self.stdin is not None and self.stdin_b64 is not None:
            raise ValueError("stdin and stdin_b64 are exclusive")
        if self.stdin_open and not self.background:
            raise ValueError("stdin_open is only allowed with background")
        return self


class MkdirRequest(_Strict):
    """Body of ``POST /bunkers/{id}/files/mkdir``."""

    path: str = Field(min_length=1, max_length=4096)
    parents: bool = False
    mode: str = "0755"


class MoveRequest(_Strict):
    """Body of ``POST /bunkers/{id}/files/move``."""

    src: str = Field(min_length=1, max_length=4096)
    dst: str = Field(min_length=1, max_length=4096)
    overwrite: bool = False


class SignalRequest(_Strict):
    """Body of ``POST /bunkers/{id}/processes/{pid}/signal`` (SPEC §3.6)."""

    signal: str | int
    group: bool = False


class StdinRequest(_Strict):
    """Body of ``POST /bunkers/{id}/processes/{pid}/stdin`` (SPEC §3.6)."""

    data: str | None = None
    data_b64: str | None = None
    eof: bool = False


def as_utc(value: datetime) -> datetime:
    """Return ``value`` as an aware UTC datetime (SQLite hands back naive UTC values)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def iso(value: datetime | None) -> str | None:
    """Format a timestamp as RFC 3339 UTC with a ``Z`` suffix (or ``None``)."""
    if value is None:
        return None
    return as_utc(value).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

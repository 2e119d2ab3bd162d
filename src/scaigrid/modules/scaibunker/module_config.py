"""The scaibunker config keys an operator sets through ``/v1/modules/scaibunker/config``
(SPEC §1.10): names, types and global defaults. Unknown keys are refused."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: SPEC §8.3 default ``registry_hosts``.
DEFAULT_REGISTRY_HOSTS: tuple[str, ...] = (
    "pypi.org",
    "files.pythonhosted.org",
    "registry.npmjs.org",
    "crates.io",
    "static.crates.io",
    "index.crates.io",
    "repo.maven.apache.org",
    "repo1.maven.org",
    "rubygems.org",
    "index.rubygems.org",
    "huggingface.co",
    "cdn-lfs.huggingface.co",
    "cdn-lfs.hf.co",
    "deb.debian.org",
    "security.debian.org",
    "archive.ubuntu.com",
    "security.ubuntu.com",
    "ports.ubuntu.com",
    "dl-cdn.alpinelinux.org",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LifecycleTimers(_Strict):
    """Timers of one lifecycle mode (SPEC §2.5); seconds, ``None`` = no limit."""

    max_lifetime_s: int | None = Field(default=None, ge=1)
    idle_timeout_s: int | None = Field(default=None, ge=1)
    on_idle: Literal["terminate", "pause"] = "terminate"


class LifecycleDefaultsConfig(_Strict):
    """Per lifecycle mode timers."""

    ephemeral: LifecycleTimers = LifecycleTimers(
        max_lifetime_s=3600, idle_timeout_s=600, on_idle="terminate"
    )
    session: LifecycleTimers = LifecycleTimers(
        max_lifetime_s=86400, idle_timeout_s=1800, on_idle="pause"
    )
    persistent: LifecycleTimers = LifecycleTimers(on_idle="pause")


class ExecLimitsConfig(_Strict):
    """Exec defaults and caps (SPEC §3); seconds and bytes."""

    default_timeout_s: int = Field(default=60, ge=1)
    max_timeout_s: int = Field(default=3600, ge=1)
    default_max_output_bytes: int = Field(default=10 * 1024 * 1024, ge=0)
    max_output_bytes_cap: int = Field(default=64 * 1024 * 1024, ge=0)
    ring_buffer_bytes: int = Field(default=1024 * 1024, ge=0)


class ShellConfig(_Strict):
    """Shell reconnect behaviour (SPEC §5)."""

    reconnect_grace_s: int = Field(default=60, ge=0)
    replay_buffer_bytes: int = Field(default=1024 * 1024, ge=0)


class ScaiBunkerConfig(_Strict):
    """Every SPEC §1.10 key with its global default."""

    lifecycle_defaults: LifecycleDefaultsConfig = LifecycleDefaultsConfig()
    exec_limits: ExecLimitsConfig = ExecLimitsConfig()
    shell: ShellConfig = ShellConfig()
    registry_hosts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REGISTRY_HOSTS),
        max_length=256,
    )
    egress_audit: bool = True
    read_audit: bool = False
    block_on_critical: bool = False
    default_quota_profile_id: str | None = Field(default=None, max_length=64)

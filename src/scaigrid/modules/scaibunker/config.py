"""Module defaults of scaibunker (SPEC §1.10, §2.2, §2.5, §3.2).

Per-tenant overrides through the module config routes arrive with the platform issue; until
then these are the effective values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

DEFAULT_CPU_MILLICORES: Final = 1000
DEFAULT_MEMORY_MB: Final = 512
DEFAULT_DISK_MB: Final = 1024


@dataclass(frozen=True)
class LifecycleDefaults:
    """Timers of one lifecycle mode, in seconds (``None`` = no limit)."""

    max_lifetime_s: int | None
    idle_timeout_s: int | None
    on_idle: str


@dataclass(frozen=True)
class ExecLimits:
    """Exec defaults and caps (SPEC §1.10 ``exec_limits``); bytes and seconds."""

    default_timeout_s: int = 60
    max_timeout_s: int = 3600
    default_max_output_bytes: int = 10 * 1024 * 1024
    max_output_bytes_cap: int = 64 * 1024 * 1024
    ring_buffer_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class PlatformCeilings:
    """``PLATFORM_MAX_*``: per-bunker ceilings no profile can grant past (SPEC §9.3)."""

    cpu_millicores: int = 16000
    memory_mb: int = 65536
    disk_mb: int = 102400
    gpu_count: int = 8


@dataclass(frozen=True)
class ModuleConfig:
    """Effective module configuration."""

    lifecycle_defaults: dict[str, LifecycleDefaults] = field(
        default_factory=lambda: {
            "ephemeral": LifecycleDefaults(3600, 600, "terminate"),
            "session": LifecycleDefaults(86400, 1800, "pause"),
            "persistent": LifecycleDefaults(None, None, "pause"),
        }
    )
    exec_limits: ExecLimits = field(default_factory=ExecLimits)
    platform_max: PlatformCeilings = field(default_factory=PlatformCeilings)
    #: Seconds between reaper passes (SPEC §2.5: a bunker leaves ``running``/``paused`` no
    #: later than 10 s after its deadline).
    reaper_interval_s: float = 2.0
    #: Seconds between heartbeat-monitor passes (SPEC §10.6: every 5 s).
    monitor_interval_s: float = 5.0
    #: A worker silent this many seconds is ``stale``: no new bunkers, no fan-out (SPEC §10.5).
    worker_stale_after_s: float = 15.0
    #: A worker silent this many seconds is lost: its bunkers are failed out, which with a
    #: monitor pass every 5 s happens within 30 s of its last heartbeat (SPEC §10.6).
    worker_lost_after_s: float = 20.0
    #: Seconds between re-placement passes for persistent bunkers of lost workers (SPEC §12).
    replace_interval_s: float = 15.0
    #: A persistent bunker not re-placed within this many seconds fails (SPEC §10.6).
    reschedule_give_up_s: float = 600.0
    #: Seconds between usage-record passes (SPEC §1.9).
    usage_interval_s: float = 60.0

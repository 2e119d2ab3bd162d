"""The driver contract: how a worker starts, pauses, resumes and stops one bunker.

A driver knows nothing about exec, files or shells: everything a user does inside a
bunker goes through the guest agent, whatever the driver (ARCHITECTURE.md, Worker).
A driver only turns (rootfs, resources, network attachment) into a running bunker
whose agent is reachable over one reliable byte stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

Isolation = Literal["microvm", "container"]


@dataclass(frozen=True)
class Resources:
    """Resources allocated to one bunker.

    Attributes:
        cpu_millicores: CPU share, 1000 = one vCPU.
        memory_mb: memory limit in MiB (workload and agent together).
        disk_mb: size of the writable layer on top of the image, in MiB.
        pids_max: maximum number of tasks (processes + threads) in the bunker.
    """

    cpu_millicores: int
    memory_mb: int
    disk_mb: int
    pids_max: int = 1024


@dataclass(frozen=True)
class BunkerSpec:
    """Everything a driver needs to start one bunker.

    Attributes:
        bunker_id: ``bnk_`` id; drivers derive host-side names from it.
        rootfs: read-only image root directory (container driver) or base ext4 file (VM drivers).
        resources: limits to enforce.
        env: environment of the agent (and the default environment of every exec).
        hostname: UTS hostname inside the bunker.
        netns_path: ``/var/run/netns/...`` to join, or ``None`` for a private loopback-only
            network namespace (the ``isolated`` profile).
        agent_runtime: host directory with the self-contained agent runtime, mounted
            read-only at ``/.scaibunker`` inside the bunker.
        init_argv: argv of the bunker's PID 1 (the agent), as seen inside the bunker.
        userns_path: a user namespace to join (container driver), the one owning
            ``netns_path`` for a ``transit`` bunker; ``None``: the container driver makes
            the bunker its own (:mod:`scaigrid.worker.net.userns`).
        extra_capabilities: capabilities added to the bunker's root (container driver),
            e.g. ``CAP_NET_ADMIN`` and ``CAP_NET_RAW`` for a ``transit`` bunker.
        populate_upper: blocking callable run with the empty writable-layer (overlay upper)
            directory before the root is assembled, e.g. to unpack a snapshot into it. Only
            drivers with an ``upper_dir(bunker_id)`` method honour it; the supervisor never
            sets it for others.
    """

    bunker_id: str
    rootfs: Path
    resources: Resources
    env: dict[str, str] = field(default_factory=dict)
    hostname: str = "bunker"
    netns_path: str | None = None
    agent_runtime: Path | None = None
    init_argv: tuple[str, ...] = ()
    populate_upper: Callable[[Path], None] | None = None
    userns_path: str | None = None
    extra_capabilities: tuple[str, ...] = ()


@dataclass(frozen=True)
class DriverInfo:
    """What a worker advertises for one driver (SPEC §10.1 ``drivers``)."""

    name: str
    isolation: Isolation
    accel: str | None = None


class BunkerHandle(Protocol):
    """A started bunker, as returned by :meth:`Driver.start`."""

    bunker_id: str

    async def open_agent_stream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open the byte stream to the guest agent.

        Raises:
            ConnectionError: the agent is not reachable.
        """
        ...

    async def wait_exit(self) -> int:
        """Wait until the bunker's init (the agent) exits; return its exit status."""
        ...


class Driver(Protocol):
    """Runs bunkers on one isolation technology."""

    info: DriverInfo

    async def start(self, spec: BunkerSpec) -> BunkerHandle:
        """Create and boot a bunker; return once its agent stream can be opened.

        Raises:
            DriverError: the bunker could not be started; the message says why and
                nothing is left behind.
        """
        ...

    async def pause(self, handle: BunkerHandle) -> None:
        """Freeze every process of the bunker (idempotent)."""
        ...

    async def resume(self, handle: BunkerHandle) -> None:
        """Thaw a paused bunker (idempotent)."""
        ...

    async def stop(self, bunker_id: str) -> None:
        """Kill the bunker and release everything it held on the host (idempotent).

        Works from the id alone, so a restarted worker can clean up bunkers it no longer
        holds handles for.
        """
        ...

    async def list_leftovers(self) -> list[str]:
        """Ids of bunkers with host resources left behind (for reconciliation at start)."""
        ...


class DriverError(Exception):
    """A driver could not do what was asked; the message is safe to show to the tenant."""

"""The ``container`` driver: bunkers as OCI containers run by crun, else runc.

Each bunker is a standard OCI bundle (runtime-spec 1.0.2) under
``data_dir/bunkers/<bunker_id>/``::

    config.json    the OCI config (see :func:`build_oci_config`)
    runtime        name of the OCI runtime that runs it (``crun`` or ``runc``)
    console.log    stdout/stderr of the bunker's PID 1 (the agent; keep it quiet)
    runtime.log    the OCI runtime's own log
    disk.ext4      sparse ext4 of ``disk_mb`` MiB holding the overlay upper layer
    disk/          its loop mount (upper/, work/)
    rootfs/        the merged overlay: the bunker's ``/`` (``root.path``)
    run/           mode 0700, owned by the bunker's root; bind-mounted at ``/.scaibunker-run``;
                   holds ``agent.sock`` (made by the agent) and ``cgroups.json`` (made here)

Isolation: a user namespace (bunker ids 0..65535 = host ``id_base``..``id_base+65535``, see
:mod:`scaigrid.worker.rootfs.idshift`) that the worker creates before the runtime runs, owned
by a host uid leased for this bunker alone and bind-mounted at ``state_dir/userns``
(:func:`scaigrid.worker.net.userns.create_userns`: the kernel's per-user counters such as
inotify instances are then charged to that uid, not shared with other bunkers and host
root), and new pid, mount, network, ipc, uts and cgroup namespaces;
Docker's default capability set minus ``MKNOD`` and ``NET_RAW``; ``noNewPrivileges``; the
seccomp profile of :mod:`.seccomp`; runc's/Docker's masked and read-only ``/proc`` and
``/sys`` paths; cgroup limits from :class:`Resources`. The network namespace is new and
loopback-only, or the one at ``spec.netns_path`` (the runtime process is started inside it
and the bunker inherits it: runc 1.1 joins the user namespace first and from inside it could
not enter a namespace of the initial one); a bunker cannot mount sysfs in a namespace
its user namespace does not own, so for a joined namespace the worker mounts a sysfs from
inside it and binds it read-only at ``/sys``. A ``transit`` bunker instead joins a user
namespace the worker made with the same mapping and that owns its network namespace
(``spec.userns_path``, :mod:`scaigrid.worker.net.userns`) and gets ``NET_ADMIN`` and
``NET_RAW`` as well (``spec.extra_capabilities``): it configures its own interfaces. crun
1.8 and runc 1.1 both join a user namespace by path (the mappings stay in the spec; runc
wants them).

**Runtime choice.** The constructor probes crun, then runc, by running a throwaway
container through the very same config builder (user namespace, cgroups, seccomp): the first
runtime that runs it is used (``ContainerDriver.runtime``, logged as
``container_driver.ready``). On hybrid cgroup v1 hosts whose empty unified hierarchy still
lists a controller (``hugetlb`` on our CI machines), crun 1.8 refuses every container with
"cgroups in hybrid mode not supported, drop all controllers from cgroupv2"; the driver then
falls back to runc. :func:`enable_crun_on_hybrid_cgroups` (root, reversible with
:func:`disable_crun_on_hybrid_cgroups`; CLI: ``python -m scaigrid.worker.drivers.container
fix-crun``) mounts each such controller as its own v1 hierarchy so crun works.

**``run``, not ``create`` + ``start``.** The worker starts ``<runtime> run`` in the
foreground, in its own session, with stdio on files. The runtime process stays the parent
of the bunker's PID 1 for its whole life, so :meth:`ContainerHandle.wait_exit` is a plain
``wait()`` on our own child with the exact exit status, with no subreaper and no polling;
the runtime reaps PID 1, and PID 1 (the agent) reaps everything else in the bunker's pid
namespace. With
``create`` + ``start`` PID 1 would be re-parented to the host's init (or to the worker as a
subreaper, which would then have to reap every orphan of every tool it runs). If the worker
dies, nothing of the bunker depends on it: the runtime process keeps running (own session,
no pipes to the worker), is re-parented to the host's init which reaps it when the bunker
ends, and the bunker is found again from its state dir, the runtime's state root
(``data_dir/runtime/<runtime>``) and its cgroups (:meth:`ContainerDriver.list_leftovers`),
then removed from its id alone (:meth:`ContainerDriver.stop`).

**cgroups.** The worker creates the bunker's cgroups itself under
``<cgroup_parent>/<bunker_id>`` (v1: in the memory, pids, cpu, cpuacct and freezer
hierarchies; v2: one directory), writes the limits (memory = memory+swap =
``memory_mb`` MiB: no swap; CPU quota = ``cpu_millicores`` * 100 µs per 100 ms period;
``pids.max`` = ``pids_max``), delegates the memory, pids, cpu and cpuacct directories to the
bunker's root (owner of the directory, ``cgroup.procs`` and ``tasks``; never of the limit
files, so the bunker cannot raise its own limits) and bind-mounts them read-write at
``/sys/fs/cgroup/<controller>``. The agent (PID 1) stays in the bunker's top cgroup and
moves the processes it starts into a ``workload`` child with slightly lower memory and pids
limits, so a workload that eats all its memory or pids is OOM-killed or refused inside
``workload`` while the agent keeps its headroom. PID 1 also gets ``oom_score_adj`` -1000
where the worker holds CAP_SYS_RESOURCE (runtimes set it from inside the user namespace,
so they are started under ``choom -n -1000``, which makes -1000 the inherited floor); where
it does not, the agent raises its children instead. ``/.scaibunker-run/cgroups.json`` tells
the agent exactly what to do (:func:`cgroups_manifest`).

**Permissions.** Runtimes set up mounts as the bunker's root (host uid ``id_base``), so
every directory on the way to the bunker's state and to the agent runtime must be
traversable by it: ``data_dir`` gets group ``id_base`` with ``g+x``, the driver's own
directories are ``0710 root:id_base``, and the constructor refuses a ``data_dir`` behind an
ancestor it could not enter.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import resource
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from scaigrid.ids import is_id
from scaigrid.worker.drivers.base import (
    BunkerHandle,
    BunkerSpec,
    DriverError,
    DriverInfo,
    Resources,
)
from scaigrid.worker.drivers.seccomp import default_profile
from scaigrid.worker.net.userns import (
    check_owner_range,
    create_userns,
    leases_under,
    remove_userns_at,
)
from scaigrid.worker.rootfs.commands import CommandError, run_command
from scaigrid.worker.rootfs.idshift import DEFAULT_ID_BASE, ID_RANGE_SIZE, check_range_free
from scaigrid.worker.rootfs.mounts import remove_tree
from scaigrid.worker.rootfs.overlay import (
    OverlayLayout,
    mount_overlay_root,
    unmount_overlay_root,
)

log = structlog.get_logger()

#: OCI runtimes in order of preference.
RUNTIMES: tuple[str, ...] = ("crun", "runc")
#: Where the agent runtime is mounted read-only inside a bunker.
AGENT_RUNTIME_MOUNT = "/.scaibunker"
#: Where the bunker's run dir (agent socket, cgroups.json) is mounted inside a bunker.
RUN_DIR_MOUNT = "/.scaibunker-run"
#: Name of the agent's unix socket in the run dir.
AGENT_SOCKET_NAME = "agent.sock"
#: Name of the bind mount of the bunker's user namespace in its state dir.
USERNS_NAME = "userns"
#: Name of the cgroup manifest in the run dir (:func:`cgroups_manifest`).
CGROUPS_MANIFEST_NAME = "cgroups.json"
#: CFS period used for the CPU quota, in microseconds.
CPU_PERIOD_US = 100_000
#: Capabilities of a root process inside a bunker (Docker's default set without MKNOD and
#: NET_RAW); all are confined to the bunker's user namespace.
DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_AUDIT_WRITE",
    "CAP_SETFCAP",
)
#: Size of the tmpfs behind ``/.scaibunker-run`` (agent socket and cgroups.json), bytes.
RUN_DIR_BYTES = 1 << 20

#: Docker's masked paths (bind-mounted over with /dev/null or an empty read-only tmpfs).
MASKED_PATHS: tuple[str, ...] = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
#: Docker's read-only paths.
READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Soft and hard RLIMIT_NOFILE of PID 1 (inherited by everything in the bunker), capped by the
#: worker's own hard limit. Set on the runtime process (``prlimit``, see
#: :meth:`ContainerDriver._launch_argv`), not in the OCI config: runc 1.1 applies config
#: rlimits with prlimit(2) from outside the bunker's user namespace, which needs
#: CAP_SYS_RESOURCE over it, and root no longer owns that namespace
#: (:mod:`scaigrid.worker.net.userns`), so a worker without CAP_SYS_RESOURCE would fail.
NOFILE_LIMIT = 65536

#: ``oom_score_adj`` of the bunker's PID 1 (the agent) where the host allows it.
AGENT_OOM_SCORE_ADJ = -1000
#: What the agent gives its children when it could not get :data:`AGENT_OOM_SCORE_ADJ`.
WORKLOAD_OOM_SCORE_ADJ_UNPROTECTED = 500
#: v1 controllers the worker creates for each bunker.
V1_CONTROLLERS: tuple[str, ...] = ("memory", "pids", "cpu", "cpuacct", "freezer")
#: v1 controllers delegated to (and mounted read-write in) the bunker.
V1_DELEGATED: tuple[str, ...] = ("memory", "pids", "cpu", "cpuacct")
#: v2 controllers enabled for bunkers.
V2_CONTROLLERS: tuple[str, ...] = ("memory", "pids", "cpu")

_HYBRID_ERROR = "hybrid mode not supported"
_SUN_PATH_MAX = 107
_DEVICE_RULES: tuple[dict[str, Any], ...] = (
    {"allow": False, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 7, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 8, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 9, "access": "rwm"},
    {"allow": True, "type": "c", "major": 5, "minor": 0, "access": "rwm"},
    {"allow": True, "type": "c", "major": 5, "minor": 2, "access": "rwm"},
    {"allow": True, "type": "c", "major": 136, "access": "rwm"},
)


# --------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class WorkloadLimits:
    """Limits the agent should put on its ``workload`` child cgroup.

    The difference to the bunker's limits is the agent's headroom: it keeps answering while
    the workload sits at its limits.

    Attributes:
        memory_bytes: memory (and memory+swap) limit of ``workload``.
        pids_max: task limit of ``workload``.
    """

    memory_bytes: int
    pids_max: int

    @classmethod
    def for_resources(cls, resources: Resources) -> WorkloadLimits:
        """Split a bunker's limits between the agent's headroom and the workload.

        The agent keeps min(max(memory/8, 32 MiB), 128 MiB, memory/2) of memory and
        min(max(pids/8, 16), 64, pids/2) tasks; the workload gets the rest.
        """
        memory = resources.memory_mb << 20
        memory_reserve = min(max(memory // 8, 32 << 20), 128 << 20, memory // 2)
        pids_reserve = min(max(resources.pids_max // 8, 16), 64, resources.pids_max // 2)
        return cls(memory_bytes=memory - memory_reserve, pids_max=resources.pids_max - pids_reserve)


def cpu_quota_us(cpu_millicores: int) -> int:
    """CFS quota per :data:`CPU_PERIOD_US` for ``cpu_millicores`` (1000 = one CPU)."""
    return max(1000, cpu_millicores * CPU_PERIOD_US // 1000)


# --------------------------------------------------------------------------- cgroups


def _write(path: Path, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _cgroup_filesystems() -> tuple[dict[str, Path], list[Path]]:
    """Read the mount table for cgroup filesystems.

    Returns:
        ``(v1, v2)``: every v1 hierarchy's controllers (and ``name=`` names) mapped to its
        mount point, and the cgroup2 mount points (on hybrid hosts, ``/sys/fs/cgroup/unified``,
        where runtimes create a directory for each container too).
    """
    try:
        with open("/proc/cgroups") as fh:
            known = {line.split()[0] for line in fh if line.strip() and not line.startswith("#")}
    except FileNotFoundError:
        known = set()
    v1: dict[str, Path] = {}
    v2: list[Path] = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fstype, _source, options = [*right.split(), "", "", ""][:3]
            mount_point = Path(left.split()[4])
            if fstype == "cgroup2":
                v2.append(mount_point)
            elif fstype == "cgroup":
                for option in options.split(","):
                    if option in known or option.startswith("name="):
                        v1.setdefault(option, mount_point)
    return v1, v2


class BunkerCgroups:
    """Host-side cgroups of bunkers, all under one parent, on cgroup v1 or v2.

    Args:
        parent: cgroup path component under each hierarchy root (``scaibunker``).
        root: cgroup filesystem root.
    """

    def __init__(self, parent: str, root: Path = Path("/sys/fs/cgroup")) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*", parent):
            raise DriverError(f"invalid cgroup parent {parent!r}")
        self.parent = parent
        self.root = root
        self.version = 2 if (root / "cgroup.controllers").exists() else 1
        self.hierarchies: dict[str, Path] = (
            {"unified": root} if self.version == 2 else _cgroup_filesystems()[0]
        )
        if self.version == 1:
            missing = [c for c in V1_CONTROLLERS if c not in self.hierarchies]
            if missing:
                raise DriverError(f"cgroup v1 controllers not mounted: {', '.join(missing)}")
            memory = self.hierarchies["memory"]
            self.memsw = (memory / "memory.memsw.limit_in_bytes").exists()
        else:
            available = set((root / "cgroup.controllers").read_text().split())
            missing = [c for c in V2_CONTROLLERS if c not in available]
            if missing:
                raise DriverError(f"cgroup v2 controllers not available: {', '.join(missing)}")
            # The root cgroup has no memory.swap.max; any child with memory enabled shows
            # whether swap is accounted.
            self.memsw = any(root.glob("*/memory.swap.max"))

    def cgroups_path(self, bunker_id: str) -> str:
        """The OCI ``linux.cgroupsPath`` of a bunker (absolute, hierarchy-relative)."""
        return f"/{self.parent}/{bunker_id}"

    def _mount_points(self) -> list[Path]:
        """Every cgroup hierarchy a bunker may have a directory in.

        Re-read on v1: a hierarchy mounted after start-up (the crun fix) holds bunkers too,
        and runtimes also create directories in a hybrid host's cgroup2 mount.
        """
        if self.version == 2:
            return [self.root]
        v1, v2 = _cgroup_filesystems()
        return sorted({*v1.values(), *v2})

    def delegated_dirs(self, bunker_id: str) -> dict[str, Path]:
        """Controller (v1) or ``unified`` (v2) → the bunker's host cgroup directory."""
        if self.version == 2:
            return {"unified": self.root / self.parent / bunker_id}
        return {c: self.hierarchies[c] / self.parent / bunker_id for c in V1_DELEGATED}

    def ids(self) -> set[str]:
        """Names of the directories under the parent in every hierarchy."""
        found: set[str] = set()
        for mount_point in self._mount_points():
            parent = mount_point / self.parent
            if parent.is_dir():
                found.update(entry.name for entry in parent.iterdir() if entry.is_dir())
        return found

    def create(self, bunker_id: str, resources: Resources, owner: int) -> None:
        """Create the bunker's cgroups, write its limits and delegate them to ``owner``.

        Raises:
            DriverError: a cgroup file could not be written.
        """
        try:
            if self.version == 2:
                self._create_v2(bunker_id, resources, owner)
            else:
                self._create_v1(bunker_id, resources, owner)
        except OSError as exc:
            raise DriverError(f"cannot set up cgroups: {exc}") from exc

    def _create_v1(self, bunker_id: str, resources: Resources, owner: int) -> None:
        dirs = {c: self.hierarchies[c] / self.parent / bunker_id for c in V1_CONTROLLERS}
        for path in set(dirs.values()):
            path.mkdir(parents=True, exist_ok=True)
        memory = str(resources.memory_mb << 20)
        _write(dirs["memory"] / "memory.limit_in_bytes", memory)
        if self.memsw:
            _write(dirs["memory"] / "memory.memsw.limit_in_bytes", memory)
        _write(dirs["pids"] / "pids.max", str(resources.pids_max))
        _write(dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(dirs["cpu"] / "cpu.cfs_quota_us", str(cpu_quota_us(resources.cpu_millicores)))
        for controller in V1_DELEGATED:
            path = dirs[controller]
            for target in (path, path / "cgroup.procs", path / "tasks"):
                os.chown(target, owner, owner)

    def _create_v2(self, bunker_id: str, resources: Resources, owner: int) -> None:
        enable = " ".join(f"+{c}" for c in V2_CONTROLLERS)
        current = self.root
        for part in self.parent.split("/"):
            _write(current / "cgroup.subtree_control", enable)
            current = current / part
            current.mkdir(exist_ok=True)
        _write(current / "cgroup.subtree_control", enable)
        path = current / bunker_id
        path.mkdir(exist_ok=True)
        memory = str(resources.memory_mb << 20)
        _write(path / "memory.max", memory)
        if (path / "memory.swap.max").exists():
            _write(path / "memory.swap.max", "0")
        _write(path / "pids.max", str(resources.pids_max))
        _write(path / "cpu.max", f"{cpu_quota_us(resources.cpu_millicores)} {CPU_PERIOD_US}")
        delegate = Path("/sys/kernel/cgroup/delegate")
        names = (
            delegate.read_text().split()
            if delegate.exists()
            else ["cgroup.procs", "cgroup.threads", "cgroup.subtree_control"]
        )
        os.chown(path, owner, owner)
        for name in names:
            if (path / name).exists():
                os.chown(path / name, owner, owner)

    def prune(self) -> None:
        """Remove the parent directory from every hierarchy where it is empty."""
        for mount_point in self._mount_points():
            with contextlib.suppress(OSError):
                (mount_point / self.parent).rmdir()

    def thaw(self, bunker_id: str) -> None:
        """Thaw the bunker's cgroups so pending SIGKILLs land (idempotent, best effort)."""
        if self.version == 2:
            targets = [(self.root / self.parent / bunker_id / "cgroup.freeze", "0")]
        else:
            freezer = self.hierarchies["freezer"] / self.parent / bunker_id
            targets = [(freezer / "freezer.state", "THAWED")]
        for path, value in targets:
            with contextlib.suppress(OSError):
                _write(path, value)

    def _kill_and_rmdir(self, top: Path) -> bool:
        """Kill every task below ``top`` and remove its directories; True when all are gone."""
        if not top.is_dir():
            return True
        done = True
        for current, _dirs, _files in os.walk(top, topdown=False):
            with contextlib.suppress(OSError):
                for pid in Path(current, "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            try:
                os.rmdir(current)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                done = False
        return done

    def sweep(self, bunker_id: str) -> list[Path]:
        """One pass of removal: thaw, kill every task, rmdir what is empty.

        Covers every hierarchy, including those the OCI runtime created itself (devices,
        blkio, cpuset, ``name=systemd``…).

        Returns:
            The bunker's cgroup directories still present (tasks still exiting).

        Raises:
            OSError: a directory could not be removed for another reason than ``EBUSY``.
        """
        self.thaw(bunker_id)
        tops = [mount_point / self.parent / bunker_id for mount_point in self._mount_points()]
        return [top for top in tops if not self._kill_and_rmdir(top)]

    async def remove(self, bunker_id: str, timeout_s: float = 10.0) -> None:
        """Kill whatever is left in the bunker's cgroups and remove them (idempotent).

        Raises:
            DriverError: a cgroup stayed busy past ``timeout_s`` or could not be removed.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                remaining = self.sweep(bunker_id)
            except OSError as exc:
                raise DriverError(f"cannot remove cgroups of {bunker_id}: {exc}") from exc
            if not remaining:
                return
            if time.monotonic() > deadline:
                raise DriverError(f"cgroups of {bunker_id} stay busy: {remaining[0]}")
            await asyncio.sleep(0.02)


def cgroups_manifest(
    cgroups: BunkerCgroups, resources: Resources, *, agent_protected: bool
) -> dict[str, Any]:
    """The ``/.scaibunker-run/cgroups.json`` document the agent reads (format version 1).

    Shape::

        {"version": 1, "cgroup_version": 1 | 2,
         "controllers": {"memory": "/sys/fs/cgroup/memory", ...} | {"unified": "/sys/fs/cgroup"},
         "bunker": {"memory_bytes", "pids_max", "cpu_quota_us", "cpu_period_us"},
         "workload": {"name": "workload", "memory_bytes", "pids_max", "oom_score_adj",
                      "setup": [{"op": "mkdir", "path"} | {"op": "write", "path", "value"}],
                      "procs": ["<in-bunker path of a cgroup.procs file>", ...]}}

    The agent runs the ``setup`` steps once, in order, at start (``mkdir`` tolerates an
    existing directory; ``write`` writes ``value`` to ``path``; on v2 the first steps move
    the agent itself into an ``agent`` leaf, as v2 forbids processes in a cgroup that
    delegates controllers to children). Then, for every process it starts, it writes that
    process's pid into each ``procs`` file **before** the process drops to the guest user
    (v1 lets a non-global-root writer move only processes of its own uid), and sets its
    ``/proc/<pid>/oom_score_adj`` to ``oom_score_adj``: 0 when the agent itself runs at
    -1000 (``agent_protected``), else 500 so the OOM killer still picks workload first (any
    process may raise the value). Paths are inside the bunker.

    Args:
        cgroups: the host's bunker cgroups.
        resources: the bunker's limits.
        agent_protected: PID 1 runs with ``oom_score_adj`` -1000.
    """
    workload = WorkloadLimits.for_resources(resources)
    setup: list[dict[str, str]] = []
    procs: list[str] = []
    if cgroups.version == 1:
        controllers = {c: f"/sys/fs/cgroup/{c}" for c in V1_DELEGATED}
        for controller, base in controllers.items():
            child = f"{base}/workload"
            setup.append({"op": "mkdir", "path": child})
            if controller == "memory":
                value = str(workload.memory_bytes)
                setup.append(
                    {"op": "write", "path": f"{child}/memory.limit_in_bytes", "value": value}
                )
                if cgroups.memsw:
                    setup.append(
                        {
                            "op": "write",
                            "path": f"{child}/memory.memsw.limit_in_bytes",
                            "value": value,
                        }
                    )
            elif controller == "pids":
                setup.append(
                    {"op": "write", "path": f"{child}/pids.max", "value": str(workload.pids_max)}
                )
            procs.append(f"{child}/cgroup.procs")
    else:
        controllers = {"unified": "/sys/fs/cgroup"}
        enable = " ".join(f"+{c}" for c in V2_CONTROLLERS)
        setup += [
            {"op": "mkdir", "path": "/sys/fs/cgroup/agent"},
            {"op": "write", "path": "/sys/fs/cgroup/agent/cgroup.procs", "value": "0"},
            {"op": "write", "path": "/sys/fs/cgroup/cgroup.subtree_control", "value": enable},
            {"op": "mkdir", "path": "/sys/fs/cgroup/workload"},
            {
                "op": "write",
                "path": "/sys/fs/cgroup/workload/memory.max",
                "value": str(workload.memory_bytes),
            },
            {
                "op": "write",
                "path": "/sys/fs/cgroup/workload/pids.max",
                "value": str(workload.pids_max),
            },
        ]
        if cgroups.memsw:
            setup.append(
                {"op": "write", "path": "/sys/fs/cgroup/workload/memory.swap.max", "value": "0"}
            )
        procs.append("/sys/fs/cgroup/workload/cgroup.procs")
    return {
        "version": 1,
        "cgroup_version": cgroups.version,
        "controllers": controllers,
        "bunker": {
            "memory_bytes": resources.memory_mb << 20,
            "pids_max": resources.pids_max,
            "cpu_quota_us": cpu_quota_us(resources.cpu_millicores),
            "cpu_period_us": CPU_PERIOD_US,
        },
        "workload": {
            "name": "workload",
            "memory_bytes": workload.memory_bytes,
            "pids_max": workload.pids_max,
            "oom_score_adj": 0 if agent_protected else WORKLOAD_OOM_SCORE_ADJ_UNPROTECTED,
            "setup": setup,
            "procs": procs,
        },
    }


# --------------------------------------------------------------------------- OCI config


def _bind(source: Path | str, destination: str, *options: str) -> dict[str, Any]:
    return {
        "destination": destination,
        "type": "bind",
        "source": str(source),
        "options": ["rbind", *options],
    }


def nofile_limit() -> int:
    """RLIMIT_NOFILE (soft = hard) of a bunker's PID 1: :data:`NOFILE_LIMIT`, or the
    worker's own hard limit if lower (raising a hard limit needs CAP_SYS_RESOURCE)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return NOFILE_LIMIT if hard == resource.RLIM_INFINITY else min(NOFILE_LIMIT, hard)


def build_oci_config(
    *,
    root_path: Path,
    argv: Sequence[str],
    env: Mapping[str, str],
    hostname: str,
    id_base: int,
    cgroups_path: str,
    resources: Resources,
    memsw: bool,
    netns_path: str | None,
    oom_score_adj: int | None = None,
    sysfs_source: Path | None = None,
    extra_mounts: Sequence[Mapping[str, Any]] = (),
    userns_path: str | None = None,
    extra_capabilities: Sequence[str] = (),
    inherit_netns: bool = False,
) -> dict[str, Any]:
    """Return an OCI runtime-spec 1.0.2 ``config.json`` document for one bunker.

    Args:
        root_path: the bunker's root directory (real path; runc refuses symlinks).
        argv: PID 1's argv as seen inside.
        env: PID 1's environment (``PATH`` defaults to :data:`DEFAULT_PATH`).
        hostname: UTS hostname.
        id_base: host uid/gid of the bunker's root (65536 ids are mapped).
        cgroups_path: ``linux.cgroupsPath`` (hierarchy-relative, absolute).
        resources: limits written into ``linux.resources``.
        memsw: the host accounts swap (set memory+swap = memory, i.e. no swap).
        netns_path: network namespace to join, ``None`` for a new loopback-only one.
        oom_score_adj: ``process.oomScoreAdj`` of PID 1, or ``None`` to inherit the
            runtime's. Runtimes write it from inside the user namespace, so a value below the
            runtime process's own must already be allowed there (see ``ContainerDriver``).
        sysfs_source: a sysfs the worker mounted for a joined network namespace, bound
            read-only at ``/sys``; ``None`` mounts a fresh sysfs (possible only in a network
            namespace the bunker's user namespace owns).
        extra_mounts: mounts appended after the standard ones (OCI mount objects).
        userns_path: a user namespace to join instead of creating one (the worker makes
            one per bunker, owned by its own uid; a ``transit`` bunker's also owns its
            network namespace: :mod:`scaigrid.worker.net.userns`); it must already map
            0..65535 to ``id_base``. The mappings stay in the document
            (runc 1.1 wants them even when joining; crun ignores them).
        extra_capabilities: capabilities added to :data:`DEFAULT_CAPABILITIES` (bounding,
            effective, permitted), e.g. ``CAP_NET_ADMIN`` for a ``transit`` bunker.
        inherit_netns: leave the network namespace out, so the bunker shares the runtime
            process's (which the caller starts inside ``netns_path``); ``netns_path`` then only
            decides the ``/sys`` mount. For a namespace the joined user namespace does not
            own: runc 1.1 joins the user namespace first, and from inside it may not
            ``setns`` into a namespace of the initial one.

    Spec: https://github.com/opencontainers/runtime-spec/blob/v1.0.2/config.md and
    config-linux.md.
    """
    memory: dict[str, int] = {"limit": resources.memory_mb << 20}
    if memsw:
        memory["swap"] = resources.memory_mb << 20
    network: dict[str, str] = {"type": "network"}
    if netns_path:
        network["path"] = netns_path
    caps = [
        *DEFAULT_CAPABILITIES,
        *(c for c in extra_capabilities if c not in DEFAULT_CAPABILITIES),
    ]
    user: dict[str, str] = {"type": "user"}
    if userns_path:
        user["path"] = userns_path
    namespaces = [
        {"type": "pid"},
        *([] if inherit_netns else [network]),
        {"type": "ipc"},
        {"type": "uts"},
        {"type": "mount"},
        user,
        {"type": "cgroup"},
    ]
    environment = {"PATH": DEFAULT_PATH, **env}
    mapping = [{"containerID": 0, "hostID": id_base, "size": ID_RANGE_SIZE}]
    sysfs: dict[str, Any] = (
        _bind(sysfs_source, "/sys", "ro", "nosuid", "noexec", "nodev")
        if sysfs_source is not None
        else {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        }
    )
    process: dict[str, Any] = {
        "terminal": False,
        "user": {"uid": 0, "gid": 0},
        "args": list(argv),
        "env": [f"{k}={v}" for k, v in environment.items()],
        "cwd": "/",
        "capabilities": {
            "bounding": caps,
            "effective": caps,
            "permitted": caps,
            "inheritable": [],
            "ambient": [],
        },
        "noNewPrivileges": True,
    }
    if oom_score_adj is not None:
        process["oomScoreAdj"] = oom_score_adj
    return {
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": str(root_path), "readonly": False},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": [
                    "nosuid",
                    "noexec",
                    "newinstance",
                    "ptmxmode=0666",
                    "mode=0620",
                    "gid=5",
                ],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
            sysfs,
            {
                "destination": "/sys/fs/cgroup",
                "type": "tmpfs",
                "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "mode=755", "size=64k"],
            },
            *[dict(m) for m in extra_mounts],
        ],
        "linux": {
            "uidMappings": mapping,
            "gidMappings": mapping,
            "namespaces": namespaces,
            "cgroupsPath": cgroups_path,
            "resources": {
                "devices": [dict(rule) for rule in _DEVICE_RULES],
                "memory": memory,
                "cpu": {"quota": cpu_quota_us(resources.cpu_millicores), "period": CPU_PERIOD_US},
                "pids": {"limit": resources.pids_max},
            },
            "seccomp": default_profile(),
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }


def _cgroup_mounts(cgroups: BunkerCgroups, bunker_id: str) -> list[dict[str, Any]]:
    if cgroups.version == 2:
        source = cgroups.delegated_dirs(bunker_id)["unified"]
        return [_bind(source, "/sys/fs/cgroup", "rw", "nosuid", "nodev", "noexec")]
    return [
        _bind(path, f"/sys/fs/cgroup/{controller}", "rw", "nosuid", "nodev", "noexec")
        for controller, path in cgroups.delegated_dirs(bunker_id).items()
    ]


# --------------------------------------------------------------------------- hybrid fix


def hybrid_cgroup_conflicts(root: Path = Path("/sys/fs/cgroup")) -> list[str]:
    """Controllers that make crun refuse a hybrid cgroup host.

    On a hybrid layout (v1 hierarchies plus a cgroup2 at ``root/unified``), crun requires the
    unified hierarchy to hold no controller; these are the ones it holds.
    """
    controllers = root / "unified" / "cgroup.controllers"
    if (root / "cgroup.controllers").exists() or not controllers.exists():
        return []
    return controllers.read_text().split()


#: Where :func:`enable_crun_on_hybrid_cgroups` records what it mounted (tmpfs: a reboot
#: forgets both the mounts and the record).
CRUN_FIX_RECORD = Path("/run/scaibunker/crun-cgroup-fix.json")


def enable_crun_on_hybrid_cgroups(root: Path = Path("/sys/fs/cgroup")) -> list[str]:
    """Mount each controller of the unified hierarchy as its own v1 hierarchy (root only).

    Moves e.g. ``hugetlb`` off the empty cgroup2 mount so crun accepts the hybrid layout
    (HOST-NOTES §2): ``mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb``. The
    controllers mounted are recorded in :data:`CRUN_FIX_RECORD` for
    :func:`disable_crun_on_hybrid_cgroups`. Idempotent.

    Returns:
        The controllers that were mounted now (empty when nothing was needed).

    Raises:
        PermissionError: not running as root.
        subprocess.CalledProcessError: ``mount`` failed.
    """
    if os.geteuid() != 0:
        raise PermissionError("mounting cgroup hierarchies needs root")
    mounted: list[str] = []
    for controller in hybrid_cgroup_conflicts(root):
        target = root / controller
        target.mkdir(exist_ok=True)
        subprocess.run(
            ["mount", "-t", "cgroup", "-o", controller, "cgroup", str(target)],
            check=True,
            capture_output=True,
        )
        mounted.append(controller)
        log.info(
            "container_driver.cgroup_hierarchy_mounted", controller=controller, path=str(target)
        )
    if mounted:
        CRUN_FIX_RECORD.parent.mkdir(parents=True, exist_ok=True)
        previous = _recorded_fix()
        CRUN_FIX_RECORD.write_text(json.dumps(sorted(set(previous) | set(mounted))))
    return mounted


def _recorded_fix() -> list[str]:
    try:
        return list(json.loads(CRUN_FIX_RECORD.read_text()))
    except (OSError, ValueError):
        return []


def disable_crun_on_hybrid_cgroups(
    controllers: Sequence[str] | None = None, root: Path = Path("/sys/fs/cgroup")
) -> None:
    """Undo :func:`enable_crun_on_hybrid_cgroups` (root only, idempotent).

    The controller returns to the unified hierarchy once its v1 hierarchy has no child
    cgroups left (remove bunkers first).

    Args:
        controllers: the controllers to unmount; ``None`` for those recorded in
            :data:`CRUN_FIX_RECORD`.
        root: cgroup filesystem root.

    Raises:
        PermissionError: not running as root.
        subprocess.CalledProcessError: ``umount`` failed.
    """
    if os.geteuid() != 0:
        raise PermissionError("unmounting cgroup hierarchies needs root")
    recorded = _recorded_fix()
    for controller in recorded if controllers is None else controllers:
        target = root / controller
        if os.path.ismount(target):
            subprocess.run(["umount", str(target)], check=True, capture_output=True)
        with contextlib.suppress(OSError):
            target.rmdir()
        log.info("container_driver.cgroup_hierarchy_unmounted", controller=controller)
    left = [c for c in recorded if controllers is not None and c not in controllers]
    if left:
        CRUN_FIX_RECORD.write_text(json.dumps(left))
    else:
        CRUN_FIX_RECORD.unlink(missing_ok=True)


# --------------------------------------------------------------------------- handle


def _connect_path(path: Path) -> tuple[str, int | None]:
    """A connectable name for ``path``: itself, or ``/proc/self/fd/N/name`` when too long."""
    text = str(path)
    if len(text.encode()) <= _SUN_PATH_MAX:
        return text, None
    dirfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{dirfd}/{path.name}", dirfd


class ContainerHandle:
    """A running container bunker (the :class:`BunkerHandle` of this driver).

    Attributes:
        bunker_id: the bunker's id.
        runtime: ``crun`` or ``runc``.
        state_dir: ``data_dir/bunkers/<bunker_id>``.
        agent_socket: host path of the agent's unix socket.
    """

    def __init__(
        self,
        bunker_id: str,
        runtime: str,
        state_dir: Path,
        process: asyncio.subprocess.Process,
        runtime_argv: Sequence[str],
    ) -> None:
        self.bunker_id = bunker_id
        self.runtime = runtime
        self.state_dir = state_dir
        self.agent_socket = state_dir / "run" / AGENT_SOCKET_NAME
        self._process = process
        self._runtime_argv = tuple(runtime_argv)

    @property
    def exited(self) -> bool:
        """True once the runtime process (and so the bunker's PID 1) has exited."""
        return self._process.returncode is not None

    async def open_agent_stream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to the agent's unix socket.

        Returns:
            A fresh ``(reader, writer)`` pair; each call is a new connection.

        Raises:
            ConnectionError: the socket does not exist or nobody accepts on it.
        """
        name, dirfd = _connect_path(self.agent_socket)
        try:
            return await asyncio.open_unix_connection(name)
        except (FileNotFoundError, ConnectionError, NotADirectoryError) as exc:
            raise ConnectionError(f"agent of {self.bunker_id} is not reachable: {exc}") from exc
        finally:
            if dirfd is not None:
                os.close(dirfd)

    async def wait_exit(self) -> int:
        """Wait until the bunker's PID 1 exits.

        Returns:
            Its exit status as the runtime reports it: the exit code, or 128 + signal number
            when it was killed by a signal.
        """
        return await self._process.wait()

    async def init_pid(self) -> int:
        """Host pid of the bunker's PID 1.

        Raises:
            DriverError: the runtime no longer knows the container.
        """
        try:
            result = await run_command(*self._runtime_argv, "state", self.bunker_id, timeout_s=30)
        except CommandError as exc:
            raise DriverError(f"bunker {self.bunker_id} is not running") from exc
        return int(json.loads(result.stdout)["pid"])


# --------------------------------------------------------------------------- driver

_CAP_SYS_RESOURCE = 24


def _has_cap_sys_resource() -> bool:
    """True when this process may lower ``oom_score_adj`` (CAP_SYS_RESOURCE is effective)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_RESOURCE & 1)
    return False


def _traversable_by(path: Path, uid: int, gid: int) -> bool:
    st = path.stat()
    mode = st.st_mode
    if st.st_uid == uid:
        return bool(mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(mode & stat.S_IXGRP)
    return bool(mode & stat.S_IXOTH)


def _untraversable_ancestor(path: Path, uid: int, gid: int) -> Path | None:
    """The first directory on the way to ``path`` the bunker's root could not enter."""
    for ancestor in [*reversed(path.resolve().parents), path.resolve()]:
        if not _traversable_by(ancestor, uid, gid):
            return ancestor
    return None


class ContainerDriver:
    """Runs bunkers as OCI containers (crun, else runc) — see the module docstring.

    Construction is synchronous and probes the runtimes with a throwaway container (about
    10 to 60 ms, and up to ``start_timeout_s`` on a broken host): build the driver once at
    worker start-up, before serving.

    Args:
        data_dir: the worker's data directory; bunker state goes to ``data_dir/bunkers``,
            runtime state to ``data_dir/runtime``. It is made traversable (group ``id_base``,
            ``g+x``) for the bunkers' root, which the runtimes need while setting up mounts.
        id_base: host uid/gid of bunker root (see :mod:`scaigrid.worker.rootfs.idshift`);
            image trees must be shifted with the same base.
        runtimes: candidate OCI runtimes in order of preference; the first that passes the
            probe is used.
        cgroup_parent: cgroup directory (under each hierarchy root) holding the bunkers'
            cgroups; give every worker on a host its own.
        start_timeout_s: how long :meth:`start` waits for the agent to accept.

    Raises:
        DriverError: not root, the id range is in use by ``/etc/subuid``/``subgid``, the
            owner uids of :mod:`scaigrid.worker.net.userns` are not free
            (:func:`~scaigrid.worker.net.userns.check_owner_range`), an ancestor of
            ``data_dir`` is not traversable, or no runtime passed the probe (it runs in a
            user namespace made as for a bunker).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        id_base: int = DEFAULT_ID_BASE,
        runtimes: Sequence[str] = RUNTIMES,
        cgroup_parent: str = "scaibunker",
        start_timeout_s: float = 30.0,
    ) -> None:
        if os.geteuid() != 0:
            raise DriverError("the container driver must run as root")
        try:
            check_range_free(id_base)
            check_owner_range(id_base)
        except ValueError as exc:
            raise DriverError(str(exc)) from exc
        self.info = DriverInfo(name="container", isolation="container", accel=None)
        self.data_dir = data_dir.resolve()
        self.id_base = id_base
        self.start_timeout_s = start_timeout_s
        self.cgroups = BunkerCgroups(cgroup_parent)
        # Runtimes write oomScoreAdj from inside the user namespace, where lowering it needs
        # the value to be allowed already: start them under ``choom -n -1000`` (which also
        # sets the inherited floor). Without CAP_SYS_RESOURCE (some sandboxes) nobody can
        # lower it; the agent then relies on its cgroup headroom and raises its children.
        self.oom_score_adj: int | None = (
            AGENT_OOM_SCORE_ADJ if _has_cap_sys_resource() and shutil.which("choom") else None
        )
        if self.oom_score_adj is None:
            log.warning("container_driver.oom_protection_unavailable", reason="no CAP_SYS_RESOURCE")
        self._handles: dict[str, ContainerHandle] = {}
        # Ids between the start of ``start`` and the start of ``stop``: not leftovers.
        self._active: set[str] = set()
        # Serialises start and stop of one id (a reconciliation may race an explicit stop);
        # a lock lives as long as someone holds or waits for it.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._bunkers_dir = self.data_dir / "bunkers"
        self._prepare_dirs()
        self.runtime = self._choose_runtime(runtimes)
        log.info(
            "container_driver.ready",
            runtime=self.runtime,
            cgroup_version=self.cgroups.version,
            data_dir=str(self.data_dir),
            id_base=id_base,
        )

    # -- setup ---------------------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not _traversable_by(self.data_dir, self.id_base, self.id_base):
            os.chown(self.data_dir, -1, self.id_base)
            mode = stat.S_IMODE(self.data_dir.stat().st_mode) | stat.S_IXGRP
            os.chmod(self.data_dir, mode)
            log.info("container_driver.data_dir_traversable", data_dir=str(self.data_dir))
        blocked = _untraversable_ancestor(self.data_dir, self.id_base, self.id_base)
        if blocked is not None:
            raise DriverError(
                f"{blocked} is not traversable by the bunkers' root (uid {self.id_base}); "
                "runtimes need it to set up mounts: chmod o+x it or move data_dir"
            )
        for path in (self._bunkers_dir, self.data_dir / "runtime"):
            path.mkdir(exist_ok=True)
            os.chown(path, 0, self.id_base)
            os.chmod(path, 0o710)  # noqa: S103 (traverse only, for the bunkers' group)

    def _runtime_argv(self, runtime: str) -> list[str]:
        return [runtime, "--root", str(self.data_dir / "runtime" / runtime)]

    def _launch_argv(self, runtime: str) -> list[str]:
        """argv prefix that starts a container (PID 1 inherits its ``oom_score_adj`` and its
        RLIMIT_NOFILE, :func:`nofile_limit`)."""
        prefix = (
            [] if self.oom_score_adj is None else ["choom", "-n", str(self.oom_score_adj), "--"]
        )
        nofile = nofile_limit()
        return [
            *prefix,
            "prlimit",
            f"--nofile={nofile}:{nofile}",
            "--",
            *self._runtime_argv(runtime),
        ]

    def _choose_runtime(self, runtimes: Sequence[str]) -> str:
        installed = [r for r in RUNTIMES if shutil.which(r)]
        stale = {p.name for p in self.data_dir.glob("probe-*")}
        stale |= {name for name in self.cgroups.ids() if name.startswith("probe-")}
        for probe_id in stale:
            for runtime in installed:
                self._remove_probe(probe_id, self.data_dir / probe_id, runtime)
        reasons: list[str] = []
        for runtime in runtimes:
            if shutil.which(runtime) is None:
                reasons.append(f"{runtime}: not installed")
                continue
            problem = self._probe(runtime)
            if problem is None:
                return runtime
            reasons.append(f"{runtime}: {problem}")
            log.warning("container_driver.runtime_refused", runtime=runtime, reason=problem)
        self.cgroups.prune()
        raise DriverError("no OCI runtime works on this host: " + "; ".join(reasons))

    def _probe(self, runtime: str) -> str | None:
        """Run a throwaway container with ``runtime``; return why it failed, or None."""
        probe_id = f"probe-{secrets.token_hex(4)}"
        probe_dir = self.data_dir / probe_id
        try:
            root = probe_dir / "rootfs"
            root.mkdir(parents=True)
            os.chown(probe_dir, 0, self.id_base)
            os.chmod(probe_dir, 0o710)  # noqa: S103 (traverse only, for the bunkers' group)
            os.chown(root, self.id_base, self.id_base)
            true_bin = os.path.realpath(shutil.which("true") or "/bin/true")
            mounts: list[dict[str, Any]] = []
            for name in ("usr", "bin", "sbin", "lib", "lib64"):
                host = Path("/") / name
                if host.is_symlink():
                    (root / name).symlink_to(os.readlink(host))
                elif host.is_dir():
                    mounts.append(_bind(host, f"/{name}", "ro", "nosuid", "nodev"))
            resources = Resources(cpu_millicores=100, memory_mb=64, disk_mb=8, pids_max=16)
            self.cgroups.create(probe_id, resources, self.id_base)
            create_userns(probe_dir / USERNS_NAME, self.id_base, ID_RANGE_SIZE)
            config = build_oci_config(
                root_path=root,
                argv=[true_bin],
                env={},
                hostname="probe",
                id_base=self.id_base,
                cgroups_path=self.cgroups.cgroups_path(probe_id),
                resources=resources,
                memsw=self.cgroups.memsw,
                netns_path=None,
                oom_score_adj=self.oom_score_adj,
                extra_mounts=mounts,
                userns_path=str(probe_dir / USERNS_NAME),
            )
            (probe_dir / "config.json").write_text(json.dumps(config))
            started = time.monotonic()
            result = subprocess.run(
                [*self._launch_argv(runtime), "run", "--bundle", str(probe_dir), probe_id],
                capture_output=True,
                input=b"",  # an empty pipe, never /dev/null (the runtime chowns its stdio)
                timeout=self.start_timeout_s,
                check=False,
            )
            elapsed_ms = round((time.monotonic() - started) * 1000, 1)
            if result.returncode == 0:
                log.info("container_driver.runtime_probe_ok", runtime=runtime, run_ms=elapsed_ms)
                return None
            detail = (result.stderr or result.stdout).decode(errors="replace").strip()
            if _HYBRID_ERROR in detail:
                return (
                    "refuses hybrid cgroup hosts whose unified hierarchy holds "
                    f"{', '.join(hybrid_cgroup_conflicts()) or 'controllers'} ({detail[-200:]})"
                )
            return f"probe container failed: {detail[-300:] or f'exit {result.returncode}'}"
        except (OSError, subprocess.SubprocessError, DriverError) as exc:
            return f"probe could not run: {exc}"
        finally:
            self._remove_probe(probe_id, probe_dir, runtime)

    def _remove_probe(self, probe_id: str, probe_dir: Path, runtime: str) -> None:
        if (self.data_dir / "runtime" / runtime / probe_id).exists():
            subprocess.run(
                [*self._runtime_argv(runtime), "delete", "--force", probe_id],
                capture_output=True,
                check=False,
                timeout=30,
            )
        deadline = time.monotonic() + 5
        with contextlib.suppress(OSError):
            while self.cgroups.sweep(probe_id) and time.monotonic() < deadline:
                time.sleep(0.01)
        with contextlib.suppress(OSError):
            remove_userns_at(probe_dir / USERNS_NAME)
        with contextlib.suppress(OSError):
            remove_tree(probe_dir)

    # -- bunkers ---------------------------------------------------------------------------

    def upper_dir(self, bunker_id: str) -> Path:
        """The overlay upper dir (writable layer) of a bunker on this worker; read it only
        while the bunker is frozen (snapshots)."""
        return OverlayLayout(self._state_dir(bunker_id)).upper

    def _state_dir(self, bunker_id: str) -> Path:
        if not is_id(bunker_id, "bnk"):
            raise DriverError(f"invalid bunker id {bunker_id!r}")
        return self._bunkers_dir / bunker_id

    async def start(self, spec: BunkerSpec) -> ContainerHandle:
        """Create and boot a bunker; return once its agent accepts on its socket.

        The readiness check is one connection to ``agent.sock`` that is closed without
        sending anything; the agent must tolerate it.

        Args:
            spec: ``rootfs`` is an image tree shifted to ``id_base``; ``init_argv`` must not
                be empty; ``agent_runtime`` (optional) is mounted read-only at
                ``/.scaibunker``; ``netns_path`` (optional) is joined instead of a new
                loopback-only network namespace.

        Returns:
            The bunker's handle.

        Raises:
            DriverError: bad spec, the bunker already exists, a host step failed, PID 1
                exited early, or the agent did not accept within ``start_timeout_s``. Nothing
                is left behind.
        """
        state_dir = self._state_dir(spec.bunker_id)
        if not spec.init_argv:
            raise DriverError("init_argv is empty")
        async with self._lock(spec.bunker_id):
            return await self._start_locked(spec, state_dir)

    def _lock(self, bunker_id: str) -> asyncio.Lock:
        lock = self._locks.get(bunker_id)
        if lock is None:
            lock = self._locks[bunker_id] = asyncio.Lock()
        return lock

    async def _start_locked(self, spec: BunkerSpec, state_dir: Path) -> ContainerHandle:
        exists = DriverError(f"bunker {spec.bunker_id} already exists on this worker")
        if spec.bunker_id in self._active:
            raise exists
        try:
            # Claiming the state dir first: a failure after this point cleans up by id,
            # which must never hit a bunker this call did not create.
            await asyncio.to_thread(state_dir.mkdir, 0o710)
        except FileExistsError:
            raise exists from None
        self._active.add(spec.bunker_id)
        started = time.monotonic()
        phases: dict[str, float] = {}
        try:
            handle = await self._start(spec, state_dir, phases)
        except BaseException as exc:
            await asyncio.shield(self._cleanup_failed_start(spec.bunker_id))
            if isinstance(exc, DriverError | asyncio.CancelledError):
                raise
            if isinstance(exc, Exception):
                raise DriverError(f"bunker {spec.bunker_id} could not start: {exc}") from exc
            raise
        log.info(
            "container_driver.started",
            bunker_id=spec.bunker_id,
            runtime=self.runtime,
            start_ms=round((time.monotonic() - started) * 1000, 1),
            **phases,
        )
        return handle

    async def _cleanup_failed_start(self, bunker_id: str) -> None:
        try:
            await self._stop_locked(bunker_id)
        except DriverError as exc:
            log.error("container_driver.cleanup_failed", bunker_id=bunker_id, error=str(exc))

    def _check_spec_paths(self, spec: BunkerSpec) -> None:
        root_st = os.stat(spec.rootfs)
        mapped = range(self.id_base, self.id_base + ID_RANGE_SIZE)
        if root_st.st_uid not in mapped or root_st.st_gid not in mapped:
            raise DriverError(
                f"image tree {spec.rootfs} is not shifted to id base {self.id_base} "
                f"(its root is owned by {root_st.st_uid}:{root_st.st_gid})"
            )
        if spec.agent_runtime is not None:
            blocked = _untraversable_ancestor(spec.agent_runtime, self.id_base, self.id_base)
            if blocked is not None:
                raise DriverError(
                    f"agent runtime path {blocked} is not traversable by the bunkers' root"
                )

    def _prepare_state(self, spec: BunkerSpec, state_dir: Path) -> None:
        """Blocking: state dir, run dir, cgroups, cgroups.json, and the bunker's own user
        namespace unless ``spec.userns_path`` names one."""
        self._check_spec_paths(spec)
        os.chown(state_dir, 0, self.id_base)
        (state_dir / "runtime").write_text(self.runtime)
        run_dir = state_dir / "run"
        run_dir.mkdir(mode=0o700)
        # The bunker's root can write here (the agent's socket lives here), so it is a tiny
        # tmpfs of its own: a bind of a host directory would let it fill the host's disk
        # past disk_mb. Unmounted with the rest of the state dir.
        subprocess.run(
            [
                "mount",
                "-t",
                "tmpfs",
                "-o",
                f"size={RUN_DIR_BYTES},nr_inodes=64,mode=0700,uid={self.id_base},"
                f"gid={self.id_base},nosuid,nodev,noexec",
                "scaibunker-run",
                str(run_dir),
            ],
            check=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=30,
        )
        self.cgroups.create(spec.bunker_id, spec.resources, self.id_base)
        manifest_path = run_dir / CGROUPS_MANIFEST_NAME
        manifest = cgroups_manifest(
            self.cgroups, spec.resources, agent_protected=self.oom_score_adj is not None
        )
        manifest_path.write_text(json.dumps(manifest))
        os.chmod(manifest_path, 0o444)
        if spec.userns_path is None:
            create_userns(state_dir / USERNS_NAME, self.id_base, ID_RANGE_SIZE)

    async def _mount_netns_sysfs(self, netns_path: str, state_dir: Path) -> Path:
        """Mount a sysfs showing ``netns_path``'s devices, for a bunker that joins it.

        A bunker cannot mount sysfs itself in a network namespace its user namespace does
        not own (EPERM), so the worker mounts one from inside that namespace and the bunker
        gets a read-only bind of it. It is unmounted with the rest of the state dir.
        """
        if not await asyncio.to_thread(os.path.exists, netns_path):
            raise DriverError(f"network namespace {netns_path} does not exist")
        target = state_dir / "sysfs"
        await asyncio.to_thread(target.mkdir, 0o755)
        await run_command(
            "nsenter",
            f"--net={netns_path}",
            "--",
            "mount",
            "-t",
            "sysfs",
            "-o",
            "ro,nosuid,nodev,noexec",
            "sysfs",
            str(target),
            timeout_s=30,
        )
        return target

    def _write_bundle(
        self, spec: BunkerSpec, state_dir: Path, root_path: Path, sysfs: Path | None
    ) -> int:
        """Blocking: write config.json; return a descriptor of console.log for PID 1."""
        mounts = _cgroup_mounts(self.cgroups, spec.bunker_id)
        if spec.agent_runtime is not None:
            mounts.append(
                _bind(spec.agent_runtime.resolve(), AGENT_RUNTIME_MOUNT, "ro", "nosuid", "nodev")
            )
        mounts.append(_bind(state_dir / "run", RUN_DIR_MOUNT, "rw", "nosuid", "nodev", "noexec"))
        config = build_oci_config(
            root_path=root_path,
            argv=spec.init_argv,
            env=spec.env,
            hostname=spec.hostname,
            id_base=self.id_base,
            cgroups_path=self.cgroups.cgroups_path(spec.bunker_id),
            resources=spec.resources,
            memsw=self.cgroups.memsw,
            netns_path=spec.netns_path,
            oom_score_adj=self.oom_score_adj,
            sysfs_source=sysfs,
            extra_mounts=mounts,
            userns_path=spec.userns_path or str(state_dir / USERNS_NAME),
            extra_capabilities=spec.extra_capabilities,
            inherit_netns=self._inherits_netns(spec),
        )
        fd = os.open(state_dir / "config.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(config, fh, indent=1)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        return os.open(state_dir / "console.log", flags, 0o600)

    @staticmethod
    def _inherits_netns(spec: BunkerSpec) -> bool:
        """Whether the runtime is started inside ``spec.netns_path`` and the bunker inherits
        it (a namespace of the initial user namespace, joined with a user namespace of the
        driver's: see ``inherit_netns`` of :func:`build_oci_config`)."""
        return spec.netns_path is not None and spec.userns_path is None

    async def _start(
        self, spec: BunkerSpec, state_dir: Path, phases: dict[str, float]
    ) -> ContainerHandle:
        """Start the bunker; record how long each phase took in ``phases`` (``*_ms``)."""
        bunker_id = spec.bunker_id
        mark = time.monotonic()

        def lap(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            phases[f"{name}_ms"] = round((now - mark) * 1000, 1)
            mark = now

        await asyncio.to_thread(self._prepare_state, spec, state_dir)
        lap("prepare")
        root_path = await mount_overlay_root(
            spec.rootfs, state_dir, spec.resources.disk_mb, spec.populate_upper
        )
        sysfs = (
            await self._mount_netns_sysfs(spec.netns_path, state_dir) if spec.netns_path else None
        )
        console = await asyncio.to_thread(self._write_bundle, spec, state_dir, root_path, sysfs)
        lap("filesystem")
        argv = self._runtime_argv(self.runtime)
        enter = ["nsenter", f"--net={spec.netns_path}", "--"] if self._inherits_netns(spec) else []
        try:
            process = await asyncio.create_subprocess_exec(
                *enter,
                *self._launch_argv(self.runtime),
                "--log",
                str(state_dir / "runtime.log"),
                "run",
                "--bundle",
                str(state_dir),
                bunker_id,
                # The runtime chowns its stdio to the bunker's root (crun 1.8 does so even
                # for /dev/null, which would hand the host's /dev/null to the bunker's id
                # range): give it an empty pipe instead.
                stdin=asyncio.subprocess.PIPE,
                stdout=console,
                stderr=console,
                start_new_session=True,
                env={"PATH": os.environ.get("PATH", DEFAULT_PATH)},
            )
            if process.stdin is not None:
                process.stdin.close()
        finally:
            os.close(console)
        handle = ContainerHandle(bunker_id, self.runtime, state_dir, process, argv)
        self._handles[bunker_id] = handle
        await self._wait_for_agent(handle, process)
        lap("runtime_and_agent")
        return handle

    async def _wait_for_agent(
        self, handle: ContainerHandle, process: asyncio.subprocess.Process
    ) -> None:
        started = time.monotonic()
        deadline = started + self.start_timeout_s
        while True:
            if process.returncode is not None:
                raise DriverError(
                    f"bunker {handle.bunker_id} exited with status {process.returncode} before "
                    f"its agent listened: {self._failure_detail(handle.state_dir)}"
                )
            try:
                _reader, writer = await handle.open_agent_stream()
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise DriverError(
                        f"the agent of {handle.bunker_id} did not accept within "
                        f"{self.start_timeout_s:g} s"
                    ) from None
                # A failed connect costs microseconds: poll tightly while a normal start
                # would finish, then back off.
                await asyncio.sleep(0.002 if time.monotonic() - started < 1.0 else 0.02)
                continue
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            return

    @staticmethod
    def _failure_detail(state_dir: Path) -> str:
        lines: list[str] = []
        for name in ("runtime.log", "console.log"):
            with contextlib.suppress(OSError):
                lines += (state_dir / name).read_text(errors="replace").strip().splitlines()[-3:]
        return " | ".join(lines)[-600:] or "no output"

    async def _runtime_call(self, handle: ContainerHandle, *args: str) -> None:
        try:
            await run_command(*self._runtime_argv(handle.runtime), *args, timeout_s=30)
        except CommandError as exc:
            raise DriverError(f"{args[0]} of bunker {handle.bunker_id} failed: {exc}") from exc

    async def _status(self, runtime: str, bunker_id: str) -> str | None:
        result = await run_command(
            *self._runtime_argv(runtime), "state", bunker_id, check=False, timeout_s=30
        )
        if not result.ok:
            return None
        return str(json.loads(result.stdout).get("status"))

    async def pause(self, handle: BunkerHandle) -> None:
        """Freeze every process of the bunker with the runtime's ``pause`` (idempotent).

        Raises:
            DriverError: the bunker is not running or the freeze failed.
        """
        container = self._own(handle)
        if await self._status(container.runtime, container.bunker_id) == "paused":
            return
        await self._runtime_call(container, "pause", container.bunker_id)

    async def resume(self, handle: BunkerHandle) -> None:
        """Thaw a paused bunker with the runtime's ``resume`` (idempotent).

        Raises:
            DriverError: the bunker is not running or the thaw failed.
        """
        container = self._own(handle)
        if await self._status(container.runtime, container.bunker_id) != "paused":
            return
        await self._runtime_call(container, "resume", container.bunker_id)

    def _own(self, handle: BunkerHandle) -> ContainerHandle:
        own = self._handles.get(handle.bunker_id)
        if own is None:
            raise DriverError(f"bunker {handle.bunker_id} is not running on this worker")
        return own

    async def stop(self, bunker_id: str) -> None:
        """Kill the bunker and release everything it held on the host (idempotent).

        Works from the id alone (after a worker restart too): kills PID 1 and every process
        in the bunker's cgroups, deletes the container from every runtime's state, unmounts
        the overlay, the scratch disk (freeing its loop device) and the user namespace
        (releasing its owner uid), removes the cgroups and the state directory.

        Raises:
            DriverError: something could not be released (the message says what); calling
                ``stop`` again retries.
        """
        self._state_dir(bunker_id)
        async with self._lock(bunker_id):
            await self._stop_locked(bunker_id)

    async def _stop_locked(self, bunker_id: str) -> None:
        state_dir = self._state_dir(bunker_id)
        handle = self._handles.get(bunker_id)
        # From here on, whatever is not released is a leftover for list_leftovers.
        self._active.discard(bunker_id)
        self.cgroups.thaw(bunker_id)
        for runtime in self._runtimes_holding(bunker_id):
            await run_command(
                *self._runtime_argv(runtime), "kill", bunker_id, "KILL", check=False, timeout_s=30
            )
        if handle is not None:
            await self._reap(handle)
        # ``run`` deletes the container itself once PID 1 is gone; this covers a runtime
        # process that died with a crashed worker's host, or did not get that far.
        for runtime in self._runtimes_holding(bunker_id):
            await run_command(
                *self._runtime_argv(runtime),
                "delete",
                "--force",
                bunker_id,
                check=False,
                timeout_s=30,
            )
        await self.cgroups.remove(bunker_id)
        try:
            await unmount_overlay_root(state_dir)
            await asyncio.to_thread(remove_userns_at, state_dir / USERNS_NAME)
            await asyncio.to_thread(remove_tree, state_dir)
        except (OSError, CommandError) as exc:
            raise DriverError(f"cannot release bunker {bunker_id}: {exc}") from exc
        self._handles.pop(bunker_id, None)
        log.info("container_driver.stopped", bunker_id=bunker_id)

    def _runtimes_holding(self, bunker_id: str) -> list[str]:
        """Runtimes whose state root still has the container (both name it by its id)."""
        return [r for r in RUNTIMES if (self.data_dir / "runtime" / r / bunker_id).exists()]

    async def _reap(self, handle: ContainerHandle) -> None:
        """Wait for the runtime process of ``handle``; kill it if it hangs."""
        process = handle._process
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), 10)
        except TimeoutError:
            log.warning("container_driver.runtime_hung", bunker_id=handle.bunker_id)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def list_leftovers(self) -> list[str]:
        """Ids of bunkers with host resources but no live handle in this driver.

        Looks at bunker state dirs, every runtime's state root, the cgroups under
        ``cgroup_parent`` and the owner-uid leases of user namespaces in state dirs: what a
        previous worker process left behind. Pass each id to :meth:`stop`.
        """
        found: set[str] = set()
        for directory in [self._bunkers_dir, *(self.data_dir / "runtime" / r for r in RUNTIMES)]:
            if directory.is_dir():
                found.update(entry.name for entry in directory.iterdir())
        found |= self.cgroups.ids()
        found |= {Path(h).parent.name for h in leases_under(f"{self._bunkers_dir}/")}
        return sorted(i for i in found if is_id(i, "bnk") and i not in self._active)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scaigrid.worker.drivers.container fix-crun | unfix-crun | status``.

    ``fix-crun`` applies :func:`enable_crun_on_hybrid_cgroups` (for setup scripts, as root);
    ``unfix-crun`` reverts what it recorded;
    ``status`` logs the conflicting controllers. Returns the process exit status.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else "status"
    if command == "fix-crun":
        mounted = enable_crun_on_hybrid_cgroups()
        log.info("container_driver.fix_crun", mounted=mounted)
        return 0
    if command == "unfix-crun":
        disable_crun_on_hybrid_cgroups()
        return 0
    if command == "status":
        log.info("container_driver.hybrid_status", conflicts=hybrid_cgroup_conflicts())
        return 0
    log.error("container_driver.unknown_command", command=command)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

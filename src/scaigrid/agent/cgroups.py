"""The bunker's workload cgroup, as the worker's driver describes it.

The container driver writes ``cgroups.json`` (format version 1, see
``scaigrid.worker.drivers.container.cgroups_manifest``) next to the agent's socket::

    {"version": 1, "cgroup_version": 1 | 2,
     "controllers": {"memory": "/sys/fs/cgroup/memory", ...} | {"unified": "/sys/fs/cgroup"},
     "workload": {"name": "workload", "oom_score_adj": 0 | 500,
                  "setup": [{"op": "mkdir", "path"} | {"op": "write", "path", "value"}],
                  "procs": ["<cgroup.procs path>", ...], ...}, ...}

The agent runs ``setup`` once at start (a ``mkdir`` of an existing directory is fine),
then every exec joins each ``procs`` cgroup while it is still root (cgroup v1 lets a
writer that is not the global root move only processes of its own uid) and gets
``oom_score_adj``. The agent itself stays outside ``workload``, so a workload that uses
up its memory or pids is OOM-killed or refused there while the agent keeps its headroom.
Without a manifest execs stay in the agent's cgroup with ``oom_score_adj`` 0.

Each exec also gets a child cgroup of its own, ``workload/<exec_id>``, in one hierarchy
(v1: ``pids`` when delegated, else the first one; v2: the unified tree, without enabling
controllers in ``workload``, so the limits of ``workload`` still cover it). It is the
exec's membership list that no ``setsid`` or double fork can leave: the timeout kills
everything in it (SPEC §3.5).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

_log = logging.getLogger(__name__)

MANIFEST_NAME = "cgroups.json"
MANIFEST_VERSION = 1


class Workload:
    """Where execs are placed.

    Attributes:
        procs: ``cgroup.procs`` files each exec writes itself into before exec.
        oom_score_adj: the ``oom_score_adj`` of every exec.
        oom_counter: ``(path, key)`` of the workload's OOM-kill counter, if known.
        tracking: index into ``procs`` of the hierarchy where each exec gets its own
            child cgroup, or None (no manifest).
    """

    def __init__(
        self,
        procs: tuple[str, ...] = (),
        oom_score_adj: int = 0,
        oom_counter: tuple[str, str] | None = None,
        tracking: int | None = None,
    ) -> None:
        self.procs = procs
        self.oom_score_adj = oom_score_adj
        self.oom_counter = oom_counter
        self.tracking = tracking if tracking is not None and tracking < len(procs) else None

    def exec_cgroup(self, exec_id: str) -> str | None:
        """The directory of ``exec_id``'s own cgroup (not created here), or None."""
        if self.tracking is None:
            return None
        return f"{os.path.dirname(self.procs[self.tracking])}/{exec_id}"

    def exec_procs(self, exec_cgroup: str | None) -> tuple[str, ...]:
        """The ``cgroup.procs`` files an exec joins: ``procs`` with the tracking
        hierarchy's entry replaced by ``exec_cgroup`` (when it exists)."""
        if exec_cgroup is None or self.tracking is None:
            return self.procs
        procs = list(self.procs)
        procs[self.tracking] = f"{exec_cgroup}/cgroup.procs"
        return tuple(procs)


def load_workload(manifest_path: str) -> Workload:
    """Read the manifest, run its setup steps and describe the workload placement.

    A missing manifest means no placement; an unreadable, unknown-version or failing
    one is logged and also means no placement (the agent must come up regardless).
    """
    try:
        with open(manifest_path) as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        return Workload()
    except (OSError, ValueError) as exc:
        _log.warning("agent.cgroups_manifest_unreadable path=%s error=%s", manifest_path, exc)
        return Workload()
    try:
        return _apply(manifest)
    except (OSError, KeyError, TypeError, ValueError) as exc:
        _log.warning("agent.cgroups_setup_failed path=%s error=%r", manifest_path, exc)
        return Workload()


def _apply(manifest: dict[str, Any]) -> Workload:
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"unsupported manifest version {manifest.get('version')!r}")
    workload = manifest["workload"]
    for step in workload["setup"]:
        if step["op"] == "mkdir":
            os.makedirs(step["path"], exist_ok=True)
        elif step["op"] == "write":
            with open(step["path"], "w") as fh:
                fh.write(str(step["value"]))
        else:
            raise ValueError(f"unknown setup op {step['op']!r}")
    name = str(workload["name"])
    controllers = manifest["controllers"]
    counter: tuple[str, str] | None = None
    if manifest.get("cgroup_version") == 2 and "unified" in controllers:
        counter = (f"{controllers['unified']}/{name}/memory.events", "oom_kill")
    elif "memory" in controllers:
        counter = (f"{controllers['memory']}/{name}/memory.oom_control", "oom_kill")
    procs = tuple(str(p) for p in workload["procs"])
    pids = [i for i, p in enumerate(procs) if p.startswith("/sys/fs/cgroup/pids/")]
    tracking = pids[0] if pids else (0 if procs else None)
    placed = Workload(
        procs=procs,
        oom_score_adj=int(workload["oom_score_adj"]),
        oom_counter=counter,
        tracking=tracking,
    )
    _log.info(
        "agent.cgroups_ready cgroup_version=%s procs=%s oom_score_adj=%d",
        manifest.get("cgroup_version"),
        ",".join(placed.procs),
        placed.oom_score_adj,
    )
    return placed

"""Find and kill everything an exec started (SPEC §3.5: timeouts).

An exec's processes are its own process group and session (the exec leader calls
``setsid``), plus any descendant that left them. Descendants are found by following
parent links in ``/proc``; a process that both left the session and lost its parent
before the scan (a daemon that double-forked) cannot be told apart from other
processes: :func:`kill_cgroup` finds those through the exec's own cgroup.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import NamedTuple

_MAX_ROUNDS = 20
#: How long :func:`kill_cgroup` keeps killing a cgroup that does not empty, seconds.
KILL_DEADLINE_S = 2.0


class ProcInfo(NamedTuple):
    """The fields of ``/proc/<pid>/stat`` used here."""

    state: str
    ppid: int
    pgrp: int
    session: int


def scan() -> dict[int, ProcInfo]:
    """Read every visible process's state, parent, process group and session."""
    procs: dict[int, ProcInfo] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return procs
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                raw = fh.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        fields = raw[raw.rfind(b")") + 2 :].split()
        if len(fields) < 4:
            continue
        procs[int(name)] = ProcInfo(
            fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[3])
        )
    return procs


def members(leader: int, procs: dict[int, ProcInfo], extra: set[int]) -> set[int]:
    """Live processes of the exec led by ``leader``.

    Its group and session, and every descendant of ``leader``, of any of those, or of
    ``extra`` (processes found in earlier rounds).
    """
    spared = {1, os.getpid()}
    found = {
        pid
        for pid, info in procs.items()
        if pid == leader or info.pgrp == leader or info.session == leader
    }
    children: dict[int, list[int]] = {}
    for pid, info in procs.items():
        children.setdefault(info.ppid, []).append(pid)
    stack = [leader, *found, *extra]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return {pid for pid in found if pid not in spared and procs[pid].state != "Z"}


def kill_exec_tree(leader: int) -> int:
    """SIGKILL every process of the exec led by ``leader``; return how many were signalled.

    The tree is first frozen with SIGSTOP, rescanning until a round finds nothing new:
    a stopped process can neither fork nor exit, so parent links stay intact while the
    tree is discovered (killing first would reparent the children of killed processes
    to PID 1 and hide them). Then everything found gets SIGKILL.
    """
    frozen: set[int] = set()
    for _ in range(_MAX_ROUNDS):
        fresh = members(leader, scan(), frozen) - frozen
        if not fresh:
            break
        _signal_all(fresh, signal.SIGSTOP)
        frozen |= fresh
    with contextlib.suppress(OSError):
        os.killpg(leader, signal.SIGKILL)
    _signal_all(frozen, signal.SIGKILL)
    return len(frozen)


def _signal_all(pids: set[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signum)


def cgroup_members(directory: str) -> set[int]:
    """Pids listed in ``directory/cgroup.procs`` (empty when it cannot be read)."""
    try:
        with open(f"{directory}/cgroup.procs") as fh:
            return {int(line) for line in fh if line.strip().isdigit()}
    except OSError:
        return set()


def kill_cgroup(directory: str, deadline_s: float = KILL_DEADLINE_S) -> int:
    """SIGKILL every process in the cgroup ``directory`` until it is empty or
    ``deadline_s`` seconds have passed; return how many were signalled.

    Uses ``cgroup.kill`` where the kernel has it (cgroup v2, Linux ≥ 5.14). Otherwise each
    round freezes the members with SIGSTOP, rereading the list until a pass finds nothing
    new (a stopped process cannot fork, so a fork bomb cannot outrun the scan), then sends
    all of them SIGKILL; rounds repeat while the list is not empty (a process forked
    between the last read and its parent's SIGSTOP).
    """
    spared = {1, os.getpid()}
    try:
        with open(f"{directory}/cgroup.kill", "w") as fh:
            fh.write("1")
        return len(cgroup_members(directory))
    except OSError:
        pass
    deadline = time.monotonic() + deadline_s
    signalled: set[int] = set()
    while True:
        frozen: set[int] = set()
        for _ in range(_MAX_ROUNDS):
            fresh = cgroup_members(directory) - frozen - spared
            if not fresh:
                break
            _signal_all(fresh, signal.SIGSTOP)
            frozen |= fresh
        _signal_all(frozen, signal.SIGKILL)
        signalled |= frozen
        if not frozen or time.monotonic() > deadline:
            return len(signalled)
        time.sleep(0.001)


def signal_cgroup(directory: str, signum: int) -> int:
    """Send ``signum`` to every process in the cgroup ``directory`` (SIGKILL: through
    :func:`kill_cgroup`); return how many processes were signalled."""
    if signum == signal.SIGKILL:
        return kill_cgroup(directory)
    members = cgroup_members(directory) - {1, os.getpid()}
    _signal_all(members, signum)
    return len(members)

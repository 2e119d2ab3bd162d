"""The agent's duties as PID 1 of the bunker.

* Reap every child, including orphans the kernel reparents to PID 1: one SIGCHLD
  handler calls ``waitpid(-1, WNOHANG)`` until nothing is left and hands each exit
  status to whoever watches that pid. asyncio's child watchers are not used (they would
  race with this reaper for the same statuses).
* Keep the agent alive under memory pressure: its own ``oom_score_adj`` goes as low as
  the kernel allows; execs reset theirs to 0, or to what the cgroups manifest says
  (see :mod:`scaigrid.agent.spawn` and :mod:`scaigrid.agent.cgroups`).
* Make sure the guest user's home exists.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable

from scaigrid.agent.identity import HOME, USER

_log = logging.getLogger(__name__)

ExitCallback = Callable[[int], None]


class ChildReaper:
    """Reaps all children on SIGCHLD and dispatches exit statuses by pid."""

    def __init__(self) -> None:
        self._watchers: dict[int, ExitCallback] = {}
        self.orphans_reaped = 0

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start handling SIGCHLD on ``loop`` (and reap anything already dead)."""
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    def watch(self, pid: int, callback: ExitCallback) -> None:
        """Call ``callback(wait_status)`` when ``pid`` exits.

        Register synchronously right after ``fork()`` returns: the SIGCHLD handler runs
        on the event loop, so it cannot run in between.
        """
        self._watchers[pid] = callback

    def reap(self) -> None:
        """Collect every exited child now."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            callback = self._watchers.pop(pid, None)
            if callback is None:
                self.orphans_reaped += 1
                continue
            try:
                callback(status)
            except Exception:
                _log.exception("exit callback failed for pid %d", pid)


def protect_from_oom() -> int | None:
    """Lower the agent's own ``oom_score_adj`` as far as allowed; return the value set.

    -1000 needs CAP_SYS_RESOURCE; without it the value stays as inherited (the worker
    can also set it through the OCI config).
    """
    for value in (-1000, -999, -500):
        try:
            with open("/proc/self/oom_score_adj", "w") as fh:
                fh.write(str(value))
        except OSError:
            continue
        return value
    return None


#: Capabilities the agent needs (bit numbers from linux/capability.h): chown for the
#: home, dac_override/fowner for file operations as root, kill to signal the user's
#: processes, setuid/setgid to run execs and file operations as the user.
REQUIRED_CAPABILITIES = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_FOWNER": 3,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
}


def missing_capabilities() -> list[str]:
    """Required capabilities absent from the agent's effective set (empty when all held,
    or when ``/proc`` cannot tell)."""
    try:
        with open("/proc/self/status") as fh:
            line = next(x for x in fh if x.startswith("CapEff:"))
    except (OSError, StopIteration):
        return []
    effective = int(line.split()[1], 16)
    return [name for name, bit in REQUIRED_CAPABILITIES.items() if not effective >> bit & 1]


def ensure_home() -> None:
    """Create ``/home/user`` (uid 1000, gid 1000, 0755) when missing.

    An existing home keeps its mode; if it is not owned by the guest user it is given to
    it, so the user can write to its own home.
    """
    try:
        st = os.stat(HOME)
    except FileNotFoundError:
        try:
            os.makedirs(HOME, mode=0o755)
            os.chown(HOME, USER.uid, USER.gid)
            os.chmod(HOME, 0o755)  # noqa: S103 - a home is world-readable, as usual
        except OSError as exc:
            _log.warning("cannot create %s: %s", HOME, exc)
        return
    except OSError as exc:
        _log.warning("cannot stat %s: %s", HOME, exc)
        return
    if (st.st_uid, st.st_gid) != (USER.uid, USER.gid) and os.geteuid() == 0:
        try:
            os.chown(HOME, USER.uid, USER.gid)
        except OSError as exc:
            _log.warning("cannot chown %s: %s", HOME, exc)

"""Interactive shell sessions on a PTY (SPEC §5).

A session is one process (the user's login shell, or a given command) in a session of
its own whose controlling terminal is the slave side of a fresh PTY. The agent keeps
the master side and drains it as soon as it is readable into a
:class:`~scaigrid.agent.ringbuffer.RingBuffer` addressed by absolute byte offset, so the
shell never blocks on output, whether or not anybody is attached.

At most one attachment streams a session at a time; a new attach takes over and the
older one ends with status ``taken_over``. A session with no attachment lives on for
its ``grace_s``; when that passes without a reattach its process groups get ``SIGHUP``
(then ``SIGKILL`` for whatever is still in its cgroup after :data:`KILL_AFTER_S`) and the
session is gone. A reattach names the byte offset it wants output from; whatever is
still in the ring buffer from there on is replayed first.

The session *finishes* when its process has exited and the master reached end-of-file
(or :data:`EOF_GRACE_S` after the exit when a background job still holds the terminal,
which is then hung up). An attachment that sees the finish sends the remaining output
and the result; a finished session with nobody attached waits out its grace period so a
reconnect still gets the tail and the exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import struct
import termios
import time
from collections.abc import AsyncIterator
from typing import Any

from scaigrid.agent.cgroups import Workload
from scaigrid.agent.clock import rfc3339
from scaigrid.agent.execs import Notifier
from scaigrid.agent.fdwait import wait_writable
from scaigrid.agent.identity import DEFAULT_PATH, Identity
from scaigrid.agent.init import ChildReaper
from scaigrid.agent.proctree import kill_cgroup
from scaigrid.agent.ringbuffer import RingBuffer
from scaigrid.agent.spawn import spawn
from scaigrid.protocol.agent import AgentConnectionLost, AgentError

_log = logging.getLogger(__name__)

EOF_GRACE_S = 0.2
KILL_AFTER_S = 5.0
_READ_BYTES = 64 * 1024
_READS_PER_WAKEUP = 16
TERM = "xterm-256color"


USER_DATABASE = "/etc/passwd"


def login_shell(identity: Identity, passwd: str = USER_DATABASE) -> str:
    """The login shell of ``identity``'s uid from the guest's ``passwd`` file, else
    ``/bin/sh`` (also when the named shell does not exist)."""
    shell = ""
    try:
        with open(passwd, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 7 and fields[2] == str(identity.uid):
                    shell = fields[6]
                    break
    except OSError:
        shell = ""
    if shell and shell.startswith("/") and os.access(shell, os.X_OK):
        return shell
    return "/bin/sh"


def set_window_size(fd: int, cols: int, rows: int) -> None:
    """``TIOCSWINSZ`` on a PTY fd; the kernel sends ``SIGWINCH`` to its foreground group."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class ShellSpec:
    """A validated shell request.

    Attributes:
        session_id: ``shs_`` id chosen by the controller.
        owner: opaque owner label (the controller's user id); a reattach must match it.
        argv: what to execute.
        identity: acting user.
        cols, rows: initial window size (1-1000).
        grace_s: seconds a detached session is kept.
        buffer_bytes: replay buffer capacity.
        env: extra variables.
    """

    def __init__(
        self,
        *,
        session_id: str,
        owner: str,
        argv: list[str],
        identity: Identity,
        cols: int,
        rows: int,
        grace_s: float,
        buffer_bytes: int,
        env: dict[str, str] | None = None,
    ) -> None:
        self.session_id = session_id
        self.owner = owner
        self.argv = argv
        self.identity = identity
        self.cols = cols
        self.rows = rows
        self.grace_s = grace_s
        self.buffer_bytes = buffer_bytes
        self.env = env or {}


class ShellSession:
    """One PTY session: its process, output buffer, attachment and outcome."""

    def __init__(self, spec: ShellSpec, pid: int, master_fd: int, cgroup: str | None) -> None:
        self.spec = spec
        self.pid = pid
        self.master_fd: int | None = master_fd
        self.cgroup = cgroup
        self.output = RingBuffer(spec.buffer_bytes)
        self.changed = Notifier()
        self.started_at = time.time()
        self.wait_status: int | None = None
        self.exit_code: int | None = None
        self.signal_name: str | None = None
        self.finished = False
        #: Offset up to which output was handed to the latest attachment.
        self.sent_offset = 0
        self.attach_gen = 0
        self.attached = False
        self.grace: asyncio.TimerHandle | None = None
        self.input_lock = asyncio.Lock()

    @property
    def session_id(self) -> str:
        return self.spec.session_id

    def result(self) -> dict[str, Any]:
        """``{status: "exited", exit_code, signal, output_bytes}``; ``exit_code`` is
        ``128 + n`` when the process was killed by signal ``n``."""
        return {
            "status": "exited",
            "exit_code": self.exit_code,
            "signal": self.signal_name,
            "output_bytes": self.output.end,
        }

    def record(self) -> dict[str, Any]:
        """The listing entry of the session."""
        return {
            "session_id": self.session_id,
            "pid": self.pid,
            "user": self.spec.identity.name,
            "attached": self.attached,
            "finished": self.finished,
            "exit_code": self.exit_code,
            "output_bytes": self.output.end,
            "started_at": rfc3339(self.started_at),
        }


class ShellManager:
    """Starts shell sessions and keeps them until they end or their grace runs out.

    Args:
        reaper: the PID 1 reaper that reports exit statuses.
        workload: the cgroups and ``oom_score_adj`` of the bunker's workload.
        base_env: the agent's environment (image env + bunker env vars).
    """

    def __init__(
        self, reaper: ChildReaper, workload: Workload | None, base_env: dict[str, str]
    ) -> None:
        self._reaper = reaper
        self.workload = workload or Workload()
        self._base_env = base_env
        self.sessions: dict[str, ShellSession] = {}

    # -- lifecycle ---------------------------------------------------------------------

    def environment(self, spec: ShellSpec, shell: str) -> dict[str, str]:
        """Agent environment, then the user's identity, ``TERM`` and a UTF-8 locale."""
        env = {"PATH": DEFAULT_PATH}
        env.update(self._base_env)
        identity = spec.identity
        env.update(
            HOME=identity.home,
            USER=identity.name,
            LOGNAME=identity.name,
            SHELL=shell,
            TERM=TERM,
            LANG="C.UTF-8",
        )
        # Fixed sizes in the environment would override the terminal's (busybox reads
        # them first), and a forced locale would override LANG.
        for name in ("COLUMNS", "LINES", "LC_ALL"):
            env.pop(name, None)
        env.update(spec.env)
        return env

    def open(self, spec: ShellSpec) -> ShellSession:
        """Start a session.

        Raises:
            AgentError: ``VALIDATION_ERROR`` for a reused id; ``INTERNAL_ERROR`` (503)
                when no PTY or process can be created.
        """
        if spec.session_id in self.sessions:
            raise AgentError("VALIDATION_ERROR", f"shell session {spec.session_id} exists")
        shell = login_shell(spec.identity)
        argv = spec.argv or [shell]
        cwd = spec.identity.home if os.path.isdir(spec.identity.home) else "/"
        master = slave = -1
        cgroup = None
        try:
            master, slave = os.openpty()
            with contextlib.suppress(OSError):
                # The terminal belongs to its user, as login(1) arranges.
                os.fchown(slave, spec.identity.uid, -1)
                os.fchmod(slave, 0o620)
            set_window_size(master, spec.cols, spec.rows)
            cgroup = self._make_cgroup(spec.session_id)
            pid = spawn(
                argv,
                search_path=False,
                env=self.environment(spec, shell),
                cwd=cwd,
                identity=spec.identity,
                stdin_fd=slave,
                stdout_fd=slave,
                stderr_fd=slave,
                cgroup_procs=self.workload.exec_procs(cgroup),
                oom_score_adj=self.workload.oom_score_adj,
                controlling_tty=True,
            )
        except OSError as exc:
            for fd in (master, slave):
                if fd >= 0:
                    os.close(fd)
            if cgroup is not None:
                with contextlib.suppress(OSError):
                    os.rmdir(cgroup)
            raise AgentError(
                "INTERNAL_ERROR", f"cannot start a shell: {exc.strerror}", status=503
            ) from exc
        os.close(slave)
        os.set_blocking(master, False)
        session = ShellSession(spec, pid, master, cgroup)
        self.sessions[spec.session_id] = session
        self._reaper.watch(pid, lambda status: self._on_exit(session, status))
        asyncio.get_running_loop().add_reader(master, self._drain, session)
        _log.info("agent.shell_opened session=%s pid=%d", spec.session_id, pid)
        return session

    def get(self, session_id: str, owner: str) -> ShellSession:
        """The live session ``session_id`` of ``owner``.

        Raises:
            AgentError: ``SHELL_SESSION_NOT_FOUND`` (also for another owner's session).
        """
        session = self.sessions.get(session_id)
        if session is None or session.spec.owner != owner:
            raise AgentError("SHELL_SESSION_NOT_FOUND", f"no shell session {session_id}")
        return session

    def listing(self) -> list[ShellSession]:
        """Every live session, oldest first."""
        return list(self.sessions.values())

    def resize(self, session: ShellSession, cols: int, rows: int) -> None:
        """Set the window size (a no-op once the session finished)."""
        if session.master_fd is not None:
            try:
                set_window_size(session.master_fd, cols, rows)
            except OSError as exc:
                _log.warning("agent.shell_resize_failed session=%s: %s", session.session_id, exc)

    def send_signal(self, session: ShellSession, signum: int) -> None:
        """Signal the terminal's foreground process group (the shell's group when that
        cannot be read).

        Raises:
            AgentError: ``PROCESS_NOT_RUNNING`` once the shell process has ended.
        """
        if session.wait_status is not None:
            raise AgentError("PROCESS_NOT_RUNNING", f"shell {session.session_id} has ended")
        group = session.pid
        if session.master_fd is not None:
            with contextlib.suppress(OSError):
                group = os.tcgetpgrp(session.master_fd)
        try:
            os.killpg(group, signum)
        except ProcessLookupError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(session.pid, signum)

    def close(self, session: ShellSession) -> None:
        """End a session now: ``SIGHUP`` its groups, hang up the terminal, forget it."""
        self.sessions.pop(session.session_id, None)
        if session.grace is not None:
            session.grace.cancel()
            session.grace = None
        if session.wait_status is None:
            groups = {session.pid}
            if session.master_fd is not None:
                with contextlib.suppress(OSError):
                    groups.add(os.tcgetpgrp(session.master_fd))
            for group in groups:
                with contextlib.suppress(OSError):
                    os.killpg(group, signal.SIGHUP)
                    os.killpg(group, signal.SIGCONT)
        self._close_master(session)
        if session.cgroup is not None:
            asyncio.get_running_loop().call_later(KILL_AFTER_S, self._reap_cgroup, session.cgroup)
        session.finished = True
        session.changed.notify()
        _log.info("agent.shell_closed session=%s", session.session_id)

    async def shutdown(self) -> None:
        """Close every session (agent shutdown)."""
        for session in list(self.sessions.values()):
            self.close(session)

    # -- attachments -------------------------------------------------------------------

    def begin_attach(self, session: ShellSession) -> int:
        """Make a new attachment current (taking over any older one); return its number."""
        if session.grace is not None:
            session.grace.cancel()
            session.grace = None
        session.attach_gen += 1
        session.attached = True
        session.changed.notify()
        return session.attach_gen

    def end_attach(self, session: ShellSession, gen: int, *, delivered: bool) -> None:
        """The attachment ``gen`` ended. If it was current: a finished session whose end
        was ``delivered`` is forgotten; otherwise the grace period starts."""
        if session.attach_gen != gen:
            return
        session.attached = False
        if self.sessions.get(session.session_id) is not session:
            return
        if session.finished and delivered:
            self.sessions.pop(session.session_id, None)
            return
        session.grace = asyncio.get_running_loop().call_later(
            session.spec.grace_s, self._grace_over, session
        )

    async def write_input(self, session: ShellSession, chunks: AsyncIterator[bytes]) -> None:
        """Copy ``chunks`` into the terminal; waits while the terminal's input queue is
        full, drops input once the session has finished."""
        async with session.input_lock:
            try:
                async for chunk in chunks:
                    view = memoryview(chunk)
                    while len(view) > 0:
                        fd = session.master_fd
                        if fd is None:
                            break
                        try:
                            view = view[os.write(fd, view) :]
                        except BlockingIOError:
                            await wait_writable(fd)
                        except OSError:
                            break
            except AgentConnectionLost:
                return

    # -- events ------------------------------------------------------------------------

    def _drain(self, session: ShellSession) -> None:
        fd = session.master_fd
        if fd is None:
            return
        for _ in range(_READS_PER_WAKEUP):
            try:
                data = os.read(fd, _READ_BYTES)
            except BlockingIOError:
                break
            except OSError as exc:
                # EIO: every holder of the slave side closed it.
                if exc.errno != errno.EIO:
                    _log.warning("agent.shell_read_failed session=%s", session.session_id)
                data = b""
            if not data:
                self._close_master(session)
                if session.wait_status is not None:
                    self._finish(session)
                break
            session.output.write(data)
        session.changed.notify()

    def _close_master(self, session: ShellSession) -> None:
        fd = session.master_fd
        if fd is None:
            return
        session.master_fd = None
        asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)

    def _on_exit(self, session: ShellSession, status: int) -> None:
        session.wait_status = status
        if os.WIFSIGNALED(status):
            signum = os.WTERMSIG(status)
            session.exit_code = 128 + signum
            try:
                session.signal_name = signal.Signals(signum).name
            except ValueError:
                session.signal_name = f"SIG{signum}"
        else:
            session.exit_code = os.WEXITSTATUS(status)
        session.changed.notify()
        if session.master_fd is None:
            self._finish(session)
        else:
            asyncio.get_running_loop().call_later(EOF_GRACE_S, self._finish, session)

    def _finish(self, session: ShellSession) -> None:
        if session.finished:
            return
        # Whatever is still readable belongs to the output; then hang up any background
        # job that holds the terminal.
        self._drain(session)
        self._close_master(session)
        session.finished = True
        session.changed.notify()
        if session.cgroup is not None:
            with contextlib.suppress(OSError):
                os.rmdir(session.cgroup)
        _log.info(
            "agent.shell_finished session=%s exit_code=%s", session.session_id, session.exit_code
        )

    def _grace_over(self, session: ShellSession) -> None:
        session.grace = None
        if not session.attached and self.sessions.get(session.session_id) is session:
            _log.info("agent.shell_grace_over session=%s", session.session_id)
            self.close(session)

    def _make_cgroup(self, session_id: str) -> str | None:
        cgroup = self.workload.exec_cgroup(session_id)
        if cgroup is None:
            return None
        try:
            os.mkdir(cgroup)
        except OSError as exc:
            _log.warning("agent.shell_cgroup_failed path=%s error=%s", cgroup, exc.strerror)
            return None
        return cgroup

    def _reap_cgroup(self, cgroup: str) -> None:
        if os.path.isdir(cgroup):
            kill_cgroup(cgroup)
            with contextlib.suppress(OSError):
                os.rmdir(cgroup)

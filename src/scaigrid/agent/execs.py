"""Execs and process records (SPEC §3).

Every exec gets its own session and process group, stdin from ``/dev/null`` or from
the request body, and stdout/stderr pipes that the agent drains as soon as they are
readable into one :class:`~scaigrid.agent.ringbuffer.RingBuffer` each, so the process
never blocks on output however slowly (or whether) anyone reads it. Responses stream
from the buffers by byte offset.

An exec *finishes* when its leader has exited and both pipes reached end-of-file, or
:data:`EOF_GRACE_S` after the exit when a background descendant still holds a pipe
(the pipe keeps being drained; later bytes are visible through the output operation).

Records (:meth:`ExecProcess.record`) live as long as the agent. Output of finished
processes is kept within a total budget; beyond it the oldest buffers are released and
reads report their bytes as dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from scaigrid.agent.cgroups import Workload
from scaigrid.agent.clock import rfc3339
from scaigrid.agent.fdwait import wait_writable
from scaigrid.agent.identity import DEFAULT_PATH, Identity
from scaigrid.agent.init import ChildReaper
from scaigrid.agent.proctree import cgroup_members, kill_cgroup, kill_exec_tree, signal_cgroup
from scaigrid.agent.ringbuffer import RingBuffer
from scaigrid.agent.spawn import spawn
from scaigrid.protocol.agent import (
    CHANNEL_GAP,
    CHANNEL_STDERR,
    CHANNEL_STDOUT,
    MAX_FRAME_BYTES,
    RECORD_HEADER,
    AgentConnectionLost,
    AgentError,
    ServerRequest,
    dumps,
    encode_record,
)

_log = logging.getLogger(__name__)

EOF_GRACE_S = 0.1
_READ_BYTES = 256 * 1024
_READS_PER_WAKEUP = 4
_PIPE_BYTES = 1024 * 1024
_RECORD_PAYLOAD_BYTES = MAX_FRAME_BYTES - RECORD_HEADER.size


class Notifier:
    """Wakes every current waiter on :meth:`notify` (a broadcast, no lost wake-ups as
    long as the condition is checked and :meth:`wait` called without an await between)."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)


class OomCounter:
    """Reads how many processes the bunker's memory cgroup has OOM-killed so far.

    Looks, in order, at cgroup v2 ``memory.events`` (``oom_kill``), cgroup v1
    ``memory.oom_control`` (``oom_kill``, kernel ≥ 4.13) and v1 ``memory.failcnt``
    (limit hits: weaker, but rises whenever the OOM killer could have run), both under
    the agent's own cgroup path and at the mount root (which is the bunker's cgroup when
    the runtime mounts only that, possibly read-only; reading is all that is needed).
    """

    def __init__(self, path: str | None, key: str | None) -> None:
        self.path = path
        self.key = key

    @classmethod
    def for_workload(cls, workload: Workload) -> OomCounter:
        """The workload cgroup's counter when the manifest names a readable one, else
        :meth:`discover`."""
        if workload.oom_counter is not None:
            counter = cls(*workload.oom_counter)
            if counter.read() is not None:
                return counter
        return cls.discover()

    @classmethod
    def discover(cls) -> OomCounter:
        """Find the first usable counter file; a counter without one always reads None."""
        v1_rel = v2_rel = ""
        try:
            with open("/proc/self/cgroup") as fh:
                for line in fh:
                    _, controllers, rel = line.rstrip("\n").split(":", 2)
                    if controllers == "":
                        v2_rel = rel
                    elif "memory" in controllers.split(","):
                        v1_rel = rel
        except (OSError, ValueError):
            pass
        candidates: list[tuple[str, str | None]] = []
        for base, rel in (("/sys/fs/cgroup", v2_rel), ("/sys/fs/cgroup/memory", v1_rel)):
            names = (
                [("memory.events", "oom_kill")]
                if base == "/sys/fs/cgroup"
                else [("memory.oom_control", "oom_kill"), ("memory.failcnt", None)]
            )
            for name, key in names:
                for directory in dict.fromkeys((base + rel.rstrip("/"), base)):
                    candidates.append((f"{directory}/{name}", key))
        for path, key in candidates:
            counter = cls(path, key)
            if counter.read() is not None:
                return counter
        return cls(None, None)

    def read(self) -> int | None:
        """The counter now, or None when unavailable."""
        if self.path is None:
            return None
        try:
            with open(self.path) as fh:
                text = fh.read()
        except OSError:
            return None
        try:
            if self.key is None:
                return int(text.strip())
            for line in text.splitlines():
                name, _, value = line.partition(" ")
                if name == self.key:
                    return int(value)
        except ValueError:
            return None
        return None


class ExecSpec:
    """A validated exec request (SPEC §3.2, as the worker forwards it).

    Attributes:
        exec_id: the ``exe_`` id chosen by the worker (unique per bunker).
        argv: what to execute (``["/bin/sh", "-c", cmd]`` for a string command).
        search_path: look ``argv[0]`` up on PATH (list commands).
        command: the command as requested (for the record).
        cwd: absolute working directory.
        env: variables merged over the agent's environment.
        identity: acting user.
        timeout_s: seconds before the exec's processes are killed, or None.
        stdin_body: stdin is the request body (else ``/dev/null``).
        stdin_open: (background) stdin is a pipe kept open for later writes
            (:meth:`ExecManager.write_stdin`).
        background: answer at once instead of streaming.
        ring_buffer_bytes: capacity of each output buffer.
        paced: (foreground) the reader consumes everything and keeps up (the controller
            building a result): when a buffer holds ``ring_buffer_bytes`` not yet sent the
            agent stops draining the pipe, so the process waits on its write instead of
            output being dropped. Unpaced, a slow reader never blocks the process (gaps).
    """

    def __init__(
        self,
        *,
        exec_id: str,
        argv: list[str],
        search_path: bool,
        command: str | list[str],
        cwd: str,
        env: dict[str, str],
        identity: Identity,
        timeout_s: float | None,
        stdin_body: bool,
        background: bool,
        ring_buffer_bytes: int,
        stdin_open: bool = False,
        paced: bool = False,
    ) -> None:
        self.exec_id = exec_id
        self.argv = argv
        self.search_path = search_path
        self.command = command
        self.cwd = cwd
        self.env = env
        self.identity = identity
        self.timeout_s = timeout_s
        self.stdin_body = stdin_body
        self.stdin_open = stdin_open
        self.background = background
        self.ring_buffer_bytes = ring_buffer_bytes
        self.paced = paced


class ExecProcess:
    """One exec: its process, output buffers and outcome.

    ``status`` is ``running`` until the exec finishes, then ``exited``, ``signaled``,
    ``timed_out`` or ``oom_killed``; ``wait_status`` is set as soon as the leader exits.
    """

    def __init__(
        self,
        spec: ExecSpec,
        pid: int,
        *,
        started_at: float,
        started_mono: float,
        oom_before: int | None,
        stdin_open: bool,
    ) -> None:
        self.spec = spec
        self.pid = pid
        self.started_at = started_at
        self.started_mono = started_mono
        self.oom_before = oom_before
        self.stdin_open = stdin_open
        self.stdout = RingBuffer(spec.ring_buffer_bytes)
        self.stderr = RingBuffer(spec.ring_buffer_bytes)
        self.changed = Notifier()
        self.status = "running"
        self.exit_code: int | None = None
        self.signal_name: str | None = None
        self.ended_at: float | None = None
        self.duration_ms: int | None = None
        self.wait_status: int | None = None
        self.timed_out = False
        #: A signal was sent to the running leader through :meth:`ExecManager.send_signal`.
        self.api_signalled = False
        self.finished = False
        self.open_pipes: set[int] = set()
        self.final_ends = (0, 0)
        self.timer: asyncio.TimerHandle | None = None
        self.cgroup: str | None = None
        self.stdin_fd: int | None = None
        self.stdin_lock = asyncio.Lock()
        #: (paced) bytes of each stream the reader has been sent, and the pipes whose
        #: draining waits for it (fd → stream name).
        self.paced = spec.paced
        self.sent = {"stdout": 0, "stderr": 0}
        self.paused: dict[int, str] = {}
        self.on_sent: Callable[[], None] | None = None

    @property
    def exec_id(self) -> str:
        return self.spec.exec_id

    def buffer(self, stream: str) -> RingBuffer:
        """The ring buffer of ``"stdout"`` or ``"stderr"``."""
        return self.stdout if stream == "stdout" else self.stderr

    def note_sent(self, stream: str, offset: int) -> None:
        """(paced) The reader has been sent ``stream`` up to ``offset``: drain again."""
        if offset > self.sent[stream]:
            self.sent[stream] = offset
            if self.paused and self.on_sent is not None:
                self.on_sent()

    def stop_pacing(self) -> None:
        """The reader is gone: drain freely from now on (a slow reader no longer matters)."""
        if self.paced:
            self.paced = False
            if self.paused and self.on_sent is not None:
                self.on_sent()

    def final_end(self, stream: str) -> int:
        """Bytes of ``stream`` that belong to the exec's result (valid once finished)."""
        return self.final_ends[0] if stream == "stdout" else self.final_ends[1]

    def result(self) -> dict[str, Any]:
        """The end result (SPEC §3.3 without the output), sent as trailer ``x-result``."""
        return {
            "exec_id": self.exec_id,
            "pid": self.pid,
            "status": self.status,
            "exit_code": self.exit_code,
            "signal": self.signal_name,
            "duration_ms": self.duration_ms,
            "started_at": rfc3339(self.started_at),
            "ended_at": rfc3339(self.ended_at) if self.ended_at is not None else None,
            "stdout_bytes": self.final_ends[0] if self.finished else self.stdout.end,
            "stderr_bytes": self.final_ends[1] if self.finished else self.stderr.end,
        }

    def record(self) -> dict[str, Any]:
        """The process record (SPEC §3.6); ``*_bytes`` count everything produced so far."""
        return {
            "exec_id": self.exec_id,
            "pid": self.pid,
            "command": self.spec.command,
            "user": self.spec.identity.name,
            "cwd": self.spec.cwd,
            "background": self.spec.background,
            "status": self.status,
            "exit_code": self.exit_code,
            "signal": self.signal_name,
            "stdin_open": self.stdin_open,
            "started_at": rfc3339(self.started_at),
            "ended_at": rfc3339(self.ended_at) if self.ended_at is not None else None,
            "duration_ms": self.duration_ms,
            "stdout_bytes": self.stdout.end,
            "stderr_bytes": self.stderr.end,
        }


class ExecManager:
    """Starts execs, tracks them until the bunker ends, and kills them on demand.

    Args:
        reaper: the PID 1 reaper that reports exit statuses.
        oom: the bunker's OOM-kill counter.
        retained_output_bytes: budget for output buffers of finished processes.
        base_env: the agent's environment (image env + bunker env vars).
        workload: the cgroups and ``oom_score_adj`` every exec gets.
    """

    def __init__(
        self,
        reaper: ChildReaper,
        oom: OomCounter,
        *,
        retained_output_bytes: int,
        base_env: dict[str, str],
        workload: Workload | None = None,
    ) -> None:
        self._reaper = reaper
        self.oom = oom
        self.workload = workload or Workload()
        self._retained_output_bytes = retained_output_bytes
        self._base_env = base_env
        self.processes: dict[str, ExecProcess] = {}
        self._by_pid: dict[int, ExecProcess] = {}
        self._retained: deque[ExecProcess] = deque()
        self._retained_bytes = 0
        self._stale_cgroups: set[str] = set()

    @property
    def reaper(self) -> ChildReaper:
        """The PID 1 reaper this manager registers its children with."""
        return self._reaper

    def environment(self, spec: ExecSpec) -> dict[str, str]:
        """Defaults, then the agent's environment, the user's identity, the request's."""
        env = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}
        env.update(self._base_env)
        env.update(HOME=spec.identity.home, USER=spec.identity.name, LOGNAME=spec.identity.name)
        env.update(spec.env)
        return env

    def start(self, spec: ExecSpec) -> tuple[ExecProcess, int | None]:
        """Start an exec; return it and the write end of its stdin pipe (``stdin_body``).

        Raises:
            AgentError: ``VALIDATION_ERROR`` for a reused ``exec_id``;
                ``INTERNAL_ERROR`` (503) when no process can be created (fork failed).
        """
        if spec.exec_id in self.processes:
            raise AgentError("VALIDATION_ERROR", f"exec_id {spec.exec_id} is already used")
        loop = asyncio.get_running_loop()
        fds: list[int] = []
        try:
            out_r, out_w = os.pipe()
            fds += [out_r, out_w]
            err_r, err_w = os.pipe()
            fds += [err_r, err_w]
            if spec.stdin_body or spec.stdin_open:
                in_r, in_w = os.pipe()
                fds += [in_r, in_w]
            else:
                in_w = None
                in_r = _open_devnull()
                fds.append(in_r)
            for fd in (out_r, err_r):
                _grow_pipe(fd)
            cgroup = self._make_cgroup(spec.exec_id)
            oom_before = self.oom.read()
            started_at, started_mono = time.time(), time.monotonic()
            pid = spawn(
                spec.argv,
                search_path=spec.search_path,
                env=self.environment(spec),
                cwd=spec.cwd,
                identity=spec.identity,
                stdin_fd=in_r,
                stdout_fd=out_w,
                stderr_fd=err_w,
                cgroup_procs=self.workload.exec_procs(cgroup),
                oom_score_adj=self.workload.oom_score_adj,
            )
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            if cgroup is not None:
                self._remove_cgroup(cgroup)
            if exc.errno == errno.E2BIG:
                # The caller's command and environment, not the bunker: execve(2) limits one
                # argument or variable to 128 KiB and all of them to a quarter of the stack.
                raise AgentError(
                    "VALIDATION_ERROR",
                    "the command's arguments and environment are too long for execve",
                    status=422,
                ) from exc
            raise AgentError(
                "INTERNAL_ERROR", f"cannot start a process: {exc.strerror}", status=503
            ) from exc
        proc = ExecProcess(
            spec,
            pid,
            started_at=started_at,
            started_mono=started_mono,
            oom_before=oom_before,
            stdin_open=in_w is not None,
        )
        proc.cgroup = cgroup
        self._reaper.watch(pid, lambda status: self._on_exit(proc, status))
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        for fd, ring in ((out_r, proc.stdout), (err_r, proc.stderr)):
            os.set_blocking(fd, False)
            proc.open_pipes.add(fd)
            loop.add_reader(fd, self._drain, proc, fd, ring)
        if in_w is not None:
            os.set_blocking(in_w, False)
            if spec.stdin_open:
                proc.stdin_fd, in_w = in_w, None
        if spec.timeout_s is not None:
            proc.timer = loop.call_later(spec.timeout_s, self._on_timeout, proc)
        proc.on_sent = lambda: self._resume_draining(proc)
        self.processes[spec.exec_id] = proc
        self._by_pid[pid] = proc
        return proc, in_w

    def get(self, ref: str) -> ExecProcess:
        """Find a process by exec id, or by pid (the most recent with that pid).

        Raises:
            AgentError: ``PROCESS_NOT_FOUND``.
        """
        proc = self.processes.get(ref)
        if proc is None and ref.isdigit():
            proc = self._by_pid.get(int(ref))
        if proc is None:
            raise AgentError("PROCESS_NOT_FOUND", f"no process {ref}")
        return proc

    def listing(self, status: str | None = None) -> list[ExecProcess]:
        """All processes, newest first, optionally only those with ``status``."""
        procs = reversed(self.processes.values())
        return [p for p in procs if status is None or p.status == status]

    def send_signal(self, proc: ExecProcess, signum: int, *, group: bool) -> None:
        """Signal a running exec's leader or its whole process group; after the leader
        has exited, ``group`` signals whatever is left in the exec's own cgroup.

        A leader that dies of a signal sent here takes the rest of its cgroup with it
        (see :meth:`_on_exit`). Leftovers of an ended exec (background processes of a
        leader that exited) are reached only through ``group``: each of them gets
        ``signum`` (SIGKILL freezes and kills the cgroup until it is empty).

        Raises:
            AgentError: ``PROCESS_NOT_RUNNING`` once the leader has exited and, for
                ``group``, no process is left in the exec's cgroup.
        """
        if proc.wait_status is not None:
            if group and proc.cgroup is not None and cgroup_members(proc.cgroup):
                signal_cgroup(proc.cgroup, signum)
                _log.info(
                    "agent.exec_leftovers_signalled exec_id=%s signal=%d", proc.exec_id, signum
                )
                self._remove_cgroup(proc.cgroup)
                return
            raise AgentError("PROCESS_NOT_RUNNING", f"process {proc.exec_id} has ended")
        try:
            if group:
                os.killpg(proc.pid, signum)
            else:
                os.kill(proc.pid, signum)
        except ProcessLookupError as exc:
            raise AgentError("PROCESS_NOT_RUNNING", f"process {proc.exec_id} has ended") from exc
        proc.api_signalled = True

    async def feed_stdin(self, proc: ExecProcess, fd: int, chunks: AsyncIterator[bytes]) -> None:
        """Copy the request body into the exec's stdin, then close it.

        Stops early (closing stdin) if the process closes its end or the body breaks.
        """
        try:
            async for chunk in chunks:
                view = memoryview(chunk)
                while len(view) > 0:
                    try:
                        view = view[os.write(fd, view) :]
                    except BlockingIOError:
                        await wait_writable(fd)
        except (BrokenPipeError, AgentConnectionLost):
            return
        finally:
            os.close(fd)
            proc.stdin_open = False

    async def write_stdin(self, proc: ExecProcess, chunks: AsyncIterator[bytes], eof: bool) -> int:
        """Write ``chunks`` to a ``stdin_open`` process's stdin; close it after when ``eof``.

        Writers are served one at a time, so concurrent calls never interleave their bytes.
        A full pipe is waited on (the caller's deadline bounds the wait).

        Returns:
            The bytes written.

        Raises:
            AgentError: ``PROCESS_NOT_RUNNING`` once the exec has finished;
                ``STDIN_CLOSED`` when stdin is not (or no longer) open, including when
                the process closed its end.
        """
        written = 0
        async with proc.stdin_lock:
            if proc.finished:
                raise AgentError("PROCESS_NOT_RUNNING", f"process {proc.exec_id} has ended")
            fd = proc.stdin_fd
            if fd is None:
                raise AgentError("STDIN_CLOSED", f"stdin of process {proc.exec_id} is not open")
            try:
                async for chunk in chunks:
                    view = memoryview(chunk)
                    while len(view) > 0:
                        try:
                            count = os.write(fd, view)
                        except BlockingIOError:
                            await wait_writable(fd)
                            continue
                        view = view[count:]
                        written += count
            except BrokenPipeError as exc:
                self._close_stdin(proc)
                raise AgentError(
                    "STDIN_CLOSED", f"process {proc.exec_id} closed its stdin"
                ) from exc
            if eof:
                self._close_stdin(proc)
        return written

    def _close_stdin(self, proc: ExecProcess) -> None:
        if proc.stdin_fd is not None:
            os.close(proc.stdin_fd)
            proc.stdin_fd = None
        proc.stdin_open = False

    async def shutdown(self, grace_s: float) -> None:
        """SIGTERM every running exec's group, wait up to ``grace_s``, then SIGKILL."""
        running = [p for p in self.processes.values() if p.wait_status is None]
        for proc in running:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                for proc in running:
                    while proc.wait_status is None:
                        await proc.changed.wait()
        for proc in running:
            if proc.wait_status is None:
                kill_exec_tree(proc.pid)
                if proc.cgroup is not None:
                    kill_cgroup(proc.cgroup)

    def _make_cgroup(self, exec_id: str) -> str | None:
        """Create the exec's own cgroup; None (the exec then joins ``workload`` itself)
        when there is no manifest or the cgroup cannot be made."""
        cgroup = self.workload.exec_cgroup(exec_id)
        if cgroup is None:
            return None
        self._sweep_cgroups()
        try:
            os.mkdir(cgroup)
        except OSError as exc:
            _log.warning("agent.exec_cgroup_failed path=%s error=%s", cgroup, exc.strerror)
            return None
        return cgroup

    def _remove_cgroup(self, cgroup: str) -> None:
        """Remove an exec cgroup, or remember it while processes still live in it."""
        try:
            os.rmdir(cgroup)
        except FileNotFoundError:
            self._stale_cgroups.discard(cgroup)
        except OSError:
            self._stale_cgroups.add(cgroup)
        else:
            self._stale_cgroups.discard(cgroup)

    def _sweep_cgroups(self) -> None:
        for cgroup in list(self._stale_cgroups):
            self._remove_cgroup(cgroup)

    # -- events ----------------------------------------------------------------------

    def _drain(self, proc: ExecProcess, fd: int, ring: RingBuffer) -> None:
        name = "stdout" if ring is proc.stdout else "stderr"
        for _ in range(_READS_PER_WAKEUP):
            if proc.paced and ring.end - proc.sent[name] + _READ_BYTES > ring.capacity:
                asyncio.get_running_loop().remove_reader(fd)
                proc.paused[fd] = name
                break
            try:
                data = os.read(fd, _READ_BYTES)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                self._close_pipe(proc, fd)
                break
            ring.write(data)
        proc.changed.notify()

    def _resume_draining(self, proc: ExecProcess) -> None:
        """Drain the paused pipes of a paced exec whose buffers have room again."""
        loop = asyncio.get_running_loop()
        for fd, name in list(proc.paused.items()):
            ring = proc.buffer(name)
            if not proc.paced or ring.end - proc.sent[name] + _READ_BYTES <= ring.capacity:
                del proc.paused[fd]
                loop.add_reader(fd, self._drain, proc, fd, ring)

    def _finish_after_grace(self, proc: ExecProcess) -> None:
        # A paced exec's pipes wait for its reader: their data is the exec's, so the grace
        # for leftover writers starts once nothing waits.
        if proc.paused:
            asyncio.get_running_loop().call_later(EOF_GRACE_S, self._finish_after_grace, proc)
        else:
            self._finish(proc)

    def _close_pipe(self, proc: ExecProcess, fd: int) -> None:
        asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)
        proc.open_pipes.discard(fd)
        if not proc.open_pipes:
            if proc.finished:
                self._retire(proc)
            elif proc.wait_status is not None:
                self._finish(proc)

    def _on_exit(self, proc: ExecProcess, status: int) -> None:
        proc.wait_status = status
        proc.ended_at = time.time()
        proc.duration_ms = int((time.monotonic() - proc.started_mono) * 1000)
        if proc.timer is not None:
            proc.timer.cancel()
        self._classify(proc, status)
        if proc.cgroup is not None and (
            proc.status in ("timed_out", "oom_killed")
            or (proc.status == "signaled" and proc.api_signalled)
        ):
            # Nothing of a killed exec may keep running: its leftovers (a fork bomb whose
            # leader the OOM killer picked) would hold the bunker's memory, pids and CPU.
            # A normal exit keeps them (daemons started with ``nohup cmd &``).
            killed = kill_cgroup(proc.cgroup)
            _log.info(
                "agent.exec_cgroup_killed exec_id=%s status=%s processes=%d",
                proc.exec_id,
                proc.status,
                killed,
            )
        proc.changed.notify()
        if proc.open_pipes:
            asyncio.get_running_loop().call_later(EOF_GRACE_S, self._finish_after_grace, proc)
        else:
            self._finish(proc)

    def _classify(self, proc: ExecProcess, status: int) -> None:
        if os.WIFSIGNALED(status):
            signum = os.WTERMSIG(status)
            proc.signal_name = _signal_name(signum)
            if proc.timed_out:
                proc.status, proc.signal_name = "timed_out", "SIGKILL"
            elif signum == signal.SIGKILL and (
                self._oom_killed_since(proc.oom_before) or _oom_killed_in(proc.cgroup)
            ):
                proc.status = "oom_killed"
            else:
                proc.status = "signaled"
        elif proc.timed_out:
            proc.status, proc.signal_name = "timed_out", "SIGKILL"
        else:
            proc.status = "exited"
            proc.exit_code = os.WEXITSTATUS(status)

    def _oom_killed_since(self, before: int | None) -> bool:
        after = self.oom.read()
        return before is not None and after is not None and after > before

    def _on_timeout(self, proc: ExecProcess) -> None:
        proc.timer = None
        if proc.wait_status is None:
            proc.timed_out = True
            kill_exec_tree(proc.pid)
            if proc.cgroup is not None:
                kill_cgroup(proc.cgroup)

    def _finish(self, proc: ExecProcess) -> None:
        if proc.finished:
            return
        proc.finished = True
        proc.final_ends = (proc.stdout.end, proc.stderr.end)
        proc.changed.notify()
        if not proc.stdin_lock.locked():
            self._close_stdin(proc)
        if proc.cgroup is not None:
            self._remove_cgroup(proc.cgroup)
        if not proc.open_pipes:
            self._retire(proc)

    def _retire(self, proc: ExecProcess) -> None:
        """Count a finished exec's complete output against the retention budget, and
        release the oldest retained buffers beyond it (called once per exec)."""
        self._retained.append(proc)
        self._retained_bytes += proc.stdout.held_bytes + proc.stderr.held_bytes
        while self._retained_bytes > self._retained_output_bytes and self._retained:
            oldest = self._retained.popleft()
            self._retained_bytes -= oldest.stdout.held_bytes + oldest.stderr.held_bytes
            oldest.stdout.release()
            oldest.stderr.release()


async def stream_output(
    request: ServerRequest,
    proc: ExecProcess,
    streams: tuple[str, ...],
    offsets: dict[str, int],
    *,
    chunk_bytes: int = _RECORD_PAYLOAD_BYTES,
) -> None:
    """Send ``proc``'s output as exec records from ``offsets`` until it has finished.

    Reads only as much from a buffer as the stream's flow-control window lets through,
    so whatever is not yet sent stays in the ring buffer (where new output may overwrite
    it: that is reported as a gap record instead of blocking the process).
    """
    channels = {"stdout": CHANNEL_STDOUT, "stderr": CHANNEL_STDERR}
    while True:
        progressed = False
        for name in streams:
            ring = proc.buffer(name)
            limit = proc.final_end(name) if proc.finished else ring.end
            offset = offsets[name]
            if offset >= limit:
                continue
            window = await request.writable()
            want = min(max(window - RECORD_HEADER.size, 4096), chunk_bytes)
            start, data = ring.read(offset, min(want, limit - offset))
            # Output written after the exec finished (by a leftover background process)
            # may have pushed the buffer past the result's end: never send beyond it.
            data = data[: max(0, limit - start)]
            if start > offset:
                gap = {"stream": name, "offset": start, "dropped_bytes": start - offset}
                await request.write(encode_record(CHANNEL_GAP, dumps(gap).encode()))
            if data:
                await request.write(encode_record(channels[name], data))
            offsets[name] = start + len(data)
            proc.note_sent(name, offsets[name])
            progressed = True
        if progressed:
            continue
        if proc.finished:
            return
        await proc.changed.wait()


def _oom_killed_in(cgroup: str | None) -> bool:
    """True when the exec's own cgroup is a v1 memory cgroup that saw an OOM kill (v1
    counts a kill only in the victim's own memory cgroup, not in its ancestors)."""
    if cgroup is None:
        return False
    count = OomCounter(f"{cgroup}/memory.oom_control", "oom_kill").read()
    return count is not None and count > 0


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"


def _open_devnull() -> int:
    try:
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        # No /dev/null in the bunker: an empty pipe reads as end-of-file just the same.
        read_end, write_end = os.pipe()
        os.close(write_end)
        return read_end


def _grow_pipe(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)

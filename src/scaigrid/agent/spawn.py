"""Start one exec's process (SPEC §3.2).

The child gets a new session (so its own process group), stdin/stdout/stderr on the
given fds, the workload cgroup and its ``oom_score_adj`` (0 without a cgroups manifest,
see :mod:`scaigrid.agent.cgroups`), default signal dispositions and an empty signal mask,
the acting user's ids, umask 022 and ``cwd``. If the working directory or the
executable cannot be used, the child writes the reason to its stderr and exits with
127 (126 when the file exists but cannot be executed), so the exec completes normally
with that status.

Two ways, same result:

* **helper** (execs, when the runtime tree holds :data:`HELPER_NAME`): ``posix_spawn``
  starts the static helper ``scaibunker-spawn`` (``spawn_helper.c``) in the new session
  with the stdio fds; the helper does the rest as root and execs the command. The clone
  shares the agent's memory until the helper's exec instead of copying its page tables,
  so the agent spends about 0.05 ms instead of 1 to 1.5 ms of CPU per exec (a fork of a
  25 MB process, then copy-on-write faults on every page the agent writes afterwards).
  Nothing of the agent runs in the child: glibc's ``posix_spawn`` blocks every signal
  around the clone and resets caught signals to their defaults before the exec.
* **fork** (interactive shells, which need ``TIOCSCTTY``, and runtimes without the
  helper, e.g. built where no C compiler was found): ``fork()`` with all signals blocked,
  so that no Python signal handler of the agent runs in the child before it has reset
  them, then the same steps in Python.

:func:`spawn` returns once the child has exec'd (the helper, or the command on the fork
path), so the exec's process group exists from the start.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # the C half of signal, no stubs
import errno
import fcntl
import gc
import os
import signal
import termios
from typing import NoReturn

from scaigrid.agent.identity import Identity, can_switch

#: File name of the spawn helper in the runtime tree's ``bin/``.
HELPER_NAME = "scaibunker-spawn"

_UNBLOCKABLE = {signal.SIGKILL, signal.SIGSTOP}
#: Every signal number as plain ints: the C-level ``_signal`` calls below skip the
#: ``signal.Signals`` conversions of the :mod:`signal` wrappers, which cost about a
#: millisecond per spawn (in the parent, and again in the child, where every touched
#: object also costs a copy-on-write page fault).
_ALL_SIGNALS = frozenset(int(s) for s in _signal.valid_signals())
_RESETTABLE = tuple(sorted(_ALL_SIGNALS - {int(s) for s in _UNBLOCKABLE}))
_SIG_DFL = int(signal.SIG_DFL)


def find_helper() -> str | None:
    """The runtime tree's spawn helper (``<tree>/bin/scaibunker-spawn`` for this module at
    ``<tree>/site/scaigrid/agent/spawn.py``), or None when it is missing or not executable."""
    tree = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    path = os.path.join(os.path.abspath(tree), "bin", HELPER_NAME)
    return path if os.access(path, os.X_OK) else None


#: The helper :func:`spawn` uses for execs (None: every child is forked).
HELPER = find_helper()


def spawn(
    argv: list[str],
    *,
    search_path: bool,
    env: dict[str, str],
    cwd: str,
    identity: Identity,
    stdin_fd: int,
    stdout_fd: int,
    stderr_fd: int,
    cgroup_procs: tuple[str, ...] = (),
    oom_score_adj: int = 0,
    controlling_tty: bool = False,
) -> int:
    """Start ``argv`` through :data:`HELPER` when there is one and no controlling
    terminal is wanted, else by forking; return the child's pid.

    Arguments and errors: those of :func:`spawn_forked`.
    """
    if HELPER is not None and not controlling_tty:
        return spawn_with_helper(
            HELPER,
            argv,
            search_path=search_path,
            env=env,
            cwd=cwd,
            identity=identity,
            stdin_fd=stdin_fd,
            stdout_fd=stdout_fd,
            stderr_fd=stderr_fd,
            cgroup_procs=cgroup_procs,
            oom_score_adj=oom_score_adj,
        )
    return spawn_forked(
        argv,
        search_path=search_path,
        env=env,
        cwd=cwd,
        identity=identity,
        stdin_fd=stdin_fd,
        stdout_fd=stdout_fd,
        stderr_fd=stderr_fd,
        cgroup_procs=cgroup_procs,
        oom_score_adj=oom_score_adj,
        controlling_tty=controlling_tty,
    )


def spawn_with_helper(
    helper: str,
    argv: list[str],
    *,
    search_path: bool,
    env: dict[str, str],
    cwd: str,
    identity: Identity,
    stdin_fd: int,
    stdout_fd: int,
    stderr_fd: int,
    cgroup_procs: tuple[str, ...] = (),
    oom_score_adj: int = 0,
) -> int:
    """``posix_spawn`` the helper at ``helper`` in a new session, which sets the child up
    and execs ``argv``; return the child's pid (it has exec'd the helper).

    Arguments: those of :func:`spawn_forked` (no controlling terminal).

    Raises:
        OSError: the clone failed (e.g. EAGAIN at the bunker's pids limit) or the helper
            could not be executed.
    """
    helper_argv = [
        helper,
        str(identity.uid),
        str(identity.gid),
        ",".join(str(group) for group in identity.groups),
        str(oom_score_adj),
        "1" if search_path else "0",
        cwd,
        str(len(cgroup_procs)),
        *cgroup_procs,
        *argv,
    ]
    return os.posix_spawn(
        helper,
        helper_argv,
        env,
        file_actions=[
            (os.POSIX_SPAWN_DUP2, stdin_fd, 0),
            (os.POSIX_SPAWN_DUP2, stdout_fd, 1),
            (os.POSIX_SPAWN_DUP2, stderr_fd, 2),
        ],
        setsid=True,
        setsigmask=(),
    )


def spawn_forked(
    argv: list[str],
    *,
    search_path: bool,
    env: dict[str, str],
    cwd: str,
    identity: Identity,
    stdin_fd: int,
    stdout_fd: int,
    stderr_fd: int,
    cgroup_procs: tuple[str, ...] = (),
    oom_score_adj: int = 0,
    controlling_tty: bool = False,
) -> int:
    """Fork and exec ``argv``; return the child's pid (it has exec'd ``argv``).

    Args:
        argv: program and arguments; ``argv[0]`` is looked up on ``env["PATH"]`` when
            ``search_path`` and it has no slash.
        env: the complete environment of the child.
        cwd: absolute working directory (entered as the acting user).
        identity: the user the child runs as.
        stdin_fd, stdout_fd, stderr_fd: fds that become 0, 1 and 2 in the child.
        cgroup_procs: ``cgroup.procs`` files the child moves itself into while still
            root (failures leave it in the agent's cgroup).
        oom_score_adj: the child's ``oom_score_adj``.
        controlling_tty: make ``stdin_fd`` (a PTY slave) the controlling terminal of the
            child's new session (interactive shells, SPEC §5).

    Raises:
        OSError: ``fork()`` failed (e.g. EAGAIN at the bunker's pids limit).
    """
    # Only dispositions Python changed need resetting in the child; finding them here
    # (C calls, no allocations) keeps the child's work before exec to a few syscalls.
    changed = tuple(
        signum
        for signum in _RESETTABLE
        if _signal.getsignal(signum) not in (_SIG_DFL, signal.SIG_DFL, None)
    )
    ready_r, ready_w = os.pipe()
    try:
        blocked = _signal.pthread_sigmask(_signal.SIG_BLOCK, _ALL_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                _child(
                    argv,
                    search_path,
                    env,
                    cwd,
                    identity,
                    (stdin_fd, stdout_fd, stderr_fd),
                    cgroup_procs,
                    oom_score_adj,
                    controlling_tty,
                    changed,
                )
        finally:
            _signal.pthread_sigmask(_signal.SIG_SETMASK, blocked)
        os.close(ready_w)
        ready_w = -1
        # The pipe is close-on-exec: end-of-file means the child has exec'd (or exited),
        # so its session, ids and cwd are in place before anyone can signal its group.
        os.read(ready_r, 1)
    finally:
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)
    return pid


def _child(
    argv: list[str],
    search_path: bool,
    env: dict[str, str],
    cwd: str,
    identity: Identity,
    fds: tuple[int, int, int],
    cgroup_procs: tuple[str, ...],
    oom_score_adj: int,
    controlling_tty: bool = False,
    changed_signals: tuple[int, ...] = (),
) -> NoReturn:
    try:
        # A collection here would touch (and so copy) every tracked object of the agent.
        gc.disable()
        _signal.set_wakeup_fd(-1)
        for signum in changed_signals:
            try:
                _signal.signal(signum, _SIG_DFL)
            except (OSError, ValueError):
                continue
        _signal.pthread_sigmask(_signal.SIG_SETMASK, ())
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        if controlling_tty:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        for procs in cgroup_procs:
            _write_quietly(procs, "0")
        _write_quietly("/proc/self/oom_score_adj", str(oom_score_adj))
        if can_switch():
            os.setgroups(list(identity.groups))
            os.setresgid(identity.gid, identity.gid, identity.gid)
            os.setresuid(identity.uid, identity.uid, identity.uid)
        os.umask(0o022)
        try:
            os.chdir(cwd)
        except OSError as exc:
            _fail(f"cannot enter working directory {cwd}: {exc.strerror}", 127)
        try:
            if search_path:
                os.execvpe(argv[0], argv, env)  # noqa: S606 - running commands is the job
            else:
                os.execve(argv[0], argv, env)  # noqa: S606 - running commands is the job
        except OSError as exc:
            code = 127 if exc.errno in (errno.ENOENT, errno.ENOTDIR) else 126
            _fail(f"cannot run {argv[0]}: {exc.strerror}", code)
    except BaseException as exc:
        _fail(f"cannot start process: {exc!r}", 127)
    os._exit(127)


def _write_quietly(path: str, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, value.encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def _fail(message: str, code: int) -> NoReturn:
    try:
        os.write(2, f"scaibunker: {message}\n".encode(errors="replace"))
    finally:
        os._exit(code)

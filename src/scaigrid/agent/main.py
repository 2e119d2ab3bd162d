"""Entry point of the guest agent: ``python -m scaigrid.agent --listen PATH`` (containers)
or ``--serial NAME`` (QEMU microVMs) or ``--vsock PORT`` (Firecracker microVMs).

Runs as PID 1 of the bunker. Listens on a unix socket (mode 0600) in a directory the
worker bind-mounts from the host, and serves the protocol of
:mod:`scaigrid.protocol.agent` on each accepted connection.

Only peers outside the bunker may connect: the kernel reports a peer's pid relative to
the agent's pid namespace (``SO_PEERCRED``), and a process of an ancestor namespace
(the worker) shows as pid 0. Any other peer is a process inside the bunker and is
dropped. ``--trust-any-peer`` turns the check off and exists for tests only.

A ``cgroups.json`` next to the socket places execs in the bunker's workload cgroup
(:mod:`scaigrid.agent.cgroups`).

In a microVM (``--serial NAME``) the agent serves ONE connection at a time on the
virtio-serial port whose ``/sys/class/virtio-ports/*/name`` is ``NAME``, each opened by a
resynchronising handshake (:mod:`scaigrid.agent.serial`). Only the host can reach the
port, so there is no peer check.

Signals: SIGTERM and SIGINT from outside the bunker shut down (execs get SIGTERM, then
SIGKILL after ``--shutdown-grace-s``); sent from inside (even by its root) they are logged
and ignored, see :func:`stop_on_signals`. SIGHUP, SIGUSR1 and SIGUSR2 are logged and ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import struct
import sys
import threading
from collections.abc import Callable

from scaigrid.agent import spawn
from scaigrid.agent.cgroups import MANIFEST_NAME, load_workload
from scaigrid.agent.execs import ExecManager, OomCounter
from scaigrid.agent.init import ChildReaper, ensure_home, missing_capabilities, protect_from_oom
from scaigrid.agent.routes import AgentService
from scaigrid.agent.serial import serve_serial
from scaigrid.agent.shell_routes import ShellRoutes
from scaigrid.agent.shells import ShellManager

_log = logging.getLogger("scaigrid.agent")
_PEERCRED = struct.Struct("3i")


_USAGE = """usage: python -m scaigrid.agent (--listen PATH | --serial NAME | --vsock PORT)
       [--trust-any-peer]
       [--ring-buffer-bytes N] [--retained-output-bytes N] [--shutdown-grace-s S]
       [--log-level LEVEL]"""


class Options:
    """Command-line options of the agent.

    Attributes:
        listen: unix socket path to listen on (this or ``serial`` is required).
        serial: name of the virtio-serial port to serve on (QEMU microVMs).
        vsock: vsock port to listen on (Firecracker microVMs), 0 = unused.
        trust_any_peer: accept peers inside the bunker's pid namespace (tests only).
        ring_buffer_bytes: default capacity of each exec output buffer (1 MiB).
        retained_output_bytes: output budget of finished processes (64 MiB).
        shutdown_grace_s: SIGTERM-to-SIGKILL delay for execs at shutdown (2 s).
        log_level: ``DEBUG``, ``INFO`` (default), ``WARNING`` or ``ERROR``.
    """

    def __init__(self) -> None:
        self.listen = ""
        self.serial = ""
        self.vsock = 0
        self.trust_any_peer = False
        self.ring_buffer_bytes = 1 << 20
        self.retained_output_bytes = 64 << 20
        self.shutdown_grace_s = 2.0
        self.log_level = "INFO"


def parse_args(argv: list[str]) -> Options:
    """Parse the agent's command line (argparse is left out: it costs start-up time).

    Raises:
        SystemExit: 2 with a usage message on a bad command line.
    """
    options = Options()
    converters: dict[str, tuple[str, Callable[[str], object]]] = {
        "--listen": ("listen", str),
        "--serial": ("serial", str),
        "--vsock": ("vsock", int),
        "--ring-buffer-bytes": ("ring_buffer_bytes", int),
        "--retained-output-bytes": ("retained_output_bytes", int),
        "--shutdown-grace-s": ("shutdown_grace_s", float),
        "--log-level": ("log_level", str.upper),
    }
    args = iter(argv)
    for arg in args:
        name, _, inline = arg.partition("=")
        if arg == "--trust-any-peer":
            options.trust_any_peer = True
        elif name in converters:
            attr, convert = converters[name]
            raw = inline if inline else next(args, None)
            try:
                if raw is None:
                    raise ValueError("missing value")
                setattr(options, attr, convert(raw))
            except ValueError as exc:
                _usage(f"{name}: {exc}")
        else:
            _usage(f"unknown argument {arg!r}")
    if [bool(options.listen), bool(options.serial), bool(options.vsock)].count(True) != 1:
        _usage("exactly one of --listen, --serial and --vsock is required")
    return options


def _usage(message: str) -> None:
    sys.stderr.write(f"{_USAGE}\nerror: {message}\n")
    raise SystemExit(2)


def listen_socket(path: str) -> socket.socket:
    """Bind a listening unix socket at ``path`` with mode 0600 (replacing a stale one)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(16)
    sock.setblocking(False)
    return sock


def listen_vsock(port: int) -> socket.socket:
    """A listening ``AF_VSOCK`` stream socket on ``port`` for any CID (only the host can
    connect to a guest's vsock ports; Firecracker forwards ``CONNECT <port>`` there)."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.bind((socket.VMADDR_CID_ANY, port))
    sock.listen(16)
    sock.setblocking(False)
    return sock


def peer_pid(writer: asyncio.StreamWriter) -> int | None:
    """The connected peer's pid as seen from the agent's pid namespace (0 = outside)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, _uid, _gid = _PEERCRED.unpack(raw)
    return int(pid)


#: Signals that stop the agent when they come from outside the bunker.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def stop_on_signals(loop: asyncio.AbstractEventLoop, stopping: asyncio.Event) -> None:
    """Set ``stopping`` when SIGTERM or SIGINT arrives from outside the bunker.

    As PID 1 of a PID namespace the agent is sent any signal it handles, by the host (the
    worker, ``crun kill``) and by root inside the bunker alike; only the host may stop it.
    So both signals are blocked in every thread (call this before any thread starts; the
    children the agent starts reset their mask, :mod:`scaigrid.agent.spawn`) and a daemon
    thread takes them with ``sigwaitinfo``, whose ``si_pid`` is 0 exactly when the sender
    is not in the agent's PID namespace (pid_namespaces(7)). When the agent is not PID 1
    (tests, tools) every sender counts.

    Args:
        loop: the running loop ``stopping`` belongs to.
        stopping: set (on ``loop``) by an accepted signal.
    """
    for signum in STOP_SIGNALS:
        # A handler, not SIG_DFL: the kernel drops a signal PID 1 does not handle.
        signal.signal(signum, _never_called)
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    pid1 = os.getpid() == 1

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo(STOP_SIGNALS)
            if info.si_pid == 0 or not pid1:
                loop.call_soon_threadsafe(stopping.set)
            else:
                _log.warning(
                    "agent.signal_ignored signal=%s sender_pid=%s (inside the bunker)",
                    info.si_signo,
                    info.si_pid,
                )

    threading.Thread(target=wait, name="stop-signals", daemon=True).start()


def _never_called(signum: int, frame: object) -> None:
    """Handler of the blocked stop signals (``sigwaitinfo`` takes them first)."""


async def run(options: Options) -> int:
    """Serve until SIGTERM/SIGINT; return the exit status."""
    loop = asyncio.get_running_loop()
    reaper = ChildReaper()
    reaper.install(loop)
    stopping = asyncio.Event()
    stop_on_signals(loop, stopping)
    for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        loop.add_signal_handler(signum, _log.info, "agent.signal_ignored signal=%s", signum)
    workload = (
        load_workload(os.path.join(os.path.dirname(options.listen), MANIFEST_NAME))
        if options.listen
        else load_workload("")
    )
    execs = ExecManager(
        reaper,
        OomCounter.for_workload(workload),
        retained_output_bytes=options.retained_output_bytes,
        base_env=dict(os.environ),
        workload=workload,
    )
    _log.info("agent.spawn helper=%s", spawn.HELPER or "none (every exec forks)")
    shells = ShellManager(reaper, workload, dict(os.environ))
    router = AgentService(execs, ring_buffer_bytes=options.ring_buffer_bytes).router()
    ShellRoutes(shells).add_to(router)
    connections: set[asyncio.Task[object]] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pid = peer_pid(writer)
        if pid != 0 and not options.trust_any_peer:
            _log.warning("agent.peer_refused peer_pid=%s", pid)
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            connections.add(task)
        _log.info("agent.peer_connected peer_pid=%s", pid)
        try:
            await router.serve(reader, writer)
        finally:
            if task is not None:
                connections.discard(task)
            _log.info("agent.peer_disconnected peer_pid=%s", pid)

    if options.vsock:
        vsock_server = await asyncio.start_server(
            router.serve, sock=listen_vsock(options.vsock), limit=1 << 20
        )
        _log.info("agent.ready vsock=%d pid=%d", options.vsock, os.getpid())
        await stopping.wait()
        _log.info("agent.stopping")
        vsock_server.close()
    elif options.serial:
        serial = loop.create_task(serve_serial(options.serial, router.serve))
        _log.info("agent.ready serial=%s pid=%d", options.serial, os.getpid())
        await stopping.wait()
        _log.info("agent.stopping")
        serial.cancel()
        await asyncio.gather(serial, return_exceptions=True)
    else:
        sock = listen_socket(options.listen)
        server = await asyncio.start_unix_server(on_connect, sock=sock)
        _log.info(
            "agent.ready listen=%s pid=%d oom_counter=%s",
            options.listen,
            os.getpid(),
            execs.oom.path,
        )
        await stopping.wait()
        _log.info("agent.stopping")
        server.close()
        with contextlib.suppress(OSError):
            os.unlink(options.listen)
    await shells.shutdown()
    await execs.shutdown(options.shutdown_grace_s)
    for task in list(connections):
        task.cancel()
    if connections:
        await asyncio.wait(connections, timeout=1.0)
    return 0


def ensure_std_fds() -> None:
    """Open ``/dev/null`` on any of fds 0-2 that is closed, so no pipe or socket the
    agent creates later can land there (the exec child's dup2 onto 0-2 would clobber it)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            try:
                null = os.open("/dev/null", os.O_RDWR)
            except OSError:
                return
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def main(argv: list[str] | None = None) -> int:
    """Run the agent; returns its exit status."""
    ensure_std_fds()
    options = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=options.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    os.umask(0o022)
    oom_score_adj = protect_from_oom()
    ensure_home()
    _log.info("agent.starting pid=%d oom_score_adj=%s", os.getpid(), oom_score_adj)
    missing = missing_capabilities()
    if missing:
        _log.warning("agent.capabilities_missing missing=%s", ",".join(missing))
    return asyncio.run(run(options))

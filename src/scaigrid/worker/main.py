"""``scaibunker-worker``: the worker daemon (SPEC §10.3-10.8).

Start-up, in order: read the settings (environment ``SCAIBUNKER_*``, overridden by flags),
build the drivers (each probes the host; unusable ones are skipped unless named
explicitly), build the guest agent's runtime tree, stop bunkers left over by a previous
run, then dial the controller and stay connected (:class:`~scaigrid.worker.link.LinkClient`).
SIGTERM or SIGINT destroys the worker's bunkers and exits 0.

Exit codes: 0 stopped by a signal; 1 unexpected error (logged as ``worker_crashed``);
2 configuration error (including no credential and no
join token); 3 the controller refused the credential or join token; 4 no usable driver or
the agent runtime could not be built.

Usage::

    scaibunker-worker --controller https://grid.example.com --join-token sbj_... \\
        --data-dir /var/lib/scaibunker
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import click
import pydantic
import structlog

from scaigrid.worker.bunkers import AgentLaunch, BunkerSupervisor
from scaigrid.worker.capabilities import CapabilityBroker
from scaigrid.worker.drivers import firecracker, qemu
from scaigrid.worker.drivers.base import Driver, DriverError
from scaigrid.worker.drivers.container import ContainerDriver
from scaigrid.worker.drivers.firecracker import FirecrackerDriver
from scaigrid.worker.drivers.qemu import QemuDriver
from scaigrid.worker.images import ImageStore
from scaigrid.worker.link import LinkAuthRejected, LinkClient, LinkConfigError
from scaigrid.worker.link.handlers import build_handlers
from scaigrid.worker.net.audit import AuditSink, EgressAudit, LocalDirSink, ProxySink
from scaigrid.worker.net.manager import NetworkManager, worker_tag
from scaigrid.worker.rootfs import ImageCache
from scaigrid.worker.rootfs.agent_runtime import (
    AgentRuntimeError,
    agent_argv,
    agent_env,
    ensure_agent_runtime,
)
from scaigrid.worker.settings import WorkerSettings

log = structlog.get_logger(__name__)

EXIT_CONFIG: Final = 2
EXIT_AUTH: Final = 3
EXIT_HOST: Final = 4
EXIT_CRASH: Final = 1
#: Where the agent listens inside every bunker (the driver bind-mounts the host run dir).
AGENT_LISTEN_PATH: Final = "/.scaibunker-run/agent.sock"
_MIB: Final = 1 << 20
_FRAME_LOGGERS: Final = ("websockets", "h2", "hpack", "hyperframe")


class HostSetupError(Exception):
    """The host cannot run bunkers: no usable driver, or no agent runtime."""


def configure_logging(level: str) -> None:
    """JSON lines on stderr: one event name plus fields per entry, at ``level``."""
    numeric = logging.getLevelName(level.upper())
    logging.basicConfig(format="%(levelname)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(numeric)
    for noisy in _FRAME_LOGGERS:
        # These log every frame at DEBUG; the worker's own events say what matters.
        logging.getLogger(noisy).setLevel(max(numeric, logging.INFO))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # Plain-text tracebacks: the dict form records local variables (secrets).
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def daemon_version() -> str:
    """Version of the installed ``scaigrid`` distribution."""
    try:
        return importlib.metadata.version("scaigrid")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _memory_total_mb() -> int:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise OSError("MemTotal missing from /proc/meminfo")


def host_capacity(settings: WorkerSettings) -> dict[str, Any]:
    """Capacity offered to bunkers: ``{cpu_millicores, memory_mb, disk_mb, gpu_count,
    gpu_type}`` (host CPUs x 1000 and RAM in MiB minus the reserved amounts; the size of the
    data directory's filesystem in MiB)."""
    cpus = len(os.sched_getaffinity(0))
    return {
        "cpu_millicores": max(0, cpus * 1000 - settings.reserved_cpu_millicores),
        "memory_mb": max(0, _memory_total_mb() - settings.reserved_memory_mb),
        "disk_mb": shutil.disk_usage(settings.data_dir).total // _MIB,
        "gpu_count": 0,
        "gpu_type": None,
    }


def _container_driver(settings: WorkerSettings) -> Driver:
    return ContainerDriver(settings.data_dir, cgroup_parent=settings.bunker_cgroup_parent())


def _qemu_driver(settings: WorkerSettings) -> Driver:
    if (settings.vm_kernel is None) != (settings.vm_initramfs is None):
        raise DriverError("set both vm_kernel and vm_initramfs, or neither")
    return QemuDriver(
        settings.data_dir,
        kernel=settings.vm_kernel,
        initramfs=settings.vm_initramfs,
        accel=settings.vm_accel,
        boot_timeout_s=settings.vm_boot_timeout_s or qemu.BOOT_TIMEOUT_S,
    )


def _firecracker_driver(settings: WorkerSettings) -> Driver:
    if (settings.vm_kernel is None) != (settings.vm_initramfs is None):
        raise DriverError("set both vm_kernel and vm_initramfs, or neither")
    return FirecrackerDriver(
        settings.data_dir,
        kernel=settings.vm_kernel,
        initramfs=settings.vm_initramfs,
        boot_timeout_s=settings.vm_boot_timeout_s or firecracker.BOOT_TIMEOUT_S,
    )


#: Driver factories by name, in default preference order.
DRIVER_FACTORIES: Final[dict[str, Callable[[WorkerSettings], Driver]]] = {
    "container": _container_driver,
    "qemu": _qemu_driver,
    "firecracker": _firecracker_driver,
}
#: Drivers used when ``drivers`` is unset. MicroVM drivers are opt-in: the scheduler prefers
#: ``microvm``, so an automatic TCG driver (seconds per boot) would take every bunker.
AUTO_DRIVERS: Final = ("container",)


def make_drivers(settings: WorkerSettings) -> list[Driver]:
    """Build the configured drivers (blocking: each probes the host).

    With ``drivers`` unset, every known driver that works here is used and the others are
    logged and skipped; a driver named explicitly must work.

    Raises:
        HostSetupError: an unknown or unusable named driver, or no usable driver at all.
    """
    explicit = bool(settings.drivers)
    names = settings.drivers or list(AUTO_DRIVERS)
    drivers: list[Driver] = []
    for name in names:
        factory = DRIVER_FACTORIES.get(name)
        if factory is None:
            raise HostSetupError(f"unknown driver {name!r}; known: {', '.join(DRIVER_FACTORIES)}")
        try:
            drivers.append(factory(settings))
        except DriverError as exc:
            if explicit:
                raise HostSetupError(f"driver {name} does not work on this host: {exc}") from exc
            log.warning("driver_unavailable", driver=name, reason=str(exc))
    if not drivers:
        raise HostSetupError("no driver works on this host")
    return drivers


def prepare_agent_launch(settings: WorkerSettings) -> AgentLaunch:
    """Build (or find cached) the agent runtime tree (blocking, seconds on first use).

    Raises:
        HostSetupError: the runtime could not be built.
    """
    try:
        runtime_dir = ensure_agent_runtime(settings.data_dir / "agent-runtime")
    except (AgentRuntimeError, OSError) as exc:
        raise HostSetupError(f"the agent runtime could not be built: {exc}") from exc
    return AgentLaunch(
        runtime_dir=runtime_dir, argv=tuple(agent_argv(AGENT_LISTEN_PATH)), env=agent_env()
    )


class WorkerDaemon:
    """One worker: settings, supervisor and link, and what it reports to the controller.

    Args:
        settings: the worker's settings.
        supervisor: the bunker supervisor.
        capacity: ``{cpu_millicores, memory_mb, disk_mb, gpu_count, gpu_type}``.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        supervisor: BunkerSupervisor,
        capacity: dict[str, Any],
    ) -> None:
        self.settings = settings
        self.supervisor = supervisor
        self.capacity = capacity
        self.link = LinkClient(
            url=settings.connect_url(),
            credential_path=settings.credential_path,
            join_token=settings.join_token,
            status=self,
            handlers=build_handlers(supervisor),
        )
        supervisor.set_event_sink(self.link.send_bunker_event)

    def register_payload(self) -> dict[str, Any]:
        """``register`` fields: ``{hostname, drivers, capacity, labels, daemon_version,
        bunkers, image_cache}``."""
        return {
            "hostname": self.settings.hostname,
            "drivers": [
                {"name": d.info.name, "isolation": d.info.isolation, "accel": d.info.accel}
                for d in self.supervisor.drivers
            ],
            "capacity": dict(self.capacity),
            "labels": dict(self.settings.labels),
            "daemon_version": daemon_version(),
            "bunkers": self.supervisor.report(),
            "image_cache": self.supervisor.images.report(),
        }

    def heartbeat_payload(self) -> dict[str, Any]:
        """``heartbeat`` fields besides ``ts``: ``{free, bunkers, image_cache}``.

        ``free`` is capacity minus the resources of bunkers holding them; ``disk_mb`` is also
        capped by the space actually free on the data directory's filesystem.
        """
        allocated = self.supervisor.allocated()
        disk_free = shutil.disk_usage(self.settings.data_dir).free // _MIB
        return {
            "free": {
                "cpu_millicores": max(
                    0, self.capacity["cpu_millicores"] - allocated.cpu_millicores
                ),
                "memory_mb": max(0, self.capacity["memory_mb"] - allocated.memory_mb),
                "disk_mb": max(0, min(self.capacity["disk_mb"] - allocated.disk_mb, disk_free)),
                "gpu_count": self.capacity["gpu_count"],
            },
            "bunkers": self._bunker_reports(),
            "image_cache": self.supervisor.images.report(),
        }

    def _bunker_reports(self) -> list[dict[str, Any]]:
        """The supervisor's ``[{bunker_id, state}]``, each with ``egress_bytes`` (cumulative
        bytes sent out of the uplink, SPEC §1.9) when the bunker has a network."""
        reports: list[dict[str, Any]] = list(self.supervisor.report())
        network = self.supervisor.network
        if network is None:
            return reports
        for report in reports:
            sent = network.egress_bytes(report["bunker_id"])
            if sent is not None:
                report["egress_bytes"] = sent
        return reports

    async def run(self) -> None:
        """Clean up leftovers, then stay connected until cancelled; bunkers are destroyed on
        the way out.

        Raises:
            LinkAuthRejected, LinkConfigError: see :meth:`LinkClient.run`.
        """
        try:
            leftovers = await self.supervisor.start()
            if leftovers:
                log.info("leftover_bunkers_destroyed", count=len(leftovers))
            await self.link.run()
        finally:
            await self.supervisor.close()


def make_network(
    settings: WorkerSettings, broker: CapabilityBroker | None = None
) -> NetworkManager | None:
    """The worker's bunker networking (started by the supervisor), ``None`` when disabled.

    Egress audit batches go through the storage proxy with capabilities from ``broker``
    (SPEC §8.7), or to ``settings.audit_dir`` when that is set (or no broker is given).
    """
    if not settings.network:
        return None
    tag = worker_tag(settings.data_dir)
    sink: AuditSink
    if settings.audit_dir is not None or broker is None:
        sink = LocalDirSink(settings.audit_dir or settings.data_dir / "audit")
    else:
        sink = ProxySink(broker)
    return NetworkManager(
        tag=tag,
        pool=settings.net_pool,
        uplink_netns=settings.net_uplink_netns,
        deny=[str(cidr) for cidr in settings.net_deny],
        audit=EgressAudit(sink),
    )


async def build_daemon(settings: WorkerSettings) -> WorkerDaemon:
    """Probe the host and assemble a :class:`WorkerDaemon` (blocking parts in threads).

    Raises:
        HostSetupError: no usable driver, or no agent runtime.
    """
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    drivers = await asyncio.to_thread(make_drivers, settings)
    launch = await asyncio.to_thread(prepare_agent_launch, settings)
    broker = CapabilityBroker()
    images = ImageStore(
        ImageCache(
            settings.data_dir / "images",
            insecure_registries=settings.insecure_registries,
            registry_auth_file=settings.registry_auth_file,
        ),
        broker=broker,
        max_cache_bytes=(
            settings.image_cache_max_mb << 20 if settings.image_cache_max_mb is not None else None
        ),
    )
    supervisor = BunkerSupervisor(
        drivers=drivers,
        images=images,
        agent_launch=launch,
        network=make_network(settings, broker),
        scratch_dir=settings.data_dir / "transfers",
    )
    daemon = WorkerDaemon(settings, supervisor, host_capacity(settings))
    broker.requester = daemon.link.request_capability
    return daemon


async def serve(settings: WorkerSettings) -> int:
    """Run the daemon until SIGTERM/SIGINT; return the process exit code."""
    loop = asyncio.get_running_loop()
    current = asyncio.current_task()
    assert current is not None
    stopping = False

    def stop(signum: int) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            log.info("worker_stopping", signal=signal.Signals(signum).name)
            current.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)
    try:
        daemon = await build_daemon(settings)
        log.info(
            "worker_starting",
            controller=settings.controller_url,
            data_dir=str(settings.data_dir),
            hostname=settings.hostname,
            drivers=[d.info.name for d in daemon.supervisor.drivers],
            version=daemon_version(),
        )
        await daemon.run()
    except asyncio.CancelledError:
        if not stopping:
            raise
        log.info("worker_stopped")
        return 0
    except HostSetupError as exc:
        log.error("worker_host_unusable", reason=str(exc))
        return EXIT_HOST
    except LinkConfigError as exc:
        log.error("worker_not_configured", reason=str(exc))
        return EXIT_CONFIG
    except LinkAuthRejected as exc:
        log.error("worker_refused_by_controller", reason=str(exc))
        return EXIT_AUTH
    except Exception as exc:
        log.error("worker_crashed", exc_info=exc)
        return EXIT_CRASH
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--controller", "controller_url", help="ScaiGrid base URL (SCAIBUNKER_CONTROLLER_URL)."
)
@click.option("--join-token", help="One-use join token, needed until a credential is stored.")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Credential, image cache and bunker state (default /var/lib/scaibunker).",
)
@click.option("--drivers", help="Drivers to offer, in preference order, e.g. 'container'.")
@click.option("--labels", help="Extra labels, k=v,k=v.")
@click.option("--hostname", help="Name to register under (default: the host name).")
@click.option("--cgroup-parent", help="Cgroup directory of this worker's bunkers.")
@click.option(
    "--insecure-registries", help="Registry hosts pulled over plain HTTP, host:port,host:port."
)
@click.option(
    "--registry-auth-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="containers-auth.json with registry credentials for OCI pulls.",
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="Log level."
)
def main(**flags: Any) -> None:
    """Run the ScaiBunker worker daemon: dial the controller and run bunkers for it."""
    overrides = {name: value for name, value in flags.items() if value is not None}
    try:
        settings = WorkerSettings(**overrides)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise click.UsageError(
            f"invalid configuration ({problems}); set --controller or SCAIBUNKER_CONTROLLER_URL"
        ) from exc
    configure_logging(settings.log_level)
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(serve(settings)))


if __name__ == "__main__":
    main()

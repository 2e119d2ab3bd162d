"""The ``qemu`` driver: one QEMU ``microvm`` per bunker (isolation class ``microvm``).

Machine (HOST-NOTES §1): ``qemu-system-x86_64 -M microvm,acpi=on`` with virtio-mmio
devices found through ACPI, the PVH ``vmlinux`` and initramfs of
:mod:`scaigrid.worker.vm.artifacts`, and ``tsc_early_khz=<host TSC kHz>`` on the kernel
command line (without it oversubscribed guests hang calibrating the TSC). Acceleration is
KVM when ``/dev/kvm`` really runs a guest (probed once by booting the guest kernel into a
trivial init that powers off), TCG otherwise.

Devices are data (:class:`Drive`, :class:`SerialPort`) turned into arguments in one place
(:func:`qemu_argv`), so later device kinds (VFIO GPUs) are added as more data:

* ``/dev/vda`` the image's base ext4 (read-only, shared), ``/dev/vdb`` the bunker's sparse
  scratch ext4 of ``disk_mb`` MiB, ``/dev/vdc`` the agent runtime ext4 (read-only); the
  initramfs assembles the overlay root (:mod:`scaigrid.worker.vm.disks`).
* The agent channel is the virtio-serial port ``agent`` backed by a unix socket in the
  bunker's state directory: the single byte stream the agent protocol was built for (the
  agent runs with ``--serial agent``).
* Control is QMP (``qemu.qmp``) on a second unix socket: ``stop``/``cont`` for
  pause/resume, ``query-status``, ``quit``.
* The serial console (and QEMU's own stderr) is read from a pipe into a bounded tail; the
  agent's ``agent.ready`` line on the console ends the boot wait, and the tail is the
  reason of a failed boot.

Networking: for any profile but ``isolated`` the bunker's network namespace is rewired for
a tap (:mod:`scaigrid.worker.vm.network`), QEMU runs inside that namespace
(``nsenter --net``) with a virtio-net device on the tap, and the guest takes the
namespace's address, route and resolver; ``isolated`` bunkers get no NIC (loopback only).

State per bunker: ``data_dir/qemu/<bunker_id>/`` (0700) with the sockets, the scratch
disk and ``qemu.pid``; :meth:`QemuDriver.stop` works from the id alone and kills a QEMU
left by an earlier worker process (its command line must name the directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from pyroute2.netlink.exceptions import NetlinkError
from qemu.qmp import QMPClient, QMPError

from scaigrid.agent.serial import host_handshake
from scaigrid.ids import is_id
from scaigrid.worker.drivers.base import BunkerHandle, BunkerSpec, DriverError, DriverInfo
from scaigrid.worker.rootfs.idshift import DEFAULT_ID_BASE
from scaigrid.worker.vm.artifacts import (
    VmArtifactError,
    VmArtifacts,
    ensure_vm_artifacts,
    host_tsc_khz,
)
from scaigrid.worker.vm.console import Console, clean
from scaigrid.worker.vm.disks import (
    DiskError,
    base_disk_path,
    boot_script,
    drop_scratch_layer,
    guest_agent_argv,
    prepare_guest_disks,
    remove_tree,
    scratch_layer,
)
from scaigrid.worker.vm.network import (
    TAP,
    GuestNetwork,
    VmNetworkError,
    attach_tap,
    guest_network_script,
)

log = structlog.get_logger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
AGENT_PORT_NAME = "agent"
#: Seconds from QEMU start to ``agent.ready`` before the boot counts as failed.
BOOT_TIMEOUT_S = 90.0
#: Seconds the KVM probe may take before KVM counts as unusable.
KVM_PROBE_TIMEOUT_S = 10.0
QMP_TIMEOUT_S = 10.0
#: Seconds the agent may take to answer the serial handshake of a new connection.
HANDSHAKE_TIMEOUT_S = 10.0
#: Seconds ``quit`` may take before QEMU is killed.
QUIT_TIMEOUT_S = 3.0
#: Guest RAM floor in MiB: the kernel plus the Python agent need this much to boot.
MIN_MEMORY_MB = 192


@dataclass(frozen=True)
class Drive:
    """A virtio-blk disk (``/dev/vdX`` in attach order)."""

    id: str
    path: Path
    readonly: bool = False


@dataclass(frozen=True)
class SerialPort:
    """A virtio-serial port backed by a unix socket QEMU listens on."""

    name: str
    socket: Path


@dataclass(frozen=True)
class Nic:
    """A virtio-net device backed by an existing tap device."""

    tap: str
    mac: str


@dataclass(frozen=True)
class MachineConfig:
    """Everything :func:`qemu_argv` turns into a command line.

    Attributes:
        accel: ``kvm`` or ``tcg``.
        vcpus: virtual CPUs.
        memory_mb: guest RAM in MiB.
        kernel: PVH ``vmlinux``; initramfs: its initramfs.
        cmdline: kernel command line.
        qmp_socket: QMP unix socket QEMU listens on.
        drives: disks, in ``/dev/vdX`` order.
        ports: virtio-serial ports.
        nics: virtio-net devices on tap devices of ``netns_path``.
        netns_path: network namespace QEMU runs in (``nsenter --net``), if any.
    """

    accel: str
    vcpus: int
    memory_mb: int
    kernel: Path
    initramfs: Path
    cmdline: str
    qmp_socket: Path | None = None
    drives: tuple[Drive, ...] = ()
    ports: tuple[SerialPort, ...] = ()
    nics: tuple[Nic, ...] = ()
    netns_path: str | None = None
    extra: tuple[str, ...] = field(default=())


def kernel_cmdline(tsc_khz: int, *extra: str) -> str:
    """Guest kernel command line: console on ttyS0, no reboot on panic, the host TSC."""
    return " ".join(("console=ttyS0", "quiet", "panic=-1", f"tsc_early_khz={tsc_khz}", *extra))


def qemu_argv(machine: MachineConfig, binary: str = QEMU_BINARY) -> list[str]:
    """The QEMU command line for ``machine`` (serial console on stdout)."""
    prefix = ["nsenter", f"--net={machine.netns_path}", "--"] if machine.netns_path else []
    argv = [
        *prefix,
        binary,
        "-accel",
        machine.accel,
        "-M",
        "microvm,acpi=on",
        "-m",
        str(machine.memory_mb),
        "-smp",
        str(machine.vcpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(machine.kernel),
        "-initrd",
        str(machine.initramfs),
        "-append",
        machine.cmdline,
        "-serial",
        "stdio",
    ]
    if machine.qmp_socket is not None:
        argv += ["-qmp", f"unix:{machine.qmp_socket},server=on,wait=off"]
    for drive in machine.drives:
        options = [f"id={drive.id}", f"file={drive.path}", "format=raw", "if=none"]
        options += ["readonly=on"] if drive.readonly else ["cache=unsafe"]
        argv += ["-drive", ",".join(options), "-device", f"virtio-blk-device,drive={drive.id}"]
    if machine.ports:
        argv += ["-device", "virtio-serial-device"]
    for index, port in enumerate(machine.ports):
        chardev = f"port{index}"
        argv += [
            "-chardev",
            f"socket,id={chardev},path={port.socket},server=on,wait=off",
            "-device",
            f"virtserialport,chardev={chardev},name={port.name}",
        ]
    for index, nic in enumerate(machine.nics):
        argv += [
            "-netdev",
            f"tap,id=net{index},ifname={nic.tap},script=no,downscript=no",
            "-device",
            f"virtio-net-device,netdev=net{index},mac={nic.mac}",
        ]
    return [*argv, *machine.extra]


def probe_accel(artifacts: VmArtifacts, binary: str = QEMU_BINARY) -> str:
    """``kvm`` when ``/dev/kvm`` boots the guest kernel to a trivial init that powers off
    within :data:`KVM_PROBE_TIMEOUT_S`, else ``tcg`` (blocking)."""
    if not os.path.exists("/dev/kvm"):
        return "tcg"
    machine = MachineConfig(
        accel="kvm",
        vcpus=1,
        memory_mb=256,
        kernel=artifacts.kernel,
        initramfs=artifacts.initramfs,
        cmdline=kernel_cmdline(host_tsc_khz(), "rdinit=/bin/busybox", "--", "poweroff", "-f"),
    )
    try:
        result = subprocess.run(
            qemu_argv(machine, binary),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=KVM_PROBE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        log.info("qemu.kvm_unusable", reason="the probe guest did not power off in time")
        return "tcg"
    if result.returncode != 0:
        log.info("qemu.kvm_unusable", reason=clean(result.stdout + result.stderr)[-300:])
        return "tcg"
    return "kvm"


class QemuHandle:
    """A running QEMU microVM (see :class:`~scaigrid.worker.drivers.base.BunkerHandle`)."""

    def __init__(self, bunker_id: str, state_dir: Path, process: asyncio.subprocess.Process):
        self.bunker_id = bunker_id
        self.state_dir = state_dir
        self.process = process
        self.console = Console()
        self.qmp: QMPClient | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def agent_socket(self) -> Path:
        """Unix socket of the agent's virtio-serial port."""
        return self.state_dir / "agent.sock"

    @property
    def qmp_socket(self) -> Path:
        """QMP unix socket."""
        return self.state_dir / "qmp.sock"

    def start_console(self) -> None:
        """Start reading the console into the tail (and watching for the ready line)."""
        if self.process.stdout is not None:
            self._reader = asyncio.get_running_loop().create_task(
                self.console.read(self.process.stdout)
            )

    async def open_agent_stream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to the agent's port socket and resynchronise the stream
        (:func:`scaigrid.agent.serial.host_handshake`).

        Raises:
            ConnectionError: QEMU is gone or not listening, or the agent did not answer
                the handshake (:class:`~scaigrid.agent.serial.HandshakeError`).
        """
        if self.process.returncode is not None:
            raise ConnectionError(f"the VM of {self.bunker_id} has exited")
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.agent_socket))
        except OSError as exc:
            raise ConnectionError(f"the agent port of {self.bunker_id}: {exc}") from exc
        try:
            await host_handshake(reader, writer, HANDSHAKE_TIMEOUT_S)
        except BaseException:
            writer.close()
            raise
        return reader, writer

    async def wait_exit(self) -> int:
        """Wait until QEMU exits (guest power-off, panic or kill); return its status."""
        status = await self.process.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        return status

    async def qmp_execute(self, command: str) -> object:
        """Run one QMP command (connecting on first use).

        Raises:
            DriverError: QMP is unreachable or the command failed.
        """
        try:
            async with asyncio.timeout(QMP_TIMEOUT_S):
                if self.qmp is None:
                    client = QMPClient(self.bunker_id)
                    await client.connect(str(self.qmp_socket))
                    self.qmp = client
                return await self.qmp.execute(command)
        except (QMPError, OSError, TimeoutError) as exc:
            raise DriverError(f"QMP {command} failed for {self.bunker_id}: {exc}") from exc

    async def close_qmp(self) -> None:
        """Disconnect QMP, if connected."""
        if self.qmp is not None:
            # After ``quit`` the server hangs up first; the client reports that as EOF.
            with contextlib.suppress(QMPError, OSError, EOFError):
                await self.qmp.disconnect()
            self.qmp = None


class QemuDriver:
    """Runs bunkers as QEMU microVMs (see the module docstring).

    Args:
        data_dir: worker data directory (state under ``qemu/``, baked disks under
            ``vm-cache/``).
        kernel: configured guest ``vmlinux``; initramfs: its initramfs (both or neither;
            derived from Debian's cloud kernel when unset).
        accel: ``kvm`` or ``tcg``; probed when ``None``.
        id_base: host id of the image trees' root owner (their owners are shifted back).
        boot_timeout_s: seconds from QEMU start to the agent's ready line.

    Raises:
        DriverError: QEMU is not installed or the guest kernel/initramfs is unavailable.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        kernel: Path | None = None,
        initramfs: Path | None = None,
        accel: str | None = None,
        id_base: int = DEFAULT_ID_BASE,
        boot_timeout_s: float = BOOT_TIMEOUT_S,
        binary: str = QEMU_BINARY,
    ) -> None:
        if shutil.which(binary) is None:
            raise DriverError(f"{binary} is not installed (Debian package qemu-system-x86)")
        self.data_dir = Path(data_dir).resolve()
        self.binary = binary
        self.cache_dir = self.data_dir / "vm-cache"
        try:
            self.artifacts = ensure_vm_artifacts(self.cache_dir, kernel=kernel, initramfs=initramfs)
            self.tsc_khz = host_tsc_khz()
        except VmArtifactError as exc:
            raise DriverError(str(exc)) from exc
        self.accel = accel or probe_accel(self.artifacts, binary)
        self.id_base = id_base
        #: Owners in a guest's writable layer are the guest's own ids (snapshots).
        self.layer_id_base = 0
        self.boot_timeout_s = boot_timeout_s
        self.info = DriverInfo(name="qemu", isolation="microvm", accel=self.accel)
        self._bunkers_dir = self.data_dir / "qemu"
        self._bunkers_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._handles: dict[str, QemuHandle] = {}
        log.info("qemu.driver_ready", accel=self.accel, kernel=str(self.artifacts.kernel))

    def _state_dir(self, bunker_id: str) -> Path:
        if not is_id(bunker_id, "bnk"):
            raise DriverError(f"not a bunker id: {bunker_id!r}")
        return self._bunkers_dir / bunker_id

    async def start(self, spec: BunkerSpec) -> QemuHandle:
        """Boot a microVM for ``spec``; return once its agent logged ``agent.ready``.

        Raises:
            DriverError: the network namespace could not be rewired, a disk could not be
                made, QEMU failed, or the agent was not ready
                within ``boot_timeout_s`` (the message ends with the console tail);
                nothing is left behind.
        """
        state_dir = self._state_dir(spec.bunker_id)
        if spec.agent_runtime is None:
            raise DriverError("the qemu driver needs the agent runtime")
        await asyncio.to_thread(remove_tree, state_dir)
        await asyncio.to_thread(state_dir.mkdir, 0o700)
        try:
            network = await self._attach_network(spec)
            machine = await self._prepare(spec, state_dir, network)
            handle = await self._launch(spec.bunker_id, state_dir, machine)
        except BaseException:
            await self.stop(spec.bunker_id)
            raise
        return handle

    @staticmethod
    async def _attach_network(spec: BunkerSpec) -> GuestNetwork | None:
        if spec.netns_path is None:
            return None
        try:
            return await asyncio.to_thread(attach_tap, spec.netns_path, spec.bunker_id)
        except (VmNetworkError, NetlinkError, OSError) as exc:
            raise DriverError(f"cannot give the VM its network: {exc}") from exc

    async def _prepare(
        self, spec: BunkerSpec, state_dir: Path, network: GuestNetwork | None
    ) -> MachineConfig:
        assert spec.agent_runtime is not None
        try:
            boot = boot_script(
                guest_agent_argv(spec.init_argv, ("--serial", AGENT_PORT_NAME)),
                spec.env,
                spec.hostname,
                network=guest_network_script(network) if network is not None else (),
            )
            disks = await prepare_guest_disks(
                rootfs=spec.rootfs,
                agent_runtime=spec.agent_runtime,
                cache_dir=self.cache_dir,
                state_dir=state_dir,
                id_base=self.id_base,
                disk_mb=spec.resources.disk_mb,
                boot_sh=boot,
                populate_upper=spec.populate_upper,
            )
        except DiskError as exc:
            raise DriverError(str(exc)) from exc
        return MachineConfig(
            accel=self.accel,
            vcpus=max(1, math.ceil(spec.resources.cpu_millicores / 1000)),
            memory_mb=max(MIN_MEMORY_MB, spec.resources.memory_mb),
            kernel=self.artifacts.kernel,
            initramfs=self.artifacts.initramfs,
            cmdline=kernel_cmdline(self.tsc_khz),
            qmp_socket=state_dir / "qmp.sock",
            drives=(
                Drive("base", disks.base, readonly=True),
                Drive("scratch", disks.scratch),
                Drive("runtime", disks.runtime, readonly=True),
            ),
            ports=(SerialPort(AGENT_PORT_NAME, state_dir / "agent.sock"),),
            nics=(Nic(TAP, network.mac),) if network is not None else (),
            netns_path=spec.netns_path,
        )

    def base_disk_path(self, rootfs: Path) -> Path:
        """Where the base ext4 of the image tree ``rootfs`` is cached."""
        return base_disk_path(self.cache_dir, rootfs, self.id_base)

    async def _launch(self, bunker_id: str, state_dir: Path, machine: MachineConfig) -> QemuHandle:
        started = time.monotonic()
        try:
            process = await asyncio.create_subprocess_exec(
                *qemu_argv(machine, self.binary),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=state_dir,
            )
        except OSError as exc:
            raise DriverError(f"cannot start {self.binary}: {exc}") from exc
        (state_dir / "qemu.pid").write_text(f"{process.pid}\n")
        handle = QemuHandle(bunker_id, state_dir, process)
        self._handles[bunker_id] = handle
        handle.start_console()
        ready = asyncio.ensure_future(handle.console.ready.wait())
        exited = asyncio.ensure_future(process.wait())
        try:
            await asyncio.wait(
                {ready, exited}, timeout=self.boot_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ready.cancel()
            exited.cancel()
        if not handle.console.ready.is_set():
            if process.returncode is None:
                reason = f"the guest agent was not ready within {self.boot_timeout_s:.0f} s"
            else:
                await handle.wait_exit()
                reason = f"the VM exited during boot (status {process.returncode})"
            raise DriverError(f"{reason}; console: {handle.console.tail()}")
        log.info(
            "qemu.booted",
            bunker_id=bunker_id,
            accel=machine.accel,
            boot_ms=round((time.monotonic() - started) * 1000),
        )
        return handle

    def _own(self, handle: BunkerHandle) -> QemuHandle:
        own = self._handles.get(handle.bunker_id)
        if own is None:
            raise DriverError(f"bunker {handle.bunker_id} is not running on this worker")
        return own

    async def status(self, handle: BunkerHandle) -> str:
        """QMP run state: ``running``, ``paused``, ``shutdown``, ...

        Raises:
            DriverError: QMP is unreachable.
        """
        reply = await self._own(handle).qmp_execute("query-status")
        if not isinstance(reply, dict) or not isinstance(reply.get("status"), str):
            raise DriverError(f"unexpected query-status reply: {reply!r}")
        return str(reply["status"])

    async def pause(self, handle: BunkerHandle) -> None:
        """Stop the vCPUs (QMP ``stop``; idempotent).

        Raises:
            DriverError: the bunker is not running here or QMP failed.
        """
        await self._own(handle).qmp_execute("stop")

    async def resume(self, handle: BunkerHandle) -> None:
        """Restart the vCPUs (QMP ``cont``; idempotent).

        Raises:
            DriverError: the bunker is not running here or QMP failed.
        """
        await self._own(handle).qmp_execute("cont")

    @contextlib.asynccontextmanager
    async def frozen_layer(self, bunker_id: str) -> AsyncIterator[Path]:
        """Yield the VM's writable layer (the overlay ``upper`` directory on its scratch
        disk) as a host directory, for snapshots (:func:`~scaigrid.worker.vm.disks.
        scratch_layer`: a checked, read-only mounted copy; owners are the guest's ids,
        :attr:`layer_id_base` 0).

        Call it only while the VM is paused (QMP ``stop`` drains its disk I/O) and after
        the guest flushed its page cache (agent ``POST /v1/sync``).

        Raises:
            DriverError: the VM is not running here, or the layer could not be read (the
                copy could not be made or mounted, or ``e2fsck`` found damage it could not
                repair).
        """
        own = self._handles.get(bunker_id)
        if own is None or own.process.returncode is not None:
            raise DriverError(f"bunker {bunker_id} is not running on this worker")
        try:
            async with scratch_layer(own.state_dir / "scratch.ext4", own.state_dir) as upper:
                yield upper
        except DiskError as exc:
            raise DriverError(f"cannot read the writable layer of {bunker_id}: {exc}") from exc

    async def stop(self, bunker_id: str) -> None:
        """Quit (or kill) the VM and remove its state directory (idempotent; works from the
        id alone, also for a QEMU left by an earlier worker process).

        Raises:
            DriverError: ``bunker_id`` is not a bunker id.
        """
        state_dir = self._state_dir(bunker_id)
        handle = self._handles.pop(bunker_id, None)
        if handle is not None:
            if handle.process.returncode is None:
                with contextlib.suppress(DriverError):
                    async with asyncio.timeout(QUIT_TIMEOUT_S):
                        await handle.qmp_execute("quit")
                        await handle.process.wait()
            await handle.close_qmp()
            if handle.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    handle.process.kill()
            await handle.wait_exit()
        else:
            await asyncio.to_thread(_kill_leftover, state_dir)
        # A snapshot interrupted by a crash may have left its layer copy mounted.
        await drop_scratch_layer(state_dir)
        await asyncio.to_thread(remove_tree, state_dir)
        log.info("qemu.stopped", bunker_id=bunker_id)

    async def list_leftovers(self) -> list[str]:
        """Ids with a state directory but no live handle (pass each to :meth:`stop`)."""
        if not self._bunkers_dir.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self._bunkers_dir.iterdir()
            if is_id(entry.name, "bnk") and entry.name not in self._handles
        )


def _kill_leftover(state_dir: Path) -> None:
    """SIGKILL the QEMU recorded in ``state_dir/qemu.pid`` if it still runs for this
    directory (its command line names it), and wait until it is gone."""
    try:
        pid = int((state_dir / "qemu.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if str(state_dir).encode() not in cmdline:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if not os.path.exists(f"/proc/{pid}"):
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.01)

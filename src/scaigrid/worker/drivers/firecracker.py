"""The ``firecracker`` driver: one Firecracker microVM per bunker (isolation ``microvm``).

Built against Firecracker's REST API on a unix socket (pinned: v1.16.1, the OpenAPI file
``firecracker-swagger.yaml``; every body this driver sends is checked against it in the
tests). Boot, per bunker (state in ``data_dir/firecracker/<bunker_id>/``, mode 0700):

1. the same guest as the ``qemu`` driver (:mod:`scaigrid.worker.vm`): PVH ``vmlinux``,
   initramfs, ``/dev/vda`` base ext4 (read-only), ``/dev/vdb`` scratch ext4, ``/dev/vdc``
   agent runtime (read-only), ``tsc_early_khz`` on the command line;
2. ``firecracker --api-sock api.sock`` (or, with ``jailer`` set, ``jailer --id <bunker>
   --exec-file <firecracker> --uid --gid --chroot-base-dir <dir> -- --api-sock ...``, with
   every file hard-linked into the chroot and API paths given relative to it);
3. ``PUT /machine-config``, ``PUT /boot-source``, ``PUT /drives/{rootfs,scratch,runtime}``,
   ``PUT /network-interfaces/eth0`` (with a network), ``PUT /vsock`` (guest CID 3,
   ``uds_path`` in the state dir), then ``PUT /actions`` ``InstanceStart``;
4. wait for the agent's ``agent.ready`` line on the serial console (Firecracker's stdout).

The agent listens on vsock port :data:`AGENT_VSOCK_PORT`; the host connects to the vsock
unix socket and sends ``CONNECT <port>\\n``, Firecracker answers ``OK <host port>\\n`` and
the stream is the agent's (a fresh connection each time, so no resync handshake).
Pause/resume are ``PATCH /vm {"state": "Paused"|"Resumed"}``. Stop kills the process and
removes the state (and chroot) directory; it works from the id alone. Snapshots read the
paused guest's writable layer from a checked copy of the scratch disk the VMM writes
(:func:`~scaigrid.worker.vm.disks.scratch_layer`), and a restore fills a new scratch disk,
as for ``qemu``.

Networking: for any profile but ``isolated`` the bunker's namespace is rewired for a tap
(:mod:`scaigrid.worker.vm.network`), Firecracker runs in that namespace (``nsenter
--net``) with ``PUT /network-interfaces/eth0`` on the tap, and the guest takes the
namespace's address, route and resolver.
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
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import structlog
from pyroute2.netlink.exceptions import NetlinkError

from scaigrid.ids import is_id
from scaigrid.worker.drivers.base import BunkerHandle, BunkerSpec, DriverError, DriverInfo
from scaigrid.worker.rootfs.idshift import DEFAULT_ID_BASE
from scaigrid.worker.vm.artifacts import (
    VmArtifactError,
    ensure_vm_artifacts,
    host_tsc_khz,
)
from scaigrid.worker.vm.console import Console
from scaigrid.worker.vm.disks import (
    DiskError,
    GuestDisks,
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

FIRECRACKER_BINARY = "firecracker"
AGENT_VSOCK_PORT = 1024
GUEST_CID = 3
BOOT_TIMEOUT_S = 30.0
#: Seconds for Firecracker to create its API socket, and for one API call.
API_TIMEOUT_S = 5.0
#: Seconds for the ``CONNECT`` handshake on the vsock socket.
CONNECT_TIMEOUT_S = 5.0
MIN_MEMORY_MB = 192
#: Firecracker accepts 1 or an even number of vCPUs, at most 32.
MAX_VCPUS = 32


def vcpu_count(cpu_millicores: int) -> int:
    """vCPUs for ``cpu_millicores``: rounded up, then up to an even number (Firecracker
    accepts 1 or an even count), capped at :data:`MAX_VCPUS`."""
    count = max(1, math.ceil(cpu_millicores / 1000))
    if count > 1 and count % 2:
        count += 1
    return min(count, MAX_VCPUS)


def api_calls(
    *,
    kernel: str,
    initramfs: str,
    boot_args: str,
    vcpus: int,
    memory_mb: int,
    disks: Mapping[str, tuple[str, bool]],
    vsock_uds: str,
    nic: tuple[str, str] | None = None,
) -> list[tuple[str, str, dict[str, Any]]]:
    """The configuration calls before ``InstanceStart``: ``[(method, path, body)]``.

    Args:
        kernel, initramfs: paths as Firecracker sees them.
        boot_args: kernel command line.
        vcpus, memory_mb: machine size.
        disks: ``{drive_id: (path, read_only)}`` in ``/dev/vdX`` order.
        vsock_uds: vsock unix socket path as Firecracker sees it.
        nic: ``(tap device, guest MAC)`` of the guest's ``eth0``, if any.
    """
    calls: list[tuple[str, str, dict[str, Any]]] = [
        (
            "PUT",
            "/machine-config",
            {"vcpu_count": vcpus, "mem_size_mib": memory_mb, "smt": False},
        ),
        (
            "PUT",
            "/boot-source",
            {"kernel_image_path": kernel, "initrd_path": initramfs, "boot_args": boot_args},
        ),
    ]
    for drive_id, (path, read_only) in disks.items():
        calls.append(
            (
                "PUT",
                f"/drives/{drive_id}",
                {
                    "drive_id": drive_id,
                    "path_on_host": path,
                    "is_root_device": False,
                    "is_read_only": read_only,
                    "cache_type": "Unsafe",
                },
            )
        )
    if nic is not None:
        calls.append(
            (
                "PUT",
                "/network-interfaces/eth0",
                {"iface_id": "eth0", "host_dev_name": nic[0], "guest_mac": nic[1]},
            )
        )
    calls.append(("PUT", "/vsock", {"guest_cid": GUEST_CID, "uds_path": vsock_uds}))
    return calls


class FirecrackerHandle:
    """A running Firecracker microVM (see :class:`BunkerHandle`)."""

    def __init__(
        self,
        bunker_id: str,
        state_dir: Path,
        process: asyncio.subprocess.Process,
        api_socket: Path,
        vsock_socket: Path,
    ) -> None:
        self.bunker_id = bunker_id
        self.state_dir = state_dir
        self.process = process
        self.api_socket = api_socket
        self.vsock_socket = vsock_socket
        #: The scratch disk the VMM writes (the chroot's hard link or copy when jailed).
        self.scratch_disk = state_dir / "scratch.ext4"
        self.console = Console()
        self._reader: asyncio.Task[None] | None = None

    def start_console(self) -> None:
        """Start reading the serial console (Firecracker's stdout)."""
        if self.process.stdout is not None:
            self._reader = asyncio.get_running_loop().create_task(
                self.console.read(self.process.stdout)
            )

    async def api(self, method: str, path: str, body: Mapping[str, Any]) -> None:
        """One API call; Firecracker answers 204 on success.

        Raises:
            DriverError: transport failure or an error answer (with its ``fault_message``).
        """
        transport = httpx.AsyncHTTPTransport(uds=str(self.api_socket))
        try:
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost", timeout=API_TIMEOUT_S
            ) as client:
                response = await client.request(method, path, json=dict(body))
        except httpx.HTTPError as exc:
            raise DriverError(f"Firecracker API {method} {path} failed: {exc}") from exc
        if response.status_code >= 300:
            try:
                fault = str(response.json().get("fault_message", ""))
            except ValueError:
                fault = response.text[:300]
            raise DriverError(
                f"Firecracker API {method} {path} answered {response.status_code}: {fault}"
            )

    async def open_agent_stream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to the agent's vsock port through Firecracker's ``CONNECT`` handshake.

        Raises:
            ConnectionError: the VM is gone or the handshake failed.
        """
        if self.process.returncode is not None:
            raise ConnectionError(f"the VM of {self.bunker_id} has exited")
        return await vsock_connect(self.vsock_socket, AGENT_VSOCK_PORT)

    async def wait_exit(self) -> int:
        """Wait until Firecracker exits; return its status."""
        status = await self.process.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        return status


async def vsock_connect(
    uds: Path, port: int, timeout_s: float = CONNECT_TIMEOUT_S
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a host-initiated vsock connection: ``CONNECT <port>\\n`` on Firecracker's vsock
    unix socket, expecting ``OK <host port>\\n`` (Firecracker's vsock design document).

    Raises:
        ConnectionError: the socket is unreachable or the answer is not ``OK``.
    """
    try:
        reader, writer = await asyncio.open_unix_connection(str(uds))
    except OSError as exc:
        raise ConnectionError(f"vsock socket {uds}: {exc}") from exc
    try:
        writer.write(f"CONNECT {port}\n".encode())
        async with asyncio.timeout(timeout_s):
            await writer.drain()
            answer = await reader.readuntil(b"\n")
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        writer.close()
        raise ConnectionError(f"vsock CONNECT {port} got no answer: {exc!r}") from exc
    parts = answer.split()
    if len(parts) != 2 or parts[0] != b"OK" or not parts[1].isdigit():
        writer.close()
        raise ConnectionError(f"vsock CONNECT {port} refused: {answer[:80]!r}")
    return reader, writer


class FirecrackerDriver:
    """Runs bunkers as Firecracker microVMs (see the module docstring).

    Args:
        data_dir: worker data directory (state under ``firecracker/``, disks under
            ``vm-cache/``).
        binary: the ``firecracker`` executable (looked up in ``PATH``).
        jailer: the ``jailer`` executable, or ``None`` to run Firecracker directly.
        jail_uid, jail_gid: ids the jailer drops to.
        kernel, initramfs: configured guest files (both or neither).
        id_base: host id of the image trees' root owner.
        boot_timeout_s: seconds from ``InstanceStart`` to the agent's ready line.
        require_kvm: refuse to construct without a read-write ``/dev/kvm`` (tests of the API
            sequence against a fake binary turn this off).

    Raises:
        DriverError: no binary, no usable ``/dev/kvm``, or no guest kernel.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        binary: str = FIRECRACKER_BINARY,
        jailer: str | None = None,
        jail_uid: int = 65534,
        jail_gid: int = 65534,
        kernel: Path | None = None,
        initramfs: Path | None = None,
        id_base: int = DEFAULT_ID_BASE,
        boot_timeout_s: float = BOOT_TIMEOUT_S,
        require_kvm: bool = True,
    ) -> None:
        found = shutil.which(binary)
        if found is None:
            raise DriverError(f"{binary} is not installed")
        self.binary = found
        self.jailer = shutil.which(jailer) if jailer else None
        if jailer and self.jailer is None:
            raise DriverError(f"jailer {jailer} is not installed")
        if require_kvm and not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise DriverError("/dev/kvm is missing or not accessible")
        self.data_dir = Path(data_dir).resolve()
        self.cache_dir = self.data_dir / "vm-cache"
        try:
            self.artifacts = ensure_vm_artifacts(self.cache_dir, kernel=kernel, initramfs=initramfs)
            self.tsc_khz = host_tsc_khz()
        except VmArtifactError as exc:
            raise DriverError(str(exc)) from exc
        self.jail_uid, self.jail_gid = jail_uid, jail_gid
        self.id_base = id_base
        #: Owners in a guest's writable layer are the guest's own ids (snapshots).
        self.layer_id_base = 0
        self.boot_timeout_s = boot_timeout_s
        self.info = DriverInfo(name="firecracker", isolation="microvm", accel="kvm")
        self._bunkers_dir = self.data_dir / "firecracker"
        self._bunkers_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._handles: dict[str, FirecrackerHandle] = {}

    def _state_dir(self, bunker_id: str) -> Path:
        if not is_id(bunker_id, "bnk"):
            raise DriverError(f"not a bunker id: {bunker_id!r}")
        return self._bunkers_dir / bunker_id

    async def start(self, spec: BunkerSpec) -> FirecrackerHandle:
        """Boot a microVM for ``spec``; return once its agent logged ``agent.ready``.

        Raises:
            DriverError: the network namespace could not be rewired, or disks, the API
                or the boot failed (a boot failure ends with the
                console tail); nothing is left behind.
        """
        state_dir = self._state_dir(spec.bunker_id)
        if spec.agent_runtime is None:
            raise DriverError("the firecracker driver needs the agent runtime")
        await asyncio.to_thread(remove_tree, state_dir)
        await asyncio.to_thread(state_dir.mkdir, 0o700)
        try:
            network = await self._attach_network(spec)
            try:
                disks = await prepare_guest_disks(
                    rootfs=spec.rootfs,
                    agent_runtime=spec.agent_runtime,
                    cache_dir=self.cache_dir,
                    state_dir=state_dir,
                    id_base=self.id_base,
                    disk_mb=spec.resources.disk_mb,
                    boot_sh=boot_script(
                        guest_agent_argv(spec.init_argv, ("--vsock", str(AGENT_VSOCK_PORT))),
                        spec.env,
                        spec.hostname,
                        network=guest_network_script(network) if network is not None else (),
                    ),
                    populate_upper=spec.populate_upper,
                )
            except DiskError as exc:
                raise DriverError(str(exc)) from exc
            return await self._boot(spec, state_dir, disks, network)
        except BaseException:
            await self.stop(spec.bunker_id)
            raise

    def _jail_dir(self, bunker_id: str) -> Path:
        """``<chroot base>/<exec file name>/<id>``, the jailer's layout (the chroot base is
        ``data_dir/jail``, short enough for unix socket paths inside it)."""
        return self.data_dir / "jail" / Path(self.binary).name / bunker_id

    @staticmethod
    async def _attach_network(spec: BunkerSpec) -> GuestNetwork | None:
        if spec.netns_path is None:
            return None
        try:
            return await asyncio.to_thread(attach_tap, spec.netns_path, spec.bunker_id)
        except (VmNetworkError, NetlinkError, OSError) as exc:
            raise DriverError(f"cannot give the VM its network: {exc}") from exc

    async def _boot(
        self,
        spec: BunkerSpec,
        state_dir: Path,
        disks: GuestDisks,
        network: GuestNetwork | None,
    ) -> FirecrackerHandle:
        files = {
            "kernel": self.artifacts.kernel,
            "initramfs": self.artifacts.initramfs,
            "rootfs": disks.base,
            "scratch": disks.scratch,
            "runtime": disks.runtime,
        }
        if self.jailer is not None:
            root = self._jail_dir(spec.bunker_id) / "root"
            await asyncio.to_thread(_stage_jail, root, files, self.jail_uid, self.jail_gid)
            seen = {name: f"/{name}" for name in files}
            api_socket, vsock_socket = root / "api.sock", root / "vsock.sock"
            api_path, vsock_path = "/api.sock", "/vsock.sock"
            argv = [
                self.jailer,
                "--id",
                spec.bunker_id,
                "--exec-file",
                self.binary,
                "--uid",
                str(self.jail_uid),
                "--gid",
                str(self.jail_gid),
                "--chroot-base-dir",
                str(self.data_dir / "jail"),
                "--",
                "--api-sock",
                api_path,
            ]
        else:
            seen = {name: str(path) for name, path in files.items()}
            api_socket, vsock_socket = state_dir / "api.sock", state_dir / "vsock.sock"
            vsock_path = str(vsock_socket)
            argv = [self.binary, "--api-sock", str(api_socket)]
        if spec.netns_path is not None:
            argv = ["nsenter", f"--net={spec.netns_path}", "--", *argv]
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=state_dir,
            )
        except OSError as exc:
            raise DriverError(f"cannot start {argv[0]}: {exc}") from exc
        (state_dir / "vmm.pid").write_text(f"{process.pid}\n")
        handle = FirecrackerHandle(spec.bunker_id, state_dir, process, api_socket, vsock_socket)
        if self.jailer is not None:
            handle.scratch_disk = root / "scratch"
        self._handles[spec.bunker_id] = handle
        handle.start_console()
        await self._wait_api(handle)
        started = time.monotonic()
        calls = api_calls(
            kernel=seen["kernel"],
            initramfs=seen["initramfs"],
            boot_args=" ".join(
                ("console=ttyS0", "quiet", "panic=-1", "reboot=k", f"tsc_early_khz={self.tsc_khz}")
            ),
            vcpus=vcpu_count(spec.resources.cpu_millicores),
            memory_mb=max(MIN_MEMORY_MB, spec.resources.memory_mb),
            disks={
                "rootfs": (seen["rootfs"], True),
                "scratch": (seen["scratch"], False),
                "runtime": (seen["runtime"], True),
            },
            vsock_uds=vsock_path,
            nic=(TAP, network.mac) if network is not None else None,
        )
        for method, path, body in calls:
            await handle.api(method, path, body)
        await handle.api("PUT", "/actions", {"action_type": "InstanceStart"})
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
            "firecracker.booted",
            bunker_id=spec.bunker_id,
            boot_ms=round((time.monotonic() - started) * 1000),
        )
        return handle

    async def _wait_api(self, handle: FirecrackerHandle) -> None:
        deadline = time.monotonic() + API_TIMEOUT_S
        while not handle.api_socket.exists():
            if handle.process.returncode is not None or time.monotonic() > deadline:
                await asyncio.sleep(0.05)
                raise DriverError(
                    f"Firecracker did not create its API socket; output: {handle.console.tail()}"
                )
            await asyncio.sleep(0.01)

    def _own(self, handle: BunkerHandle) -> FirecrackerHandle:
        own = self._handles.get(handle.bunker_id)
        if own is None:
            raise DriverError(f"bunker {handle.bunker_id} is not running on this worker")
        return own

    async def pause(self, handle: BunkerHandle) -> None:
        """``PATCH /vm {"state": "Paused"}`` (idempotent).

        Raises:
            DriverError: not running here, or the API refused.
        """
        await self._own(handle).api("PATCH", "/vm", {"state": "Paused"})

    async def resume(self, handle: BunkerHandle) -> None:
        """``PATCH /vm {"state": "Resumed"}`` (idempotent).

        Raises:
            DriverError: not running here, or the API refused.
        """
        await self._own(handle).api("PATCH", "/vm", {"state": "Resumed"})

    @contextlib.asynccontextmanager
    async def frozen_layer(self, bunker_id: str) -> AsyncIterator[Path]:
        """Yield the VM's writable layer as a host directory, for snapshots (see
        :meth:`QemuDriver.frozen_layer <scaigrid.worker.drivers.qemu.QemuDriver.frozen_layer>`);
        call it only while the VM is paused and after the guest synced.

        Raises:
            DriverError: the VM is not running here, or the layer could not be read.
        """
        own = self._handles.get(bunker_id)
        if own is None or own.process.returncode is not None:
            raise DriverError(f"bunker {bunker_id} is not running on this worker")
        try:
            async with scratch_layer(own.scratch_disk, own.state_dir) as upper:
                yield upper
        except DiskError as exc:
            raise DriverError(f"cannot read the writable layer of {bunker_id}: {exc}") from exc

    async def stop(self, bunker_id: str) -> None:
        """Kill the VMM and remove the state directory (idempotent; from the id alone).

        Raises:
            DriverError: ``bunker_id`` is not a bunker id.
        """
        state_dir = self._state_dir(bunker_id)
        handle = self._handles.pop(bunker_id, None)
        if handle is not None:
            if handle.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    handle.process.kill()
            await handle.wait_exit()
        else:
            await asyncio.to_thread(_kill_leftover, state_dir)
        await drop_scratch_layer(state_dir)
        await asyncio.to_thread(remove_tree, self._jail_dir(bunker_id))
        await asyncio.to_thread(remove_tree, state_dir)

    async def list_leftovers(self) -> list[str]:
        """Ids with a state directory but no live handle (pass each to :meth:`stop`)."""
        if not self._bunkers_dir.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self._bunkers_dir.iterdir()
            if is_id(entry.name, "bnk") and entry.name not in self._handles
        )


def _stage_jail(root: Path, files: Mapping[str, Path], uid: int, gid: int) -> None:
    """Link (or copy, across filesystems) ``files`` into the jail root as ``/<name>``;
    writable ones are given to the jailed ids."""
    root.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        target = root / name
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
        if name == "scratch":
            os.chown(target, uid, gid)
    os.chown(root, uid, gid)


def _kill_leftover(state_dir: Path) -> None:
    """SIGKILL the VMM recorded in ``state_dir/vmm.pid`` if it still runs for this bunker
    (its command line names the bunker's directory or id)."""
    try:
        pid = int((state_dir / "vmm.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if str(state_dir).encode() not in cmdline and state_dir.name.encode() not in cmdline:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if not os.path.exists(f"/proc/{pid}"):
            return
        time.sleep(0.01)

"""Fixtures for microVM tests: real QEMU microVMs (KVM when usable, else TCG), root only.

* ``vm_host_ready`` — skips (printing the reason) unless root, ``qemu-system-x86_64`` and
  the Debian cloud kernel are present.
* ``busybox_tree`` — a static busybox root, id-shifted like the worker's image cache.
* ``agent_runtime`` — the self-contained agent runtime (cached between runs).
* ``qemu_driver`` — one :class:`QemuDriver` per session (acceleration probed once).
* ``make_spec`` — ``make_spec(**overrides)`` builds a :class:`BunkerSpec` for a new id.
* ``vm`` — one booted VM per module with a connected :class:`AgentClient`.

At most one or two VMs run at a time (the CI machine has 2 cores).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from scaigrid.ids import new_id
from scaigrid.protocol.agent import AgentClient
from scaigrid.worker.drivers.base import BunkerSpec, Resources
from scaigrid.worker.drivers.qemu import QEMU_BINARY, QemuDriver, QemuHandle
from scaigrid.worker.rootfs.agent_runtime import agent_argv, agent_env, ensure_agent_runtime
from scaigrid.worker.rootfs.idshift import DEFAULT_ID_BASE, shift_tree
from scaigrid.worker.vm.artifacts import VmArtifactError, find_cloud_kernel

TEST_CACHE = Path("/var/cache/scaibunker-test")
#: Data dir kept between runs so the kernel, initramfs and runtime disk are built once.
VM_DATA = Path("/var/tmp/scaibunker-vm-test")


def vm_skip_reason() -> str | None:
    """Why real-VM tests cannot run here, or ``None``."""
    if os.geteuid() != 0:
        return "microVM tests need root"
    if shutil.which(QEMU_BINARY) is None:
        return f"{QEMU_BINARY} is not installed"
    try:
        find_cloud_kernel()
    except VmArtifactError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="session")
def vm_host_ready() -> None:
    reason = vm_skip_reason()
    if reason is not None:
        print(f"skipping microVM tests: {reason}")
        pytest.skip(reason)


def build_busybox_tree(top: Path) -> Path:
    """A static busybox root at ``top/rootfs`` (users root and user, a root-only file),
    id-shifted by :data:`DEFAULT_ID_BASE` like the worker's image cache."""
    root = top / "rootfs"
    (root / "bin").mkdir(parents=True)
    for sub in ("etc", "tmp", "proc", "sys", "dev", "home", "root"):
        (root / sub).mkdir()
    (root / "tmp").chmod(0o1777)
    busybox = shutil.which("busybox") or "/bin/busybox"
    shutil.copy2(busybox, root / "bin" / "busybox")
    applets = subprocess.run(
        [busybox, "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    for applet in applets:
        link = root / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\nuser:x:1000:\n")
    (root / "etc" / "owned-by-root").write_text("root only\n")
    (root / "etc" / "owned-by-root").chmod(0o600)
    shift_tree(root, DEFAULT_ID_BASE)
    return root


@pytest.fixture(scope="session")
def busybox_tree(vm_host_ready: None) -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="sbvm-tree-", dir="/var/tmp"))
    yield build_busybox_tree(top)
    shutil.rmtree(top, ignore_errors=True)
    # Base disks are keyed by the tree's inode: this session's are never used again.
    shutil.rmtree(VM_DATA / "vm-cache" / "base", ignore_errors=True)


@pytest.fixture(scope="session")
def agent_runtime(vm_host_ready: None) -> Path:
    return ensure_agent_runtime(TEST_CACHE)


@pytest.fixture(scope="session")
def qemu_driver(vm_host_ready: None) -> QemuDriver:
    VM_DATA.mkdir(mode=0o700, exist_ok=True)
    return QemuDriver(VM_DATA, boot_timeout_s=120)


SpecFactory = Callable[..., BunkerSpec]


@pytest.fixture(scope="session")
def make_spec(busybox_tree: Path, agent_runtime: Path) -> SpecFactory:
    def make(**overrides: Any) -> BunkerSpec:
        fields: dict[str, Any] = {
            "bunker_id": new_id("bnk"),
            "rootfs": busybox_tree,
            "resources": Resources(cpu_millicores=1000, memory_mb=384, disk_mb=64),
            "env": {**agent_env(), "GREETING": "it's a 'quoted' $value\nline two"},
            "hostname": "vmtest",
            "agent_runtime": agent_runtime,
            "init_argv": tuple(agent_argv("/.scaibunker-run/agent.sock")),
        }
        fields.update(overrides)
        return BunkerSpec(**fields)

    return make


@dataclass
class Vm:
    """A booted VM of the ``vm`` fixture."""

    spec: BunkerSpec
    handle: QemuHandle
    client: AgentClient


async def connect(handle: QemuHandle) -> AgentClient:
    """A new agent client over the VM's virtio-serial port."""
    reader, writer = await handle.open_agent_stream()
    return await AgentClient.connect(reader, writer, timeout_s=20)


@pytest.fixture(scope="module")
async def vm(qemu_driver: QemuDriver, make_spec: SpecFactory) -> AsyncIterator[Vm]:
    spec = make_spec()
    handle = await qemu_driver.start(spec)
    client = await connect(handle)
    try:
        yield Vm(spec, handle, client)
    finally:
        await client.close()
        await qemu_driver.stop(spec.bunker_id)

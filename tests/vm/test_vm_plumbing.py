"""The pieces of the microVM path that need no VM: kernel modules, initramfs, boot script,
QEMU command line, agent options, and the serial channel's resynchronising handshake."""

from __future__ import annotations

import asyncio
import gzip
import subprocess
from pathlib import Path

import pytest

from scaigrid.agent.main import parse_args
from scaigrid.agent.serial import H2_PREFACE, agent_handshake, host_handshake
from scaigrid.worker.drivers.qemu import (
    Drive,
    MachineConfig,
    Nic,
    SerialPort,
    kernel_cmdline,
    qemu_argv,
)
from scaigrid.worker.vm.artifacts import (
    VmArtifactError,
    find_cloud_kernel,
    host_tsc_khz,
    module_closure,
)
from scaigrid.worker.vm.disks import DiskError, boot_script, guest_agent_argv
from tests.vm.conftest import VM_DATA


def test_module_closure_puts_dependencies_first(vm_host_ready: None) -> None:
    _, version = find_cloud_kernel()
    modules = Path("/lib/modules") / version
    order = [Path(p).name for p in module_closure(modules, ("virtio_blk", "virtio_console"))]
    assert order.index("virtio_ring.ko") < order.index("virtio.ko") < order.index("virtio_blk.ko")
    assert order[-1] == "virtio_console.ko"
    assert len(order) == len(set(order))
    with pytest.raises(VmArtifactError, match="no_such_module"):
        module_closure(modules, ("no_such_module",))


def test_built_artifacts_are_a_pvh_elf_and_an_initramfs_with_init(vm_host_ready: None) -> None:
    from scaigrid.worker.vm.artifacts import ensure_vm_artifacts

    artifacts = ensure_vm_artifacts(VM_DATA / "vm-cache")
    with artifacts.kernel.open("rb") as fh:
        assert fh.read(4) == b"\x7fELF"
    listing = subprocess.run(
        ["cpio", "-t", "--quiet"],
        input=gzip.decompress(artifacts.initramfs.read_bytes()),
        capture_output=True,
        check=True,
    ).stdout.decode()
    names = set(listing.split())
    assert {"init", "bin/busybox", "modules/virtio_console.ko", "modules/overlay.ko"} <= names
    assert host_tsc_khz() > 100_000


def test_boot_script_round_trips_env_argv_and_hostname(tmp_path: Path, vm_host_ready: None) -> None:
    env = {"GREETING": 'it\'s "quoted" $HOME `id`\nsecond line', "EMPTY": ""}
    argv = ["/agent", "--flag", "two words", "it's"]
    (tmp_path / "boot.sh").write_text(boot_script(argv, env, "guest-name"))
    probe = '. ./boot.sh; hostname; printf "[%s]" "$@"; echo; printf "%s|" "$GREETING" "$EMPTY"'
    # A private UTS namespace: the script sets the hostname.
    result = subprocess.run(
        ["unshare", "--uts", "busybox", "sh", "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.split("\n")
    assert lines[0] == "guest-name"
    assert lines[1] == "[/agent][--flag][two words][it's]"
    assert "\n".join(lines[2:]) == env["GREETING"] + "||"


@pytest.mark.parametrize("name", ["A-B", "1X", "ÄX", "X Y", "X;id"])
def test_boot_script_refuses_names_a_shell_cannot_export(name: str) -> None:
    with pytest.raises(DiskError, match="not allowed"):
        boot_script(["/agent"], {name: "v"}, "h")


def test_guest_agent_argv_swaps_the_transport() -> None:
    base = ("/py", "-m", "scaigrid.agent", "--listen", "/x.sock", "--log-level", "INFO")
    assert guest_agent_argv(base, ("--serial", "agent")) == [
        "/py",
        "-m",
        "scaigrid.agent",
        "--log-level",
        "INFO",
        "--serial",
        "agent",
    ]
    assert guest_agent_argv(("/py", "--listen=/x"), ("--vsock", "1024")) == [
        "/py",
        "--vsock",
        "1024",
    ]
    with pytest.raises(DiskError):
        guest_agent_argv((), ("--serial", "agent"))


def test_qemu_command_line_is_built_from_device_data(tmp_path: Path) -> None:
    machine = MachineConfig(
        accel="tcg",
        vcpus=2,
        memory_mb=512,
        kernel=tmp_path / "vmlinux",
        initramfs=tmp_path / "initrd",
        cmdline=kernel_cmdline(2100000),
        qmp_socket=tmp_path / "qmp.sock",
        drives=(Drive("base", tmp_path / "b.ext4", readonly=True), Drive("s", tmp_path / "s")),
        ports=(SerialPort("agent", tmp_path / "agent.sock"),),
    )
    argv = qemu_argv(machine)
    joined = " ".join(argv)
    assert argv[argv.index("-M") + 1] == "microvm,acpi=on"
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert "tsc_early_khz=2100000" in argv[argv.index("-append") + 1]
    assert f"id=base,file={tmp_path}/b.ext4,format=raw,if=none,readonly=on" in argv
    assert f"id=s,file={tmp_path}/s,format=raw,if=none,cache=unsafe" in argv
    assert "virtserialport,chardev=port0,name=agent" in argv
    assert joined.index("drive=base") < joined.index("drive=s")


def test_a_nic_runs_qemu_inside_the_bunker_namespace(tmp_path: Path) -> None:
    machine = MachineConfig(
        accel="tcg",
        vcpus=1,
        memory_mb=256,
        kernel=tmp_path / "vmlinux",
        initramfs=tmp_path / "initrd",
        cmdline=kernel_cmdline(2100000),
        nics=(Nic("vmtap0", "02:00:00:00:00:01"),),
        netns_path="/var/run/netns/sb-x",
    )
    argv = qemu_argv(machine)
    assert argv[:3] == ["nsenter", "--net=/var/run/netns/sb-x", "--"]
    assert "tap,id=net0,ifname=vmtap0,script=no,downscript=no" in argv
    assert "virtio-net-device,netdev=net0,mac=02:00:00:00:00:01" in argv


def test_agent_needs_exactly_one_transport() -> None:
    assert parse_args(["--serial", "agent"]).serial == "agent"
    assert parse_args(["--vsock", "1024"]).vsock == 1024
    for bad in ([], ["--serial", "a", "--vsock", "5"], ["--listen", "/x", "--serial", "a"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


async def test_the_handshake_drops_stale_bytes_on_both_sides() -> None:
    """The agent first sees junk (a dead session's frames), the host first sees the old
    session's output; both reach a clean HTTP/2 start."""
    agent_reader = asyncio.StreamReader()
    host_reader = asyncio.StreamReader()

    class Pipe:
        """A minimal writer feeding the other side's reader."""

        def __init__(self, target: asyncio.StreamReader) -> None:
            self.target = target

        def write(self, data: bytes) -> None:
            self.target.feed_data(data)

        async def drain(self) -> None:
            await asyncio.sleep(0)

        def close(self) -> None:
            return

    agent_reader.feed_data(b"\x00\x00\x04\x08\x00stale h2 frame bytes\nSCAIBUNKER-HELLO nothex\n")
    host_reader.feed_data(b"old session output without newline")
    agent = asyncio.ensure_future(agent_handshake(agent_reader, Pipe(host_reader)))  # type: ignore[arg-type]
    await host_handshake(host_reader, Pipe(agent_reader), timeout_s=5)  # type: ignore[arg-type]
    Pipe(agent_reader).write(H2_PREFACE + b"frames")
    session, pump = await agent
    assert await session.readexactly(len(H2_PREFACE) + 6) == H2_PREFACE + b"frames"
    pump.cancel()

"""Guest kernel and initramfs for the microVM drivers, built once and cached.

* **Kernel.** ``vm_kernel`` in the worker config names an uncompressed ``vmlinux`` (what
  Firecracker and QEMU's PVH boot load). Without it, one is derived from Debian's
  ``linux-image-cloud-amd64``: its bzImage payload is LZ4-compressed, so the bytes from the
  LZ4 legacy-frame magic on are decompressed with ``lz4 -dc`` into an ELF with the Xen PVH
  note (HOST-NOTES §1).
* **Initramfs.** A gzip'd newc cpio with static busybox, the virtio modules the guest needs
  (with their dependencies, in ``modules.dep`` order) and :data:`INIT_SCRIPT` as ``/init``.
  The init script loads the modules, mounts the image's read-only base ext4 (``/dev/vda``)
  and the bunker's scratch disk (``/dev/vdb``) under an overlay root, mounts the agent
  runtime disk (``/dev/vdc``) at ``/.scaibunker``, sources the host-written ``boot.sh`` at
  the scratch disk's top (outside the overlay: environment, hostname and the agent's argv)
  and ``switch_root``s into the agent as PID 1.

Everything lands in ``cache_dir`` under names derived from the kernel version and the
content of the init script and module list, so a change rebuilds and old files are left
for the operator to prune.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

#: Magic of the LZ4 legacy frame the Debian bzImage payload starts with.
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
#: Modules the guest needs (dependencies are added from ``modules.dep``): virtio-mmio
#: transport, block, serial console ports, network and vsock (Firecracker's agent channel).
GUEST_MODULES = (
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "vmw_vsock_virtio_transport",
    "overlay",
)
BUSYBOX_CANDIDATES = ("/usr/bin/busybox", "/bin/busybox")

INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /bin /sbin /proc /sys /dev
/bin/busybox --install -s /bin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
for m in $(cat /modules.order); do insmod "/modules/$m" 2>/dev/null; done
fail() { echo "scaibunker-init: $*" > /dev/console; poweroff -f; }
n=0
while [ ! -b /dev/vdc ]; do
  n=$((n + 1)); [ "$n" -gt 500 ] && fail "disks did not appear"; usleep 10000
done
mkdir -p /lower /scratch /newroot
mount -t ext4 -o ro,noload /dev/vda /lower || fail "cannot mount the base disk"
mount -t ext4 -o nodev,nosuid /dev/vdb /scratch || fail "cannot mount the scratch disk"
mkdir -p /scratch/upper /scratch/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/scratch/upper,workdir=/scratch/work \
  /newroot || fail "cannot mount the overlay root"
mkdir -p /newroot/.scaibunker /newroot/dev /newroot/proc /newroot/sys /newroot/tmp
mount -t ext4 -o ro,noload /dev/vdc /newroot/.scaibunker || fail "cannot mount the agent runtime"
[ -f /scratch/boot.sh ] || fail "boot.sh missing"
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs -o nosuid,nodev shm /newroot/dev/shm
ip link set lo up 2>/dev/null
. /scratch/boot.sh
exec /bin/switch_root /newroot "$@"
"""


class VmArtifactError(Exception):
    """The guest kernel or initramfs cannot be found or built; the message says why."""


@dataclass(frozen=True)
class VmArtifacts:
    """The files every microVM boots from.

    Attributes:
        kernel: uncompressed ``vmlinux`` (ELF, PVH-bootable).
        initramfs: gzip'd newc cpio.
        kernel_version: ``uname -r`` of the guest kernel (``""`` for a configured kernel).
    """

    kernel: Path
    initramfs: Path
    kernel_version: str


def host_tsc_khz() -> int:
    """The host TSC frequency in kHz, for the guest's ``tsc_early_khz=``.

    Read from ``/sys/devices/system/cpu/cpu0/tsc_freq_khz`` when the kernel exports it,
    else from the first ``cpu MHz`` line of ``/proc/cpuinfo``.

    Raises:
        VmArtifactError: neither source gives a frequency.
    """
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text().strip())
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "cpu MHz":
                    return round(float(value) * 1000)
    except (OSError, ValueError) as exc:
        raise VmArtifactError(f"cannot read the host TSC frequency: {exc}") from exc
    raise VmArtifactError("cannot read the host TSC frequency: no 'cpu MHz' in /proc/cpuinfo")


def find_cloud_kernel(boot: Path = Path("/boot")) -> tuple[Path, str]:
    """Newest Debian cloud kernel in ``boot``: ``(bzImage path, version)``.

    Raises:
        VmArtifactError: no ``vmlinuz-*-cloud-amd64`` with its modules is installed.
    """
    found: list[tuple[Path, str]] = []
    for candidate in boot.glob("vmlinuz-*-cloud-amd64"):
        version = candidate.name.removeprefix("vmlinuz-")
        if (Path("/lib/modules") / version / "modules.dep").is_file():
            found.append((candidate, version))
    if not found:
        raise VmArtifactError(
            "no guest kernel: install linux-image-cloud-amd64 or set vm_kernel and vm_initramfs"
        )
    return max(found, key=lambda item: _version_key(item[1]))


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.replace("-", ".").split(".") if part.isdigit())


def extract_vmlinux(bzimage: Path, output: Path) -> None:
    """Write the uncompressed kernel ELF inside a Debian LZ4 ``bzImage`` to ``output``.

    Raises:
        VmArtifactError: no LZ4 payload, ``lz4`` failed, or the result is not an ELF.
    """
    data = bzimage.read_bytes()
    start = data.find(LZ4_LEGACY_MAGIC)
    if start < 0:
        raise VmArtifactError(f"{bzimage} has no LZ4 payload (not a Debian cloud kernel?)")
    with output.open("wb") as out:
        # lz4 decodes the whole payload, then fails on the bzImage trailer behind it; the
        # result is judged by its ELF header, not by lz4's exit status.
        result = subprocess.run(
            ["lz4", "-dc"], input=data[start:], stdout=out, stderr=subprocess.PIPE, timeout=120
        )
    with output.open("rb") as fh:
        header = fh.read(4)
    if header != b"\x7fELF" or output.stat().st_size < 1 << 20:
        raise VmArtifactError(
            f"cannot decompress {bzimage}: {result.stderr.decode(errors='replace').strip()}"
        )


def module_closure(modules_dir: Path, names: tuple[str, ...]) -> list[str]:
    """Relative paths of ``names`` and everything they depend on, dependencies first.

    Args:
        modules_dir: ``/lib/modules/<version>``.
        names: module names (``virtio_blk``); built-in ones (absent from ``modules.dep``
            but listed in ``modules.builtin``) are skipped.

    Raises:
        VmArtifactError: a module is neither loadable nor built in.
    """
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[_module_name(path)] = path
    builtin = {
        _module_name(line)
        for line in (modules_dir / "modules.builtin").read_text().splitlines()
        if line
    }
    ordered: list[str] = []

    def visit(path: str) -> None:
        if path in ordered:
            return
        for dep in deps.get(path, []):
            visit(dep)
        ordered.append(path)

    for name in names:
        found = by_name.get(name.replace("-", "_"))
        if found is None:
            if name.replace("-", "_") in builtin:
                continue
            raise VmArtifactError(f"kernel module {name} is missing from {modules_dir}")
        visit(found)
    return ordered


def _module_name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def build_initramfs(modules_dir: Path, output: Path) -> None:
    """Write the initramfs (see the module docstring) to ``output``.

    Raises:
        VmArtifactError: busybox, a module or ``cpio`` is missing, or a module is
            compressed (busybox ``insmod`` loads plain ``.ko`` files only).
    """
    busybox = next((Path(p) for p in BUSYBOX_CANDIDATES if Path(p).is_file()), None)
    if busybox is None:
        raise VmArtifactError("busybox is missing (install busybox-static)")
    modules = module_closure(modules_dir, GUEST_MODULES)
    with tempfile.TemporaryDirectory(prefix="initramfs-") as tmp:
        root = Path(tmp)
        for sub in ("bin", "modules", "dev", "proc", "sys"):
            (root / sub).mkdir()
        shutil.copy2(busybox, root / "bin" / "busybox")
        names = []
        for rel in modules:
            if not rel.endswith(".ko"):
                raise VmArtifactError(f"compressed kernel module {rel} cannot be loaded by busybox")
            name = os.path.basename(rel)
            shutil.copy2(modules_dir / rel, root / "modules" / name)
            names.append(name)
        (root / "modules.order").write_text("\n".join(names) + "\n")
        init = root / "init"
        init.write_text(INIT_SCRIPT)
        init.chmod(0o755)
        listing = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        result = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"],
            cwd=root,
            input=("\n".join([".", *listing]) + "\n").encode(),
            capture_output=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise VmArtifactError(f"cpio failed: {result.stderr.decode(errors='replace').strip()}")
        with gzip.open(output, "wb", compresslevel=1) as fh:
            fh.write(result.stdout)


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def ensure_vm_artifacts(
    cache_dir: Path, *, kernel: Path | None = None, initramfs: Path | None = None
) -> VmArtifacts:
    """The kernel and initramfs to boot, building the derived ones under ``cache_dir``.

    Blocking (a first build takes a second or two); safe to call from several processes.

    Args:
        cache_dir: where derived files are cached.
        kernel: a configured ``vmlinux`` (used as is).
        initramfs: a configured initramfs (used as is; needs ``kernel`` too).

    Raises:
        VmArtifactError: nothing usable is installed or configured, or a build failed.
    """
    if kernel is not None and initramfs is not None:
        for path in (kernel, initramfs):
            if not path.is_file():
                raise VmArtifactError(f"configured guest file {path} does not exist")
        return VmArtifacts(kernel=kernel, initramfs=initramfs, kernel_version="")
    bzimage, version = find_cloud_kernel()
    modules_dir = Path("/lib/modules") / version
    key = _fingerprint(version, INIT_SCRIPT, *GUEST_MODULES)
    cache_dir.mkdir(parents=True, exist_ok=True)
    vmlinux = kernel or cache_dir / f"vmlinux-{version}"
    initrd = cache_dir / f"initramfs-{version}-{key}.cpio.gz"
    with open(cache_dir / ".vm-artifacts.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not vmlinux.is_file():
            partial = vmlinux.with_name(f".{vmlinux.name}.partial")
            extract_vmlinux(bzimage, partial)
            os.replace(partial, vmlinux)
            log.info("vm.kernel_extracted", path=str(vmlinux), version=version)
        if not initrd.is_file():
            partial = initrd.with_name(f".{initrd.name}.partial")
            build_initramfs(modules_dir, partial)
            os.replace(partial, initrd)
            log.info("vm.initramfs_built", path=str(initrd), version=version)
    return VmArtifacts(kernel=vmlinux, initramfs=initrd, kernel_version=version)

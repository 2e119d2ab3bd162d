"""Disks of a microVM: the image's read-only base ext4, the agent runtime ext4 and a
per-bunker scratch disk.

* **Base disk** (``/dev/vda``, read-only, shared by every VM of the image): baked once per
  image tree with ``mkfs.ext4 -d`` (:func:`scaigrid.worker.rootfs.ext4.make_ext4`). The
  worker's image trees are owned by ids shifted by ``id_base`` for the container driver
  (:mod:`scaigrid.worker.rootfs.idshift`); a guest must see its own ids, so the bake runs
  inside a user namespace that maps host ``id_base..id_base+65535`` to ``0..65535``
  (``unshare --user`` holds the namespace, the worker writes its ``uid_map``/``gid_map``
  as root, ``nsenter`` runs ``mkfs.ext4`` in it). The guest then reads unshifted owners.
* **Runtime disk** (``/dev/vdc``, read-only): the self-contained agent runtime tree
  (:mod:`scaigrid.worker.rootfs.agent_runtime`), baked once per runtime.
* **Scratch disk** (``/dev/vdb``): a sparse file of ``disk_mb`` MiB formatted as ext4
  holding ``boot.sh`` (what the initramfs sources: environment, hostname, agent argv) at
  its top; the overlay's upper and work directories are created beside it at boot (a
  restored bunker's upper is filled from its snapshot when the disk is made). Data a
  guest writes lands only in this file, so a full scratch disk fails inside the guest and
  never touches the host's free space beyond ``disk_mb``. Snapshots read the upper from a
  checked copy of the disk (:func:`scratch_layer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import shlex
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from scaigrid.worker.rootfs.commands import CommandError, run_command
from scaigrid.worker.rootfs.errors import ImageBuildError
from scaigrid.worker.rootfs.ext4 import make_ext4, run_mkfs
from scaigrid.worker.rootfs.mounts import unmount_all_under

log = structlog.get_logger(__name__)

#: Free room added on top of a tree's size when baking its ext4, in MiB (inodes, journal).
BAKE_SLACK_MIB = 64
#: Factor over the tree's apparent size (ext4 metadata, block rounding of small files).
BAKE_FACTOR = 1.25
MKFS_TIMEOUT_S = 600.0
#: Seconds copying, checking or mounting a scratch disk for a snapshot may take.
LAYER_COMMAND_TIMEOUT_S = 300.0
#: ``e2fsck`` exit statuses of a sound (0) or repaired (1, 2) filesystem.
FSCK_OK = (0, 1, 2)
LAYER_COPY = "layer.ext4"
LAYER_MOUNT = "layer"


class DiskError(Exception):
    """A disk could not be made; the message says why."""


def tree_bytes(tree: Path) -> int:
    """Apparent size of ``tree`` in bytes: the content of its regular files plus 4 KiB per
    entry (metadata); entries that vanish while it is walked are skipped."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in (*dirnames, *filenames):
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            total += 4096 + (st.st_size if stat.S_ISREG(st.st_mode) else 0)
    return total


def tree_size_mib(tree: Path) -> int:
    """:func:`tree_bytes` of ``tree`` in MiB, rounded up."""
    return -(-tree_bytes(tree) // (1 << 20))


def bake_size_mib(tree: Path) -> int:
    """ext4 size to bake ``tree`` into (at least 64 MiB, the floor of ``make_ext4``)."""
    return max(64, int(tree_size_mib(tree) * BAKE_FACTOR) + BAKE_SLACK_MIB)


async def _mkfs(tree: Path, output: Path, size_mib: int, *, id_base: int | None) -> None:
    """``mkfs.ext4 -d tree output`` (``output`` exists with its final size), in a user
    namespace mapping ``id_base`` to 0 when ``id_base`` is given
    (:func:`scaigrid.worker.rootfs.ext4.run_mkfs`)."""
    await run_mkfs(tree, output, id_base=id_base, timeout_s=MKFS_TIMEOUT_S)


def _sparse_file(path: Path, size_mib: int) -> None:
    with path.open("wb") as fh:
        fh.truncate(size_mib << 20)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _open_lock(output: Path) -> int:
    output.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(output.with_name(f".{output.name}.lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


async def bake_ext4(
    tree: Path, output: Path, *, id_base: int | None = None, size_mib: int | None = None
) -> Path:
    """Bake ``tree`` into the ext4 ``output`` once (an existing ``output`` is reused), through
    :func:`scaigrid.worker.rootfs.ext4.make_ext4`.

    Args:
        tree: root tree to copy in.
        output: final path; written beside it and renamed into place when complete.
        id_base: host id of the tree's root owner when the tree is id-shifted (owners are
            shifted back to the guest's ids); ``None`` keeps owners as they are.
        size_mib: filesystem size (an image's ``size_mib``); ``None`` sizes it from the tree
            (:func:`bake_size_mib`).

    Raises:
        DiskError: ``mkfs.ext4`` failed, the tree does not fit in ``size_mib`` (the message
            says so), or the id mapping could not be set up.
    """
    if await asyncio.to_thread(output.is_file):
        return output
    lock = await asyncio.to_thread(_open_lock, output)
    try:
        if await asyncio.to_thread(output.is_file):
            return output
        if size_mib is None:
            size_mib = await asyncio.to_thread(bake_size_mib, tree)
        try:
            await make_ext4(tree, output, size_mib, id_base=id_base, digest=False)
        except ImageBuildError as exc:
            raise DiskError(str(exc)) from exc
    finally:
        os.close(lock)
    log.info("vm.disk_baked", tree=str(tree), output=str(output), size_mib=size_mib)
    return output


async def bake_base_disk(cache_dir: Path, rootfs: Path, id_base: int, size_mib: int) -> Path:
    """Bake the read-only base disk of the image tree ``rootfs`` at ``size_mib`` MiB ahead of
    any bunker (the image bake pipeline on a microVM worker, SPEC §7.4 step 4); bunkers then
    reuse it.

    Raises:
        DiskError: as :func:`bake_ext4` (a tree too big for ``size_mib`` says so).
    """
    output = await asyncio.to_thread(base_disk_path, cache_dir, rootfs, id_base)
    return await bake_ext4(rootfs, output, id_base=id_base, size_mib=size_mib)


def boot_script(
    argv: Sequence[str], env: Mapping[str, str], hostname: str, *, network: Sequence[str] = ()
) -> str:
    """The ``boot.sh`` the initramfs sources before ``switch_root``: exports ``env``, sets
    the hostname and the positional parameters to the agent's ``argv``; every value is
    shell-quoted.

    Args:
        argv: the agent's argv inside the guest.
        env: the agent's environment (the initramfs starts from an empty one).
        hostname: guest hostname.
        network: extra shell commands for the guest's network (busybox ``ip``), run before
            ``switch_root``; built by the driver from checked values only.

    Raises:
        DiskError: a variable name is not a shell identifier.
    """
    lines = []
    for key, value in env.items():
        if not key.isidentifier() or not key.isascii():
            raise DiskError(f"environment variable name {key!r} is not allowed in a microVM")
        lines.append(f"export {key}={shlex.quote(value)}")
    lines.append(f"/bin/hostname {shlex.quote(hostname)}")
    lines.extend(network)
    lines.append("set -- " + " ".join(shlex.quote(arg) for arg in argv))
    return "\n".join(lines) + "\n"


async def make_scratch_disk(
    path: Path,
    size_mib: int,
    boot_sh: str,
    populate_upper: Callable[[Path], None] | None = None,
) -> None:
    """Create the sparse scratch ext4 of ``size_mib`` MiB at ``path`` with ``boot.sh``.

    Args:
        populate_upper: blocking callable run with the empty ``upper`` directory (the
            overlay's writable layer, owners as the guest sees them) before the disk is
            made, e.g. to unpack a snapshot; its content is copied into the disk.

    Raises:
        DiskError: ``mkfs.ext4`` failed (e.g. the layer does not fit ``size_mib``).
    """
    top = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=".scratch-", dir=path.parent))
    try:
        await asyncio.to_thread(_write_boot, top, boot_sh)
        if populate_upper is not None:
            await asyncio.to_thread((top / "upper").mkdir, 0o755)
            await asyncio.to_thread(populate_upper, top / "upper")
        await asyncio.to_thread(_sparse_file, path, size_mib)
        await _mkfs(top, path, size_mib, id_base=None)
    except (CommandError, OSError) as exc:
        await asyncio.to_thread(_unlink, path)
        raise DiskError(f"cannot make the scratch disk: {exc}") from exc
    finally:
        await asyncio.to_thread(shutil.rmtree, top, True)


def _write_boot(top: Path, boot_sh: str) -> None:
    fd = os.open(top / "boot.sh", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(boot_sh)


@contextlib.asynccontextmanager
async def scratch_layer(scratch: Path, work_dir: Path) -> AsyncIterator[Path]:
    """Yield the overlay ``upper`` directory of the scratch disk ``scratch`` as a host
    directory, for snapshots; the VM must be paused and its guest synced.

    A sparse copy of the disk is made at ``work_dir/layer.ext4``, checked and repaired with
    ``e2fsck -f -y`` (which also replays its journal: on the copy, never on the disk the
    guest uses), mounted read-only (``noload,nodev,nosuid,noexec``) at ``work_dir/layer``,
    and unmounted and removed when the context ends (:func:`drop_scratch_layer`).

    The guest controls every byte of that filesystem: the user-space check refuses a
    damaged one before the host kernel sees it, but the host kernel still parses what
    passes. Archiving inside the guest (by the agent) is the stronger design, left to do.

    Raises:
        DiskError: the copy could not be made or mounted, or ``e2fsck`` found damage it
            could not repair.
    """
    copy, mount_point = work_dir / LAYER_COPY, work_dir / LAYER_MOUNT
    try:
        await run_command(
            "cp",
            "--sparse=always",
            "--reflink=auto",
            "--",
            str(scratch),
            str(copy),
            timeout_s=LAYER_COMMAND_TIMEOUT_S,
        )
        checked = await run_command(
            "e2fsck", "-f", "-y", "--", str(copy), check=False, timeout_s=LAYER_COMMAND_TIMEOUT_S
        )
        if checked.returncode not in FSCK_OK:
            raise DiskError(
                f"the scratch disk holds no sound ext4 (e2fsck status {checked.returncode})"
            )
        await asyncio.to_thread(mount_point.mkdir, 0o700)
        await run_command(
            "mount",
            "-t",
            "ext4",
            "-o",
            "loop,ro,noload,nodev,nosuid,noexec",
            "--",
            str(copy),
            str(mount_point),
            timeout_s=LAYER_COMMAND_TIMEOUT_S,
        )
    except BaseException as exc:
        await drop_scratch_layer(work_dir)
        if isinstance(exc, CommandError | OSError):
            raise DiskError(str(exc)) from exc
        raise
    try:
        yield mount_point / "upper"
    finally:
        await drop_scratch_layer(work_dir)


async def drop_scratch_layer(work_dir: Path) -> None:
    """Unmount and delete what :func:`scratch_layer` made in ``work_dir`` (idempotent;
    also after a crash)."""
    await unmount_all_under(work_dir / LAYER_MOUNT)
    await asyncio.to_thread(remove_tree, work_dir / LAYER_MOUNT)
    await asyncio.to_thread(_unlink, work_dir / LAYER_COPY)


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything below it, if present."""
    shutil.rmtree(path, ignore_errors=True)


def guest_agent_argv(init_argv: Sequence[str], transport: Sequence[str]) -> list[str]:
    """The container agent argv with ``--listen PATH`` replaced by ``transport`` (e.g.
    ``("--serial", "agent")`` or ``("--vsock", "1024")``).

    Raises:
        DiskError: ``init_argv`` is empty.
    """
    if not init_argv:
        raise DiskError("a microVM needs the agent's argv")
    argv: list[str] = []
    args = iter(init_argv)
    for arg in args:
        if arg == "--listen":
            next(args, None)
        elif not arg.startswith("--listen="):
            argv.append(arg)
    return [*argv, *transport]


def base_disk_path(cache_dir: Path, rootfs: Path, id_base: int) -> Path:
    """Cache path of the base ext4 of the image tree ``rootfs`` (keyed by its path, inode
    and mtime, so a rebuilt image gets a new disk)."""
    st = rootfs.stat()
    key = hashlib.sha256(
        f"{rootfs.resolve()}\0{st.st_ino}\0{st.st_mtime_ns}\0{id_base}".encode()
    ).hexdigest()[:24]
    return cache_dir / "base" / f"{key}.ext4"


@dataclass(frozen=True)
class GuestDisks:
    """The three disks of a microVM, in ``/dev/vda``, ``vdb``, ``vdc`` order."""

    base: Path
    scratch: Path
    runtime: Path


async def prepare_guest_disks(
    *,
    rootfs: Path,
    agent_runtime: Path,
    cache_dir: Path,
    state_dir: Path,
    id_base: int,
    disk_mb: int,
    boot_sh: str,
    populate_upper: Callable[[Path], None] | None = None,
) -> GuestDisks:
    """Bake (or reuse) the base and runtime disks and create the scratch disk (its upper
    directory filled by ``populate_upper``, see :func:`make_scratch_disk`).

    Raises:
        DiskError: a bake or the scratch disk failed.
    """
    base = await bake_ext4(
        rootfs, await asyncio.to_thread(base_disk_path, cache_dir, rootfs, id_base), id_base=id_base
    )
    runtime = await bake_ext4(agent_runtime, cache_dir / f"{agent_runtime.name}.ext4")
    scratch = state_dir / "scratch.ext4"
    await make_scratch_disk(scratch, max(64, disk_mb), boot_sh, populate_upper)
    return GuestDisks(base=base, scratch=scratch, runtime=runtime)

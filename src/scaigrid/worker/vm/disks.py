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
  its top; the overlay's upper and work directories are created beside it at boot. Data a
  guest writes lands only in this file, so a full scratch disk fails inside the guest and
  never touches the host's free space beyond ``disk_mb``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import shlex
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from scaigrid.worker.rootfs.commands import CommandError
from scaigrid.worker.rootfs.errors import ImageBuildError
from scaigrid.worker.rootfs.ext4 import make_ext4, run_mkfs

log = structlog.get_logger(__name__)

#: Free room added on top of a tree's size when baking its ext4, in MiB (inodes, journal).
BAKE_SLACK_MIB = 64
#: Factor over the tree's apparent size (ext4 metadata, block rounding of small files).
BAKE_FACTOR = 1.25
MKFS_TIMEOUT_S = 600.0


class DiskError(Exception):
    """A disk could not be made; the message says why."""


def tree_size_mib(tree: Path) -> int:
    """Apparent size of ``tree`` in MiB (``du -s --apparent-size`` of regular files, plus
    4 KiB per entry), rounded up."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in (*dirnames, *filenames):
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            total += 4096 + (st.st_size if name in filenames else 0)
    return -(-total // (1 << 20))


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

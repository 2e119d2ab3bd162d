"""Bake a root tree into an ext4 image file (SPEC §7.4 step 4): the one ``mkfs.ext4`` path of
the worker, used by the bake pipeline (``size_mib`` from the image) and by the microVM
drivers' base, runtime and scratch disks (:mod:`scaigrid.worker.vm.disks`).

``mkfs.ext4 -d`` (e2fsprogs) copies the tree into a new filesystem of exactly ``size_mib``
MiB, keeping owners, modes, symlinks, device-free contents and extended attributes as they
are on the host. The worker's image trees are owned by ids shifted by ``id_base`` for the
container driver (:mod:`scaigrid.worker.rootfs.idshift`); with ``id_base`` the bake runs in a
user namespace mapping host ``id_base..id_base+65535`` to ``0..65535`` (``unshare --user``
holds the namespace, the worker writes its ``uid_map``/``gid_map`` as root, ``nsenter`` runs
``mkfs.ext4`` in it), so the filesystem holds the guest's own ids. A tree that does not fit
fails the bake with a reason that names the size.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
from pathlib import Path

import structlog

from scaigrid.worker.rootfs.commands import CommandError, run_command
from scaigrid.worker.rootfs.errors import ImageBuildError
from scaigrid.worker.rootfs.idshift import ID_RANGE_SIZE

log = structlog.get_logger()

_CHUNK = 1 << 20
#: Phrases mkfs.ext4 uses when the tree does not fit (e2fsprogs 1.47, ``misc/create_inode.c``).
_NO_SPACE = ("Could not allocate block", "No space left", "Could not allocate inode")
MKFS_TIMEOUT_S = 600.0


class Ext4TooSmall(ImageBuildError):
    """The tree does not fit in the requested size (the message names ``size_mib``)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


async def run_mkfs(
    tree: Path, output: Path, *, id_base: int | None = None, timeout_s: float = MKFS_TIMEOUT_S
) -> None:
    """``mkfs.ext4 -d tree output`` on the existing file ``output`` (its size is the
    filesystem's), in a user namespace mapping ``id_base`` to 0 when ``id_base`` is given.

    Raises:
        CommandError: ``mkfs.ext4`` failed or ran past ``timeout_s``.
        OSError: the id-mapping namespace could not be set up.
    """
    if id_base is None:
        await run_command(
            "mkfs.ext4",
            "-F",
            "-q",
            "-E",
            "lazy_itable_init=0",
            "-d",
            str(tree),
            str(output),
            timeout_s=timeout_s,
        )
        return
    holder = await asyncio.create_subprocess_exec(
        "unshare",
        "--user",
        "sleep",
        "3600",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await _write_maps(holder.pid, f"0 {id_base} {ID_RANGE_SIZE}\n")
        os.chown(output, id_base, id_base)
        # The host shell opens the output and enters the tree as host root, so the
        # namespace's root needs no access to their parent directories.
        await run_command(
            "sh",
            "-c",
            'exec 3<>"$2" && cd "$1" && exec nsenter --user --target="$3" -- '
            "mkfs.ext4 -F -q -E lazy_itable_init=0 -d . /proc/self/fd/3",
            "sh",
            str(tree),
            str(output),
            str(holder.pid),
            timeout_s=timeout_s,
        )
        os.chown(output, 0, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            holder.send_signal(signal.SIGKILL)
        await holder.wait()


async def _write_maps(pid: int, mapping: str) -> None:
    """Write ``uid_map`` and ``gid_map`` of ``pid`` once its ``unshare`` took effect."""
    own = os.readlink("/proc/self/ns/user")
    for _ in range(200):
        try:
            if os.readlink(f"/proc/{pid}/ns/user") != own:
                break
        except OSError:
            pass
        await asyncio.sleep(0.005)
    else:
        raise OSError("the id-mapping user namespace did not come up")
    for name in ("uid_map", "gid_map"):
        await asyncio.to_thread(Path(f"/proc/{pid}/{name}").write_text, mapping)


async def make_ext4(
    tree: Path,
    output: Path,
    size_mib: int,
    *,
    id_base: int | None = None,
    digest: bool = True,
    timeout_s: float = MKFS_TIMEOUT_S,
) -> str | None:
    """Write an ext4 image of ``size_mib`` MiB holding ``tree`` to ``output``.

    The file is sparse, written beside ``output`` and renamed into place only when complete.

    Args:
        tree: root directory to copy in.
        output: path of the image file (replaced if it exists).
        size_mib: filesystem size in MiB (SPEC §7.1: 64 to 65536).
        id_base: host id of the tree's root owner when the tree is id-shifted (owners are
            shifted back to the guest's ids); ``None`` keeps owners as they are.
        digest: compute the file's digest (reads the whole file once more).
        timeout_s: deadline of ``mkfs.ext4``.

    Returns:
        ``sha256:<hex>`` of the finished file (the image's ext4 digest), or ``None`` without
        ``digest``.

    Raises:
        Ext4TooSmall: the tree does not fit (the message names ``size_mib``).
        ImageBuildError: ``size_mib`` out of range, or ``mkfs.ext4`` or the id mapping failed
            or ran past the deadline.
    """
    if not 64 <= size_mib <= 65536:
        raise ImageBuildError(f"size_mib must be between 64 and 65536, not {size_mib}")
    partial = output.with_name(f".{output.name}.partial")
    with partial.open("wb") as fh:
        fh.truncate(size_mib << 20)
    try:
        await run_mkfs(tree, partial, id_base=id_base, timeout_s=timeout_s)
    except (CommandError, OSError) as exc:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        result = getattr(exc, "result", None)
        stderr = result.stderr if result is not None else ""
        if any(phrase in stderr for phrase in _NO_SPACE):
            raise Ext4TooSmall(
                f"the image tree does not fit in size_mib={size_mib} MiB; register it with a "
                "larger size_mib"
            ) from exc
        raise ImageBuildError(f"mkfs.ext4 failed: {exc}") from exc
    value = await asyncio.to_thread(_sha256, partial) if digest else None
    os.replace(partial, output)
    log.info("rootfs.ext4_baked", output=str(output), size_mib=size_mib, digest=value)
    return value

"""Bake a root tree into an ext4 image file for VM drivers (SPEC §7.4 step 4).

``mkfs.ext4 -d`` (e2fsprogs) copies the tree into a new filesystem of exactly ``size_mib``
MiB, keeping owners, modes, symlinks, device-free contents and extended attributes as they
are on the host; run it on a tree whose owners are the guest's own ids (not id-shifted).
A tree that does not fit fails the bake with a reason that names the size.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from pathlib import Path

import structlog

from scaigrid.worker.rootfs.commands import CommandError, run_command
from scaigrid.worker.rootfs.errors import ImageBuildError

log = structlog.get_logger()

_CHUNK = 1 << 20
#: Phrases mkfs.ext4 uses when the tree does not fit (e2fsprogs 1.47, ``misc/create_inode.c``).
_NO_SPACE = ("Could not allocate block", "No space left", "Could not allocate inode")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


async def make_ext4(tree: Path, output: Path, size_mib: int, *, timeout_s: float = 600.0) -> str:
    """Write an ext4 image of ``size_mib`` MiB holding ``tree`` to ``output``.

    The file is written beside ``output`` and renamed into place only when complete.

    Args:
        tree: root directory to copy in.
        output: path of the image file (replaced if it exists).
        size_mib: filesystem size in MiB (SPEC §7.1: 64 to 65536).
        timeout_s: deadline of ``mkfs.ext4``.

    Returns:
        ``sha256:<hex>`` of the finished file (the image's ``digest``, SPEC §7.1).

    Raises:
        ImageBuildError: ``size_mib`` out of range, the tree does not fit (the message says
            so), or ``mkfs.ext4`` failed or ran past the deadline.
    """
    if not 64 <= size_mib <= 65536:
        raise ImageBuildError(f"size_mib must be between 64 and 65536, not {size_mib}")
    partial = output.with_name(f".{output.name}.partial")
    with partial.open("wb") as fh:
        fh.truncate(size_mib << 20)
    try:
        await run_command(
            "mkfs.ext4",
            "-F",
            "-q",
            "-E",
            "lazy_itable_init=0",
            "-d",
            str(tree),
            str(partial),
            timeout_s=timeout_s,
        )
    except CommandError as exc:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        stderr = exc.result.stderr if exc.result is not None else ""
        if any(phrase in stderr for phrase in _NO_SPACE):
            raise ImageBuildError(
                f"the image tree does not fit in size_mib={size_mib} MiB; register it with a "
                "larger size_mib"
            ) from exc
        raise ImageBuildError(f"mkfs.ext4 failed: {exc}") from exc
    digest = await asyncio.to_thread(_sha256, partial)
    os.replace(partial, output)
    log.info("rootfs.ext4_baked", output=str(output), size_mib=size_mib, digest=digest)
    return digest

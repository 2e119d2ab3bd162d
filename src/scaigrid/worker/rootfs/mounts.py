"""Read the mount table and take down mounts left under a directory."""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

import structlog

from scaigrid.worker.rootfs.commands import run_command

log = structlog.get_logger()

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mount_points() -> list[str]:
    """Return every mount point of the caller's mount namespace, in mount order.

    Source: ``/proc/self/mountinfo`` (field 5, with ``\\040``-style escapes decoded).
    """
    with open("/proc/self/mountinfo") as fh:
        return [_unescape(line.split(" ", 5)[4]) for line in fh if line.strip()]


def overlays_using(lower: Path) -> list[str]:
    """Mount points of overlay filesystems whose ``lowerdir`` includes ``lower``.

    Source: ``/proc/self/mountinfo`` (the super options after the `` - `` separator).
    """
    wanted = os.path.realpath(lower)
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            head, _, tail = line.partition(" - ")
            fields = tail.split()
            if len(fields) < 3 or fields[0] != "overlay":
                continue
            for option in fields[2].split(","):
                if option.startswith("lowerdir="):
                    lowers = [_unescape(p) for p in option[len("lowerdir=") :].split(":")]
                    if wanted in lowers:
                        found.append(_unescape(head.split(" ", 5)[4]))
    return found


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest (last mounted) first."""
    prefix = os.path.realpath(path)
    found = [m for m in mount_points() if m == prefix or m.startswith(prefix.rstrip("/") + "/")]
    return list(reversed(found))


async def unmount_all_under(path: Path) -> None:
    """Unmount everything at or below ``path``, deepest first (idempotent).

    A busy mount is detached lazily (``umount -l``) so the tree can be removed; its
    filesystem goes away once the last user lets go.

    Raises:
        CommandError: ``umount -l`` failed for a reason other than "not mounted".
    """
    for point in mounts_under(path):
        result = await run_command("umount", "--", point, check=False, timeout_s=30)
        if result.ok or "not mounted" in result.stderr:
            continue
        log.warning("rootfs.umount_busy", mount_point=point, detail=result.describe())
        lazy = await run_command("umount", "-l", "--", point, check=False, timeout_s=30)
        if not lazy.ok and "not mounted" not in lazy.stderr:
            await run_command("umount", "-l", "--", point, timeout_s=30)


def remove_tree(path: Path) -> None:
    """Delete ``path`` recursively unless something is still mounted below it (idempotent).

    Blocking; call it from a thread for big trees.

    Raises:
        OSError: a mount is still active under ``path`` (``EBUSY``) or deletion failed.
    """
    if not os.path.lexists(path):
        return
    if mounts_under(path):
        raise OSError(errno.EBUSY, "still mounted below", str(path))
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    shutil.rmtree(path)

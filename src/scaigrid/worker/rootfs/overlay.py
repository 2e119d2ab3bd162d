"""A bunker's root: the image tree under an overlayfs whose writable layer is size-capped.

Layout inside a bunker's state directory::

    disk.ext4   sparse file of ``size_mib`` MiB holding an ext4 filesystem (no journal, no
                reserved blocks), loop-mounted on ``disk/``
    disk/upper  overlay upper dir (owner and mode copied from the image root)
    disk/work   overlay work dir
    rootfs/     the merged overlay: the bunker's ``/``

Why a loop-mounted ext4: every byte the bunker writes (new files, copied-up files,
metadata) lands in a filesystem that is exactly ``size_mib`` big, so writes past the cap fail
with ``ENOSPC`` inside the bunker and the host disk only ever grows by at most ``size_mib``
(the file is sparse). ``mkfs.ext4`` plus the loop mount cost about 7 ms on the CI machines
(measured for 256 MiB to 10 GiB files); a tmpfs upper would count against host memory and
project quotas need an XFS or ext4 host filesystem prepared for them.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from scaigrid.worker.rootfs.commands import run_command
from scaigrid.worker.rootfs.mounts import unmount_all_under

log = structlog.get_logger()

_UNSAFE_OPTION_CHARS = frozenset(",:\\\n")


@dataclass(frozen=True)
class OverlayLayout:
    """Paths of one bunker's root under its state directory (see module docstring)."""

    state_dir: Path

    @property
    def disk_image(self) -> Path:
        """The sparse ext4 file."""
        return self.state_dir / "disk.ext4"

    @property
    def disk_mount(self) -> Path:
        """Where the ext4 file is loop-mounted."""
        return self.state_dir / "disk"

    @property
    def upper(self) -> Path:
        """The overlay upper dir: everything the bunker wrote."""
        return self.disk_mount / "upper"

    @property
    def work(self) -> Path:
        """The overlay work dir."""
        return self.disk_mount / "work"

    @property
    def merged(self) -> Path:
        """The merged overlay, used as the bunker's root."""
        return self.state_dir / "rootfs"


def _option_path(path: Path) -> str:
    text = os.path.realpath(path)
    if _UNSAFE_OPTION_CHARS & set(text):
        raise ValueError(f"path {text!r} cannot be used in overlay mount options")
    return text


def _create_sparse_file(path: Path, size_bytes: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, size_bytes)
    finally:
        os.close(fd)


async def mount_overlay_root(
    lower: Path,
    state_dir: Path,
    size_mib: int,
    populate: Callable[[Path], None] | None = None,
) -> Path:
    """Build the size-capped overlay root of one bunker under ``state_dir``.

    Args:
        lower: the image tree (read-only lower layer, owners already shifted).
        state_dir: the bunker's existing state directory.
        size_mib: size of the writable layer in MiB (≥ 8).
        populate: blocking callable run (in a thread) with the new, empty upper dir before
            the overlay is mounted; its exceptions propagate.

    Returns:
        The merged directory (real path, no symlinks), to use as the OCI ``root.path``.

    Raises:
        ValueError: ``size_mib`` is too small or a path cannot go into mount options.
        CommandError: ``mkfs.ext4`` or ``mount`` failed; whatever was mounted stays mounted
            (call :func:`unmount_overlay_root`).
    """
    if size_mib < 8:
        raise ValueError("the writable layer needs at least 8 MiB")
    layout = OverlayLayout(state_dir)
    lower_st = os.stat(lower)
    lower_opt = _option_path(lower)
    await asyncio.to_thread(_create_sparse_file, layout.disk_image, size_mib << 20)
    await run_command(
        "mkfs.ext4",
        "-q",
        "-F",
        "-b",
        "4096",
        "-m",
        "0",
        "-O",
        "^has_journal",
        "-E",
        f"nodiscard,root_owner={lower_st.st_uid}:{lower_st.st_gid}",
        str(layout.disk_image),
        timeout_s=60,
    )
    layout.disk_mount.mkdir(mode=0o700)
    await run_command(
        "mount",
        "-t",
        "ext4",
        "-o",
        "loop,noatime,nodev",
        str(layout.disk_image),
        str(layout.disk_mount),
        timeout_s=30,
    )
    layout.upper.mkdir()
    os.chown(layout.upper, lower_st.st_uid, lower_st.st_gid)
    os.chmod(layout.upper, lower_st.st_mode & 0o7777)
    if populate is not None:
        await asyncio.to_thread(populate, layout.upper)
    layout.work.mkdir(mode=0o700)
    layout.merged.mkdir(mode=0o755)
    options = (
        f"lowerdir={lower_opt},upperdir={_option_path(layout.upper)},"
        f"workdir={_option_path(layout.work)}"
    )
    await run_command(
        "mount", "-t", "overlay", "overlay", "-o", options, str(layout.merged), timeout_s=30
    )
    return layout.merged.resolve()


async def unmount_overlay_root(state_dir: Path) -> None:
    """Unmount a bunker's overlay and scratch disk and free its loop device (idempotent).

    Raises:
        CommandError: an unmount or loop detach failed.
    """
    layout = OverlayLayout(state_dir)
    await unmount_all_under(state_dir)
    # ``mount -o loop`` sets autoclear, so the device normally went with the unmount; a
    # worker killed between loop setup and mount leaves one bound.
    for device in await asyncio.to_thread(_loop_devices_backed_by, layout.disk_image):
        await run_command("losetup", "-d", device, timeout_s=30)
        log.info("rootfs.loop_detached", device=device, disk=str(layout.disk_image))


def _loop_devices_backed_by(path: Path) -> list[str]:
    """``/dev/loopN`` devices whose backing file is ``path`` (from sysfs, no subprocess)."""
    target = os.path.realpath(path)
    found: list[str] = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            name = backing.read_text().strip()
        except OSError:
            continue
        if name.removesuffix(" (deleted)") == target:
            found.append(f"/dev/{backing.parent.parent.name}")
    return found

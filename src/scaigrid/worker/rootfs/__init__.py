"""Root filesystems for bunkers: build image trees (tar, debootstrap) and mount bunker roots.

Public surface:

- :class:`ImageCache` — ``await cache.ensure(image_id, source) -> Path``: one shifted,
  read-only tree per image (see :mod:`.cache`).
- :func:`extract_tar`, :func:`rootfs_filter` — safe tarball extraction (:mod:`.tar`).
- :func:`run_debootstrap`, :func:`find_mirror` — debootstrap from apt's mirror
  (:mod:`.debootstrap`).
- :func:`ensure_guest_user` — the guest user ``user`` (:mod:`.guest_user`).
- :func:`shift_tree`, :data:`DEFAULT_ID_BASE`, :data:`ID_RANGE_SIZE` — id shifting for user
  namespaces (:mod:`.idshift`).
- :func:`mount_overlay_root`, :func:`unmount_overlay_root`, :class:`OverlayLayout` — a
  bunker's size-capped overlay root (:mod:`.overlay`).
"""

from scaigrid.worker.rootfs.cache import MOUNT_POINTS, ImageCache
from scaigrid.worker.rootfs.debootstrap import find_mirror, run_debootstrap
from scaigrid.worker.rootfs.errors import ImageBuildError, UnsafeArchiveError
from scaigrid.worker.rootfs.guest_user import ensure_guest_user
from scaigrid.worker.rootfs.idshift import (
    DEFAULT_ID_BASE,
    ID_RANGE_SIZE,
    ShiftStats,
    check_range_free,
    shift_tree,
)
from scaigrid.worker.rootfs.overlay import OverlayLayout, mount_overlay_root, unmount_overlay_root
from scaigrid.worker.rootfs.tar import extract_tar, rootfs_filter

__all__ = [
    "DEFAULT_ID_BASE",
    "ID_RANGE_SIZE",
    "MOUNT_POINTS",
    "ImageBuildError",
    "ImageCache",
    "OverlayLayout",
    "ShiftStats",
    "UnsafeArchiveError",
    "check_range_free",
    "ensure_guest_user",
    "extract_tar",
    "find_mirror",
    "mount_overlay_root",
    "rootfs_filter",
    "run_debootstrap",
    "shift_tree",
    "unmount_overlay_root",
]

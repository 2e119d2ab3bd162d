"""Shift the owners of an unpacked root tree into the host id range bunkers are mapped to.

Container bunkers run in a user namespace whose ids 0..65535 are host ids
``base..base+65535`` (``uidMappings``/``gidMappings`` of the OCI config). A file owned by host
uid 0 shows up as ``nobody`` inside, so the image tree used as the overlay's read-only lower
layer must already be owned by the *shifted* ids: host uid = bunker uid + ``base``.

**One range for every bunker.** All bunkers on a worker share the same host range. Giving
each bunker its own range would need either one shifted copy of every image per bunker (far
too slow and large) or idmapped mounts of the lower layer, which need util-linux ≥ 2.39
``X-mount.idmap`` or crun ≥ 1.9 ``idmap`` mount options (Debian 12 ships util-linux 2.38 and
crun 1.8.1, and overlayfs over idmapped layers needs kernel and runtime support we cannot
rely on). Bunkers remain separated from each other by their own pid, mount, network and ipc
namespaces and by per-bunker cgroups: processes of two bunkers share host uids but can
neither see nor signal each other (signals need a visible pid), and each bunker sees only
its own overlay.

**Choice of base.** :data:`DEFAULT_ID_BASE` is ``0x1F0000`` (2031616): the highest 64 Ki
aligned block whose ids all still fit the 7-digit octal uid field of ustar/POSIX tar headers
(max 2097151 — measured: GNU ``tar --format=ustar`` and Python's ``tarfile`` USTAR format
both fail with uid 2097152, "value out of range"), far above regular users (≤ 60000) and
``nobody``, and clear of the first 29 subordinate-id blocks Debian's ``useradd`` hands out
from 100000. The driver refuses to start when ``/etc/subuid`` or ``/etc/subgid`` grants an
overlapping range to anyone (see :func:`check_range_free`).

Shifting rules (:func:`shift_tree`): every entry is ``lchown``-ed by ``+base`` exactly once
(hard links are detected by inode), ids ≥ 65536 (unmappable) become ``nobody`` (65534);
setuid/setgid bits that ``chown`` clears are restored; symlinks are ``lchown``-ed, never
followed; device nodes and FIFOs are shifted like files; ``security.capability`` is
rewritten as a v3 (namespaced) capability whose root id is ``base``, so file capabilities
work inside bunkers and grant nothing on the host; POSIX ACL entries naming users or groups
are shifted too.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger()

#: Host id that bunker uid/gid 0 maps to (see module docstring for the choice).
DEFAULT_ID_BASE = 0x1F0000
#: Number of ids mapped into every bunker (bunker ids 0..65535).
ID_RANGE_SIZE = 65536
#: Bunker id that unmappable owners (≥ :data:`ID_RANGE_SIZE`) are squashed to.
OVERFLOW_ID = 65534

_CAPS_XATTR = "security.capability"
_ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
_VFS_CAP_REVISION_MASK = 0xFF000000
_VFS_CAP_REVISION_2 = 0x02000000
_VFS_CAP_REVISION_3 = 0x03000000
_ACL_USER = 0x02
_ACL_GROUP = 0x08
_ACL_ENTRY = struct.Struct("<HHI")


@dataclass(frozen=True)
class ShiftStats:
    """What :func:`shift_tree` did.

    Attributes:
        entries: directory entries visited (hard links counted once per name).
        squashed: inodes whose uid or gid was ≥ 65536 and became ``nobody``.
        capabilities: files whose ``security.capability`` was rewritten.
    """

    entries: int
    squashed: int
    capabilities: int


def check_range_free(base: int, size: int = ID_RANGE_SIZE) -> None:
    """Refuse a host id range that overlaps a subordinate range in ``/etc/subuid``/``subgid``.

    Args:
        base: first host id of the range.
        size: number of ids.

    Raises:
        ValueError: the range is outside 1..2**32-2 or overlaps a line of ``/etc/subuid`` or
            ``/etc/subgid`` (``name:start:count``); the message names the file and line.
    """
    if base < 1 or base + size > 0xFFFFFFFF:
        raise ValueError(f"id range {base}+{size} is outside the valid uid space")
    for path in (Path("/etc/subuid"), Path("/etc/subgid")):
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            parts = line.strip().split(":")
            if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
                continue
            start, count = int(parts[1]), int(parts[2])
            if start < base + size and base < start + count:
                raise ValueError(
                    f"bunker id range {base}..{base + size - 1} overlaps {path} entry {line!r}"
                )


def _shift_id(value: int, base: int) -> tuple[int, bool]:
    if value >= ID_RANGE_SIZE:
        return base + OVERFLOW_ID, True
    return base + value, False


def _shift_caps(raw: bytes, base: int) -> bytes | None:
    """Return ``raw`` (a v2 or v3 ``security.capability`` value) as v3 with root id ``base``."""
    if len(raw) < 20:
        return None
    magic = struct.unpack_from("<I", raw)[0]
    revision = magic & _VFS_CAP_REVISION_MASK
    if revision not in (_VFS_CAP_REVISION_2, _VFS_CAP_REVISION_3):
        return None
    flags = magic & ~_VFS_CAP_REVISION_MASK
    return struct.pack("<I", _VFS_CAP_REVISION_3 | flags) + raw[4:20] + struct.pack("<I", base)


def _shift_acl(raw: bytes, base: int) -> bytes:
    """Shift the ids of ``ACL_USER``/``ACL_GROUP`` entries of a POSIX ACL xattr value."""
    out = bytearray(raw[:4])
    for offset in range(4, len(raw) - _ACL_ENTRY.size + 1, _ACL_ENTRY.size):
        tag, perm, ident = _ACL_ENTRY.unpack_from(raw, offset)
        if tag in (_ACL_USER, _ACL_GROUP):
            ident = _shift_id(ident, base)[0]
        out += _ACL_ENTRY.pack(tag, perm, ident)
    return bytes(out)


def _read_xattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise


def _shift_entry(path: str, st: os.stat_result, base: int) -> tuple[bool, bool]:
    uid, squashed_uid = _shift_id(st.st_uid, base)
    gid, squashed_gid = _shift_id(st.st_gid, base)
    if stat.S_ISLNK(st.st_mode):
        os.lchown(path, uid, gid)
        return squashed_uid or squashed_gid, False
    caps = _read_xattr(path, _CAPS_XATTR) if stat.S_ISREG(st.st_mode) else None
    acls = [(name, _read_xattr(path, name)) for name in _ACL_XATTRS]
    os.lchown(path, uid, gid)
    special = stat.S_IMODE(st.st_mode) & (stat.S_ISUID | stat.S_ISGID)
    if special and not stat.S_ISDIR(st.st_mode):
        # chown clears setuid/setgid on non-directories, even for root.
        os.chmod(path, stat.S_IMODE(st.st_mode), follow_symlinks=False)
    for name, value in acls:
        if value is not None:
            os.setxattr(path, name, _shift_acl(value, base), follow_symlinks=False)
    shifted_caps = _shift_caps(caps, base) if caps is not None else None
    if shifted_caps is not None:
        os.setxattr(path, _CAPS_XATTR, shifted_caps, follow_symlinks=False)
    return squashed_uid or squashed_gid, shifted_caps is not None


def shift_tree(root: Path, base: int) -> ShiftStats:
    """Shift every owner under ``root`` (``root`` included) by ``base``, in place.

    Blocking (walks the whole tree): call it from a thread. The tree must be owned by
    unshifted ids (bunker ids 0..65535 as the image defines them); running it twice shifts
    twice. Never follows symlinks and never leaves ``root``'s filesystem.

    Args:
        root: an unpacked root filesystem directory.
        base: host id that bunker id 0 maps to (e.g. :data:`DEFAULT_ID_BASE`).

    Returns:
        Counts of what was done.

    Raises:
        OSError: an entry could not be changed, or (``EXDEV``) a mount point lies inside the
            tree; the tree is then partly shifted: discard it.
    """
    seen: set[int] = set()
    entries = squashed = capabilities = 0
    root_dev = os.lstat(root).st_dev
    stack = [str(root)]
    while stack:
        current = stack.pop()
        st = os.lstat(current)
        if st.st_dev != root_dev:
            # A mount inside the tree (a bind-mounted host file or directory): touching it
            # would change the host, so the tree is refused.
            raise OSError(errno.EXDEV, f"{current} is a mount point inside the image tree")
        entries += 1
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
        was_squashed, had_caps = _shift_entry(current, st, base)
        squashed += was_squashed
        capabilities += had_caps
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(current) as it:
                stack.extend(entry.path for entry in it)
    log.info(
        "rootfs.shifted",
        root=str(root),
        base=base,
        entries=entries,
        squashed=squashed,
        capabilities=capabilities,
    )
    return ShiftStats(entries=entries, squashed=squashed, capabilities=capabilities)

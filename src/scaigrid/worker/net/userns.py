"""Pre-created user namespaces for container bunkers, each owned by its own host uid.

**Why an owner uid per bunker.** The kernel charges per-user counters ("ucounts":
``fs.inotify.max_user_instances`` and ``max_user_watches``, ``user.max_*_namespaces``, ...)
at every level of the user-namespace tree: a process in a child namespace is charged to
``(child, its uid)`` and, one level up, to ``(parent, owner uid of the child)``. A user
namespace created by the OCI runtime running as root is owned by uid 0, so every bunker's
counters at the initial namespace would add up with each other's and with host root's: one
bunker opening 128 inotify instances would make ``inotify_init`` fail in every other bunker
and for root on the host. So every container bunker joins a user namespace the worker made
for it with :func:`create_userns`, owned by a uid leased for that bunker alone: at the
initial namespace each bunker is then charged to its own uid and gets exactly the host's
per-user limits, as one host user would.

**Owner uids.** :data:`OWNER_UID_BASE` .. ``+ OWNER_UID_COUNT - 1`` = ``0x200000`` ..
``0x20FFFF`` (2097152..2162687), the 64 Ki block right above the bunkers' mapped range
(:data:`~scaigrid.worker.rootfs.idshift.DEFAULT_ID_BASE` + 65536 ids): far above regular
users and ``nobody``, beyond the 29 subordinate-id blocks Debian's ``useradd`` hands out from
100000, and never inside any bunker's mapped range (:func:`check_owner_range`, run by the
container driver at start-up, also refuses ``/etc/subuid``/``subgid`` overlaps and uids
``/etc/passwd`` names). No file is ever owned by an owner uid (no ustar limit applies) and no
process runs as one except the short-lived ``unshare`` below: a host process with that euid
would hold every capability over the bunker's namespaces.

**Allocation.** :func:`lease_owner_uid` claims a free uid host-wide with an exclusive
``symlink(holder, OWNERS_DIR/<uid>)`` (``holder`` = the path the namespace is bind-mounted
at, unique per bunker), starting at a random offset so a uid just released is rarely reused
at once. Workers sharing a host share ``/run``, so their bunkers never share an owner uid
either. :func:`remove_userns_at` releases the lease once the bind mount is gone; leases of a
crashed worker are found from their holder (:func:`leases_under`) and released when its
leftovers are cleaned up. ``/run`` is a tmpfs: leases and namespaces vanish together on a
reboot.

**Creation** (:func:`create_userns`, no Python fork: the worker is multi-threaded and runs an
asyncio loop): ``setpriv --reuid=U --regid=U --clear-groups -- unshare --user [--net] -- cat``
(util-linux) makes a user namespace owned by ``U`` (the creator's euid; unprivileged user
namespaces must be allowed, which the container driver's start-up probe checks), and with
``--net`` a network namespace inside it in the same call. The worker waits until the child's
``/proc/<pid>/ns/user`` differs from its own, writes the child's ``uid_map`` and ``gid_map``
as root (bunker ids ``0..size-1`` = host ``id_base..id_base+size-1``, the container driver's
mapping), bind-mounts ``ns/user`` (and ``ns/net`` at ``/run/netns/<name>``), then closes the
child's stdin so it exits. The runtime joins the namespace by path.

**Transit bunkers** (SPEC §8.6, :func:`create_owned_netns`): a namespace made by
:func:`scaigrid.worker.net.manager.create_netns` belongs to the initial user namespace, so
even root inside a bunker cannot configure its interfaces. An L2 appliance (firewall, IDS,
NAT) that sets its own addresses, routes and MACs instead gets its network namespace created
inside its user namespace (bind-mounted at ``USERNS_DIR/<name>``), and its root then holds
``CAP_NET_ADMIN``/``CAP_NET_RAW`` over that network namespace and nothing else. Root in the
initial namespace still configures it as before (veths, addresses, sysctls).

**Namespace limits.** The new namespace's own ``/proc/sys/user/max_*`` are left at the
kernel's default (unlimited): they would only divide a bunker's allowance among its own uids,
while the limits at the initial namespace, charged to the bunker's owner uid, already bound
the bunker as a whole (and no value set there can lift those).

A namespace lives as long as the bunker's processes or a bind mount hold it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import pwd
import secrets
import subprocess
import time
from pathlib import Path
from typing import Final

from pyroute2 import netns

from scaigrid.worker.rootfs.idshift import DEFAULT_ID_BASE, ID_RANGE_SIZE, check_range_free

#: Where the user namespace of each owned network namespace is bind-mounted (file name =
#: the network namespace's name).
USERNS_DIR: Final = Path("/run/scaibunker/userns")
#: Owner-uid leases: ``<uid>`` is a symlink to the path its namespace is bind-mounted at.
OWNERS_DIR: Final = Path("/run/scaibunker/owners")
#: First host uid that owns a bunker's user namespace (see the module docstring).
OWNER_UID_BASE: Final = DEFAULT_ID_BASE + ID_RANGE_SIZE
#: Number of owner uids, i.e. of bunkers that can live on one host at once.
OWNER_UID_COUNT: Final = 65536
#: Seconds to wait for ``unshare`` to create the namespaces.
UNSHARE_TIMEOUT_S: Final = 10.0
#: ``ioctl(fd, NS_GET_OWNER_UID, &uid)`` on a user-namespace file (linux/nsfs.h).
NS_GET_OWNER_UID: Final = 0xB704
_MS_BIND: Final = 4096
_MNT_DETACH: Final = 2


def userns_path(name: str) -> Path:
    """The user-namespace file of owned network namespace ``name``."""
    return USERNS_DIR / name


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _bind(source: str, target: Path) -> None:
    fd = os.open(target, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0)
    os.close(fd)
    if _libc().mount(source.encode(), str(target).encode(), b"none", _MS_BIND, None) != 0:
        code = ctypes.get_errno()
        with contextlib.suppress(OSError):
            target.unlink()
        raise OSError(code, f"bind {source} at {target}: {os.strerror(code)}")


def owner_uid(path: Path | str) -> int:
    """Host uid owning the user namespace at ``path`` (a ``/proc/<pid>/ns/user`` link or a
    bind mount of one).

    Raises:
        OSError: ``path`` cannot be opened or is not a user-namespace file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        uid = ctypes.c_uint32()
        if _libc().ioctl(fd, NS_GET_OWNER_UID, ctypes.byref(uid)) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"NS_GET_OWNER_UID on {path}: {os.strerror(code)}")
        return int(uid.value)
    finally:
        os.close(fd)


def check_owner_range(
    id_base: int,
    size: int = ID_RANGE_SIZE,
    base: int = OWNER_UID_BASE,
    count: int = OWNER_UID_COUNT,
) -> None:
    """Refuse an owner-uid range that a bunker's mapped ids, a subordinate range or a user of
    ``/etc/passwd`` could use.

    Args:
        id_base, size: the bunkers' mapped host ids (``id_base..id_base+size-1``).
        base, count: the owner uids (``base..base+count-1``).

    Raises:
        ValueError: the owner range overlaps the mapped range, a line of ``/etc/subuid`` or
            ``/etc/subgid`` or a passwd entry's uid or gid, or lies outside 1..2**32-2.
    """
    if base < id_base + size and id_base < base + count:
        raise ValueError(
            f"owner uids {base}..{base + count - 1} overlap the bunkers' ids "
            f"{id_base}..{id_base + size - 1}"
        )
    check_range_free(base, count)
    for entry in pwd.getpwall():
        if base <= entry.pw_uid < base + count or base <= entry.pw_gid < base + count:
            raise ValueError(f"owner uids {base}..{base + count - 1} include user {entry.pw_name}")


def owner_leases() -> dict[int, str]:
    """``{owner uid: holder path}`` of every lease on this host."""
    leases: dict[int, str] = {}
    try:
        entries = list(OWNERS_DIR.iterdir())
    except FileNotFoundError:
        return leases
    for entry in entries:
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                leases[int(entry.name)] = os.readlink(entry)
    return leases


def leases_under(prefix: str) -> list[str]:
    """Holder paths starting with ``prefix`` that hold an owner-uid lease."""
    return sorted({h for h in owner_leases().values() if h.startswith(prefix)})


def lease_owner_uid(holder: str, base: int = OWNER_UID_BASE, count: int = OWNER_UID_COUNT) -> int:
    """Claim an owner uid of ``base..base+count-1`` no other lease on this host holds.

    Args:
        holder: absolute path the namespace will be bind-mounted at (recorded in the lease).

    Raises:
        OSError: ``ENOSPC`` when every uid of the range is leased, or the lease directory
            cannot be written.
    """
    OWNERS_DIR.mkdir(parents=True, exist_ok=True)
    start = secrets.randbelow(count)
    for step in range(count):
        uid = base + (start + step) % count
        try:
            os.symlink(holder, OWNERS_DIR / str(uid))
        except FileExistsError:
            continue
        return uid
    raise OSError(errno.ENOSPC, f"all {count} bunker owner uids from {base} are leased")


def _release_lease(uid: int, holder: str) -> None:
    with contextlib.suppress(OSError):
        if os.readlink(OWNERS_DIR / str(uid)) == holder:
            (OWNERS_DIR / str(uid)).unlink()


def release_owner_uid(holder: str) -> list[int]:
    """Drop every lease held by ``holder``; return the uids released."""
    released = []
    for uid, held_by in owner_leases().items():
        if held_by == holder:
            with contextlib.suppress(FileNotFoundError):
                (OWNERS_DIR / str(uid)).unlink()
            released.append(uid)
    return released


def remove_userns_at(path: Path) -> bool:
    """Unmount and delete the user-namespace file ``path`` and release its owner uid; False
    when there was neither file nor lease.

    Raises:
        OSError: the file exists but could not be deleted (the lease is then kept).
    """
    existed = os.path.lexists(path)
    if existed:
        _libc().umount2(str(path).encode(), _MNT_DETACH)
        path.unlink(missing_ok=True)
    return bool(release_owner_uid(str(path))) or existed


def remove_userns(name: str) -> bool:
    """:func:`remove_userns_at` for the user namespace of owned network namespace ``name``.

    Raises:
        OSError: as :func:`remove_userns_at`.
    """
    return remove_userns_at(userns_path(name))


def userns_leftovers(prefix: str) -> list[str]:
    """Names starting with ``prefix`` whose user-namespace file or owner lease exists now."""
    try:
        names = {p.name for p in USERNS_DIR.iterdir() if p.name.startswith(prefix)}
    except FileNotFoundError:
        names = set()
    names |= {Path(h).name for h in leases_under(str(USERNS_DIR / prefix))}
    return sorted(names)


def create_userns(path: Path, id_base: int, size: int, *, netns_name: str | None = None) -> int:
    """Create a user namespace owned by a newly leased owner uid, bind-mounted at ``path``.

    It maps ids ``0..size-1`` to host ``id_base..id_base+size-1`` (uids and gids). With
    ``netns_name``, a network namespace owned by it is created too and attached at
    ``/run/netns/<netns_name>``. Blocking (a few ms); run it on a thread.

    Args:
        path: absolute path of the user-namespace file to create (its directory must exist).
        id_base, size: the mapping.
        netns_name: name of the network namespace to create inside it, if any.

    Returns:
        The owner uid.

    Raises:
        OSError: no owner uid is free, ``unshare`` failed or timed out, a map could not be
            written, or a bind mount failed. Nothing is left behind.
    """
    uid = lease_owner_uid(str(path))
    own = os.stat("/proc/self/ns/user").st_ino
    flags = ["--user", "--net"] if netns_name is not None else ["--user"]
    try:
        child = subprocess.Popen(
            [
                "setpriv",
                f"--reuid={uid}",
                f"--regid={uid}",
                "--clear-groups",
                "--",
                "unshare",
                *flags,
                "--",
                "cat",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    except BaseException:
        _release_lease(uid, str(path))
        raise
    try:
        proc = Path("/proc", str(child.pid))
        deadline = time.monotonic() + UNSHARE_TIMEOUT_S
        while True:
            if child.poll() is not None:
                detail = child.stderr.read().decode(errors="replace") if child.stderr else ""
                raise OSError(errno.EPERM, f"unshare {' '.join(flags)} failed: {detail.strip()}")
            with contextlib.suppress(FileNotFoundError):
                if os.stat(proc / "ns" / "user").st_ino != own:
                    break
            if time.monotonic() > deadline:
                raise OSError(errno.ETIMEDOUT, f"unshare {' '.join(flags)} did not unshare in time")
            time.sleep(0.0005)
        mapping = f"0 {id_base} {size}\n"
        (proc / "uid_map").write_text(mapping)
        (proc / "gid_map").write_text(mapping)
        if netns_name is not None:
            netns.attach(netns_name, child.pid)
        _bind(str(proc / "ns" / "user"), path)
    except BaseException:
        if netns_name is not None and os.path.lexists(Path("/run/netns", netns_name)):
            with contextlib.suppress(OSError):
                netns.remove(netns_name)
        # ``_bind`` is the last step and removes what it created when it fails.
        _release_lease(uid, str(path))
        raise
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(timeout=UNSHARE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        if child.stderr is not None:
            child.stderr.close()
    return uid


def create_owned_netns(name: str, id_base: int, size: int) -> Path:
    """Create ``/run/netns/<name>`` owned by a new user namespace; return its file's path.

    The user namespace (:func:`create_userns`, with its own owner uid) maps ids ``0..size-1``
    to host ``id_base..id_base+size-1`` and is bind-mounted at :func:`userns_path`. Blocking
    (a few ms); run it on a thread.

    Raises:
        OSError: as :func:`create_userns`. Nothing is left behind.
    """
    USERNS_DIR.mkdir(parents=True, exist_ok=True)
    create_userns(userns_path(name), id_base, size, netns_name=name)
    return userns_path(name)

"""Network namespaces owned by a bunker's user namespace (``transit`` bunkers, SPEC §8.6).

A namespace made by :func:`scaigrid.worker.net.manager.create_netns` belongs to the initial
user namespace, so even root inside a bunker (which runs in a user namespace of its own)
cannot configure its interfaces. For a ``transit`` bunker, which is meant to be an L2
appliance (firewall, IDS, NAT) that sets its own addresses, routes and MACs,
:func:`create_owned_netns` instead creates a user namespace with the bunker's id mapping
(bunker ids ``0..size-1`` = host ``id_base..id_base+size-1``, the container driver's) and the
network namespace inside it. The container driver joins both by path, and the bunker's root
then holds ``CAP_NET_ADMIN``/``CAP_NET_RAW`` over that network namespace and nothing else.
Root in the initial namespace still configures it as before (veths, addresses, sysctls).

How: ``unshare --user --net -- cat`` (util-linux; its own ``--map-users`` needs
``newuidmap``, which is not installed everywhere) unshares both namespaces in one call, so
the new network namespace is owned by the new user namespace. The worker waits until the
child's ``/proc/<pid>/ns/user`` differs from its own, writes the child's ``uid_map`` and
``gid_map``, bind-mounts its ``ns/net`` at ``/run/netns/<name>`` and its ``ns/user`` at
``USERNS_DIR/<name>``, then closes the child's stdin so it exits. No Python fork: the
worker is multi-threaded and runs an asyncio loop.

The user-namespace file is removed with :func:`remove_userns` (unmount, unlink); the
namespace itself lives as long as the bunker's processes or a bind mount hold it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import subprocess
import time
from pathlib import Path
from typing import Final

from pyroute2 import netns

#: Where the user namespace of each owned network namespace is bind-mounted (file name =
#: the network namespace's name).
USERNS_DIR: Final = Path("/run/scaibunker/userns")
#: Seconds to wait for ``unshare`` to create the namespaces.
UNSHARE_TIMEOUT_S: Final = 10.0
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


def remove_userns(name: str) -> bool:
    """Unmount and delete the user-namespace file of ``name``; False when there was none.

    Raises:
        OSError: the file exists but could not be deleted.
    """
    path = userns_path(name)
    if not os.path.lexists(path):
        return False
    _libc().umount2(str(path).encode(), _MNT_DETACH)
    path.unlink(missing_ok=True)
    return True


def userns_leftovers(prefix: str) -> list[str]:
    """Names of the user-namespace files starting with ``prefix`` that exist now."""
    try:
        return sorted(p.name for p in USERNS_DIR.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def create_owned_netns(name: str, id_base: int, size: int) -> Path:
    """Create ``/run/netns/<name>`` owned by a new user namespace; return its file's path.

    The user namespace maps ids ``0..size-1`` to host ``id_base..id_base+size-1`` (uids and
    gids) and is bind-mounted at :func:`userns_path`. Blocking (a few ms); run it on a thread.

    Raises:
        OSError: ``unshare`` failed or timed out, a map could not be written, or a bind
            mount failed. Nothing is left behind.
    """
    USERNS_DIR.mkdir(parents=True, exist_ok=True)
    own = os.stat("/proc/self/ns/user").st_ino
    child = subprocess.Popen(
        ["unshare", "--user", "--net", "--", "cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        proc = Path("/proc", str(child.pid))
        deadline = time.monotonic() + UNSHARE_TIMEOUT_S
        while True:
            if child.poll() is not None:
                detail = child.stderr.read().decode(errors="replace") if child.stderr else ""
                raise OSError(errno.EPERM, f"unshare --user --net failed: {detail.strip()}")
            with contextlib.suppress(FileNotFoundError):
                if os.stat(proc / "ns" / "user").st_ino != own:
                    break
            if time.monotonic() > deadline:
                raise OSError(errno.ETIMEDOUT, "unshare --user --net did not unshare in time")
            time.sleep(0.0005)
        mapping = f"0 {id_base} {size}\n"
        (proc / "uid_map").write_text(mapping)
        (proc / "gid_map").write_text(mapping)
        netns.attach(name, child.pid)
        _bind(str(proc / "ns" / "user"), userns_path(name))
    except BaseException:
        if os.path.lexists(Path("/run/netns", name)):
            with contextlib.suppress(OSError):
                netns.remove(name)
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
    return userns_path(name)

"""Each container bunker's user namespace is owned by a host uid of its own
(:mod:`scaigrid.worker.net.userns`), so the kernel's per-user counters at the initial
namespace are not shared between bunkers nor with host root: one bunker holding every
inotify instance it may have (``fs.inotify.max_user_instances``) leaves other bunkers and
root on the host able to create theirs. Runs once per OCI runtime.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from scaigrid.worker.drivers.container import ContainerDriver, ContainerHandle, nofile_limit
from scaigrid.worker.net.userns import (
    OWNER_UID_BASE,
    OWNER_UID_COUNT,
    check_owner_range,
    lease_owner_uid,
    owner_leases,
    owner_uid,
    release_owner_uid,
)
from scaigrid.worker.rootfs.idshift import DEFAULT_ID_BASE
from tests.worker.conftest import TEST_CACHE, StartBunker
from tests.worker.helpers import agent_exec

#: Where the hog binary appears inside a bunker (copied into its writable layer).
HOG = "/inotify-hog"


@pytest.fixture(scope="session")
def inotify_hog() -> Path:
    """The static ``inotify-hog`` binary (tests/worker/inotify_hog.c), built once per source."""
    source = Path(__file__).with_name("inotify_hog.c")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    binary = TEST_CACHE / f"inotify-hog-{digest}"
    if not binary.exists():
        if shutil.which("gcc") is None:
            pytest.skip("gcc (with libc6-dev) is needed to build inotify-hog")
        TEST_CACHE.mkdir(parents=True, exist_ok=True)
        tmp = TEST_CACHE / f".inotify-hog-{os.getpid()}"
        subprocess.run(["gcc", "-static", "-O2", "-o", str(tmp), str(source)], check=True)
        os.replace(tmp, binary)
    return binary


def _with_hog(binary: Path, id_base: int) -> Callable[[Path], None]:
    """A ``populate_upper`` that puts ``binary`` at :data:`HOG`, owned by the bunker's root."""

    def populate(upper: Path) -> None:
        target = upper / HOG.lstrip("/")
        shutil.copyfile(binary, target)
        os.chown(target, id_base, id_base)
        os.chmod(target, 0o755)

    return populate


def _host_inotify_works() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    if fd < 0:
        assert ctypes.get_errno() == errno.EMFILE, os.strerror(ctypes.get_errno())
        return False
    os.close(fd)
    return True


async def _hog(handle: ContainerHandle, count: int) -> tuple[int, str]:
    """Run the hog in the bunker holding up to ``count`` instances; return what it made."""
    code, out = await agent_exec(handle, f"{HOG} {count} hold >/tmp/hog.out 2>&1 &")
    assert code == 0, out
    code, out = await agent_exec(
        handle,
        "for i in $(seq 100); do [ -s /tmp/hog.out ] && break; sleep 0.1; done; cat /tmp/hog.out",
    )
    created, _, status = out.strip().partition(" ")
    assert code == 0 and created.isdigit(), out
    return int(created), status


async def test_bunkers_and_host_root_do_not_share_inotify_instances(
    driver: ContainerDriver, start_bunker: StartBunker, inotify_hog: Path
) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    populate = _with_hog(inotify_hog, driver.id_base)
    greedy = await start_bunker(populate_upper=populate)
    other = await start_bunker(populate_upper=populate)
    # The greedy bunker gets the whole per-user allowance of its owner uid, and no more.
    created, status = await _hog(greedy, limit + 16)
    assert (created, status) == (limit, "Too many open files")
    # Another bunker is charged to its own owner uid, host root to uid 0.
    code, out = await agent_exec(other, f"{HOG} 1")
    assert (code, out.strip()) == (0, "1 ok")
    assert _host_inotify_works()
    # Once the greedy bunker is gone, its instances are released with it.
    await driver.stop(greedy.bunker_id)
    code, out = await agent_exec(other, f"{HOG} 8")
    assert (code, out.strip()) == (0, "8 ok")


async def test_each_bunker_has_its_own_owner_uid(
    driver: ContainerDriver, start_bunker: StartBunker
) -> None:
    handles = [await start_bunker() for _ in range(3)]
    owners = [owner_uid(f"/proc/{await h.init_pid()}/ns/user") for h in handles]
    assert len(set(owners)) == 3
    leases = owner_leases()
    for handle, uid in zip(handles, owners, strict=True):
        assert OWNER_UID_BASE <= uid < OWNER_UID_BASE + OWNER_UID_COUNT
        assert not driver.id_base <= uid < driver.id_base + 65536
        assert leases[uid] == str(handle.state_dir / "userns")
        # The bunker sees its usual mapping in the namespace it joined, and its fd limit.
        code, out = await agent_exec(
            handle, "cat /proc/self/uid_map /proc/self/gid_map; ulimit -Sn; ulimit -Hn"
        )
        mapping = ["0", str(driver.id_base), "65536"]
        assert code == 0 and out.split() == [*mapping, *mapping, *[str(nofile_limit())] * 2]
    await driver.stop(handles[0].bunker_id)
    assert owners[0] not in owner_leases()


def test_owner_uid_leases_are_exclusive_and_run_out() -> None:
    # A range of uids no bunker uses, so the test never takes a real bunker's owner uid.
    base, holders = 0x7FFF0000, [f"/nonexistent/sbt-lease-{i}-{os.getpid()}" for i in range(3)]
    try:
        first = lease_owner_uid(holders[0], base, 2)
        second = lease_owner_uid(holders[1], base, 2)
        assert {first, second} == {base, base + 1}
        with pytest.raises(OSError) as raised:
            lease_owner_uid(holders[2], base, 2)
        assert raised.value.errno == errno.ENOSPC
        assert release_owner_uid(holders[0]) == [first]
        assert lease_owner_uid(holders[2], base, 2) == first
    finally:
        for holder in holders:
            release_owner_uid(holder)
    assert not set(holders) & set(owner_leases().values())


def test_the_owner_range_must_be_free() -> None:
    check_owner_range(DEFAULT_ID_BASE)
    with pytest.raises(ValueError, match="overlap the bunkers"):
        check_owner_range(OWNER_UID_BASE - 100)
    with pytest.raises(ValueError, match="include user"):
        check_owner_range(DEFAULT_ID_BASE, base=1, count=10)

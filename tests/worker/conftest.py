"""Fixtures for worker tests: real crun/runc, namespaces, cgroups and loop devices (root only).

* ``work_root`` — a scratch directory under /var/tmp traversable by the bunkers' root.
* ``busybox_tar`` / ``busybox_image`` — a static busybox root packed as .tar.gz, and its
  shifted tree built through :class:`ImageCache` (so the tar source is exercised too).
* ``fake_agent_dir`` — ``fake_agent.c`` compiled statically (cached under
  /var/cache/scaibunker-test), used as the bunker's ``agent_runtime``.
* ``crun_enabled`` — applies the hybrid-cgroup fix for crun for the session when the host
  needs it, and reverts it at the end.
* ``driver`` — a :class:`ContainerDriver` per runtime (``crun`` and ``runc``): tests using it
  run once with each.
* ``start_bunker`` — ``await start_bunker(memory_mb=..., ...)`` starts a bunker running the
  fake agent; every bunker it started is stopped at the end of the test.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scaigrid.ids import new_id
from scaigrid.worker.drivers.base import BunkerSpec, Resources
from scaigrid.worker.drivers.container import (
    ContainerDriver,
    ContainerHandle,
    disable_crun_on_hybrid_cgroups,
    enable_crun_on_hybrid_cgroups,
)
from scaigrid.worker.rootfs import ImageCache
from scaigrid.worker.rootfs.mounts import mounts_under
from tests.worker.helpers import FAKE_AGENT_ARGV

#: Cache kept between test runs (fake agent binary, debootstrap image).
TEST_CACHE = Path("/var/cache/scaibunker-test")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Worker tests need root (namespaces, mounts, cgroups): skip them otherwise."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="worker driver tests need root")
    for item in items:
        if "tests/worker" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def work_root() -> Iterator[Path]:
    """Scratch dir under /var/tmp, mode 0711 (runtimes enter it as the bunkers' root)."""
    root = Path(tempfile.mkdtemp(prefix="sbt-", dir="/var/tmp"))
    root.chmod(0o711)
    yield root
    for point in mounts_under(root):
        subprocess.run(["umount", "-l", point], check=False)
    shutil.rmtree(root, ignore_errors=True)


def make_busybox_root(path: Path) -> Path:
    """A root with only static busybox and its applet symlinks in /bin (no /etc/passwd)."""
    (path / "bin").mkdir(parents=True)
    busybox = shutil.which("busybox") or "/bin/busybox"
    shutil.copy2(busybox, path / "bin" / "busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        if applet != "busybox":
            (path / "bin" / applet).symlink_to("busybox")
    return path


@pytest.fixture(scope="session")
def busybox_tar(work_root: Path) -> Path:
    """A busybox root filesystem as .tar.gz (members relative, root entry ``.``)."""
    root = make_busybox_root(work_root / "busybox-src")
    archive = work_root / "busybox.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname=".")
    return archive


@pytest.fixture(scope="session")
def fake_agent_dir() -> Path:
    """Directory holding the static fake agent, built once per source version."""
    source = Path(__file__).with_name("fake_agent.c")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    target = TEST_CACHE / f"fake-agent-{digest}"
    binary = target / "fake-agent"
    if not binary.exists():
        if shutil.which("gcc") is None:
            pytest.skip("gcc (with libc6-dev) is needed to build the fake agent")
        target.mkdir(parents=True, exist_ok=True)
        os.chmod(TEST_CACHE, 0o755)
        tmp = target / f".fake-agent-{os.getpid()}"
        subprocess.run(["gcc", "-static", "-O2", "-o", str(tmp), str(source)], check=True)
        os.replace(tmp, binary)
    return target


@pytest.fixture(scope="session")
async def image_cache(work_root: Path) -> ImageCache:
    """An image cache for this session."""
    return ImageCache(work_root / "images")


@pytest.fixture(scope="session")
async def busybox_image(image_cache: ImageCache, busybox_tar: Path) -> Path:
    """The shifted busybox tree (built from ``busybox_tar`` through the tar source)."""
    return await image_cache.ensure("img_busybox", {"kind": "tar", "path": str(busybox_tar)})


@pytest.fixture(scope="session")
def crun_enabled() -> Iterator[None]:
    """Make crun usable on hybrid cgroup hosts for the session (reverted at the end)."""
    mounted = enable_crun_on_hybrid_cgroups()
    yield
    if mounted:
        disable_crun_on_hybrid_cgroups(mounted)


@pytest.fixture(scope="session", params=["crun", "runc"])
async def driver(request: pytest.FixtureRequest, work_root: Path) -> AsyncIterator[ContainerDriver]:
    """A container driver forced to one runtime; its bunkers are gone at the end."""
    runtime = request.param
    if runtime == "crun":
        request.getfixturevalue("crun_enabled")
    instance = ContainerDriver(
        work_root / f"data-{runtime}",
        runtimes=(runtime,),
        cgroup_parent=f"sbt-{os.getpid()}-{runtime}",
    )
    assert instance.runtime == runtime
    yield instance
    for bunker_id in await instance.list_leftovers():
        await instance.stop(bunker_id)
    instance.cgroups.prune()


StartBunker = Callable[..., Awaitable[ContainerHandle]]


@pytest.fixture
async def start_bunker(
    driver: ContainerDriver, busybox_image: Path, fake_agent_dir: Path
) -> AsyncIterator[StartBunker]:
    """``await start_bunker(cpu_millicores=1000, memory_mb=256, disk_mb=64, pids_max=256,
    rootfs=busybox_image, netns_path=None)``: a bunker running the fake agent."""
    started: list[str] = []

    async def start(**options: Any) -> ContainerHandle:
        resources = Resources(
            cpu_millicores=options.pop("cpu_millicores", 1000),
            memory_mb=options.pop("memory_mb", 256),
            disk_mb=options.pop("disk_mb", 64),
            pids_max=options.pop("pids_max", 256),
        )
        spec = BunkerSpec(
            bunker_id=new_id("bnk"),
            rootfs=options.pop("rootfs", busybox_image),
            resources=resources,
            agent_runtime=fake_agent_dir,
            init_argv=options.pop("init_argv", FAKE_AGENT_ARGV),
            **options,
        )
        started.append(spec.bunker_id)
        return await driver.start(spec)

    yield start
    for bunker_id in started:
        await driver.stop(bunker_id)
    driver.cgroups.prune()

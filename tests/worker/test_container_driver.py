"""The container driver against real crun and runc: isolation, limits, filesystem, lifecycle.

Every test here runs once per runtime (the ``driver`` fixture is parametrized).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from scaigrid.ids import new_id
from scaigrid.worker.drivers.base import BunkerSpec, DriverError, Resources
from scaigrid.worker.drivers.container import ContainerDriver, ContainerHandle, cpu_quota_us
from scaigrid.worker.net.userns import owner_leases
from scaigrid.worker.rootfs.mounts import mount_points
from tests.worker.conftest import StartBunker
from tests.worker.helpers import (
    FAKE_AGENT_ARGV,
    agent_exec,
    in_workload,
    manifest,
    setup_workload_cgroup,
)

NAMESPACES = ("user", "pid", "mnt", "net", "ipc", "uts", "cgroup")


def host_cgroup_dir(driver: ContainerDriver, controller: str, bunker_id: str) -> Path:
    return driver.cgroups.hierarchies[controller] / driver.cgroups.parent / bunker_id


async def test_all_seven_namespaces_are_new(start_bunker: StartBunker) -> None:
    handle = await start_bunker()
    pid = await handle.init_pid()
    for ns in NAMESPACES:
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns


async def test_starting_a_bunker_leaves_the_hosts_dev_null_alone(
    start_bunker: StartBunker,
) -> None:
    """crun chowns its stdio to the bunker's root; /dev/null must never be that stdio."""
    os.chown("/dev/null", 0, 0)
    await start_bunker()
    st = os.stat("/dev/null")
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert stat.S_ISCHR(st.st_mode)


async def test_the_run_dir_cannot_fill_the_host_disk(start_bunker: StartBunker) -> None:
    handle = await start_bunker()
    code, out = await agent_exec(
        handle, "dd if=/dev/zero of=/.scaibunker-run/fill bs=1M count=8 2>&1; echo rc=$?"
    )
    assert code == 0
    assert "rc=0" not in out and "No space left" in out


async def test_bunker_root_is_an_unprivileged_host_uid(
    driver: ContainerDriver, start_bunker: StartBunker
) -> None:
    handle = await start_bunker()
    pid = await handle.init_pid()
    status = Path(f"/proc/{pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == [str(driver.id_base)] * 4
    code, out = await agent_exec(handle, "id -u; id -g; cat /proc/self/uid_map; hostname")
    assert code == 0
    lines = out.split()
    assert lines[:2] == ["0", "0"]
    assert lines[2:5] == ["0", str(driver.id_base), "65536"]
    assert lines[5] == "bunker"


async def test_capabilities_no_new_privs_and_seccomp(
    driver: ContainerDriver, start_bunker: StartBunker
) -> None:
    handle = await start_bunker()
    code, out = await agent_exec(
        handle, "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status"
    )
    assert code == 0
    fields = dict(line.split(":\t") for line in out.strip().splitlines())
    # CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP NET_BIND_SERVICE SYS_CHROOT
    # AUDIT_WRITE SETFCAP; no MKNOD, NET_RAW, SYS_ADMIN.
    assert fields["CapEff"] == "00000000a00405fb"
    assert fields["CapBnd"] == "00000000a00405fb"
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"
    code, out = await agent_exec(handle, "unshare -U true")
    assert code != 0 and "Operation not permitted" in out
    code, out = await agent_exec(handle, "mkdir -p /mnt && mount -t tmpfs none /mnt")
    assert code != 0
    code, out = await agent_exec(handle, "mknod /tmp/null c 1 3")
    assert code != 0
    if driver.oom_score_adj is not None:
        _, out = await agent_exec(handle, "cat /proc/1/oom_score_adj")
        assert out.strip() == "-1000"


async def test_memory_limit_kills_a_hog_and_the_agent_keeps_answering(
    driver: ContainerDriver, start_bunker: StartBunker
) -> None:
    handle = await start_bunker(memory_mb=128)
    memory = host_cgroup_dir(driver, "memory", handle.bunker_id)
    assert (memory / "memory.limit_in_bytes").read_text().strip() == str(128 << 20)
    procs = await setup_workload_cgroup(handle)
    code, out = await agent_exec(handle, in_workload(procs, "/.scaibunker/fake-agent --hog 400"))
    assert code == 137, out
    assert "allocated" not in out
    oom = dict(
        line.split()
        for line in (memory / "workload" / "memory.oom_control").read_text().splitlines()
    )
    assert int(oom["oom_kill"]) >= 1
    code, out = await agent_exec(handle, "echo alive")
    assert (code, out.strip()) == (0, "alive")
    # Below the workload limit the same allocation succeeds.
    code, out = await agent_exec(
        handle, in_workload(procs, "timeout -s KILL 2 /.scaibunker/fake-agent --hog 32")
    )
    assert "allocated 32" in out


async def test_pids_limit_stops_a_fork_bomb_and_the_host_is_unaffected(
    driver: ContainerDriver, start_bunker: StartBunker
) -> None:
    handle = await start_bunker(pids_max=64)
    pids = host_cgroup_dir(driver, "pids", handle.bunker_id)
    procs = await setup_workload_cgroup(handle)
    workload_max = manifest(handle)["workload"]["pids_max"]  # type: ignore[index]
    bomb = in_workload(procs, "(b(){ b & b & wait; }; b) >/dev/null 2>&1 &")
    code, _ = await agent_exec(handle, bomb)
    assert code == 0
    await asyncio.sleep(1.0)
    assert int((pids / "workload" / "pids.current").read_text()) <= workload_max
    assert int((pids / "pids.current").read_text()) <= 64
    assert "max" in (pids / "workload" / "pids.events").read_text()
    assert int((pids / "workload" / "pids.events").read_text().split()[1]) > 0
    code, out = await agent_exec(handle, "echo alive")
    assert (code, out.strip()) == (0, "alive")
    assert subprocess.run(["true"], check=False).returncode == 0


async def test_cpu_quota_is_visible_and_throttles(start_bunker: StartBunker) -> None:
    handle = await start_bunker(cpu_millicores=250)
    code, out = await agent_exec(
        handle, "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us"
    )
    assert code == 0
    assert out.split() == [str(cpu_quota_us(250)), "100000"] == ["25000", "100000"]
    await agent_exec(handle, "timeout 1 sh -c 'while :; do :; done'")
    _, out = await agent_exec(handle, "cat /sys/fs/cgroup/cpu/cpu.stat")
    stats = dict(line.split() for line in out.strip().splitlines())
    assert int(stats["nr_throttled"]) > 0


async def test_writes_land_in_the_upper_layer_and_the_image_is_untouched(
    driver: ContainerDriver, start_bunker: StartBunker, busybox_image: Path
) -> None:
    handle = await start_bunker()
    code, out = await agent_exec(
        handle, "echo hello > /etc/bunker-test && rm /bin/ls && touch /root-owned"
    )
    assert code == 0, out
    upper = handle.state_dir / "disk" / "upper"
    assert (upper / "etc" / "bunker-test").read_text() == "hello\n"
    whiteout = os.lstat(upper / "bin" / "ls")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert os.lstat(upper / "root-owned").st_uid == driver.id_base
    assert not (busybox_image / "etc" / "bunker-test").exists()
    assert (busybox_image / "bin" / "ls").is_symlink()
    code, _ = await agent_exec(handle, "test -e /bin/ls")
    assert code == 1


async def test_writing_past_disk_mb_fails_with_enospc(start_bunker: StartBunker) -> None:
    handle = await start_bunker(disk_mb=16)
    code, out = await agent_exec(handle, "dd if=/dev/zero of=/fill bs=1M count=64")
    assert code != 0
    assert "No space left on device" in out
    disk = os.stat(handle.state_dir / "disk.ext4")
    assert disk.st_size == 16 << 20
    assert disk.st_blocks * 512 <= 16 << 20
    code, out = await agent_exec(handle, "rm /fill && echo ok > /after")
    assert code == 0, out


async def test_isolated_network_has_only_loopback(start_bunker: StartBunker) -> None:
    handle = await start_bunker()
    code, out = await agent_exec(handle, "ls /sys/class/net; ip -o link")
    assert code == 0
    assert out.split("\n", 1)[0] == "lo"
    assert [line.split(":")[1].strip() for line in out.strip().splitlines()[1:]] == ["lo"]


async def test_joins_a_given_network_namespace(start_bunker: StartBunker) -> None:
    name = f"sbt-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(
            ["ip", "-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
            check=True,
        )
        handle = await start_bunker(netns_path=f"/var/run/netns/{name}")
        pid = await handle.init_pid()
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/var/run/netns/{name}").st_ino
        code, out = await agent_exec(handle, "ls /sys/class/net")
        assert code == 0
        assert sorted(out.split()) == ["lo", "v0", "v1"]
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


async def test_pause_freezes_and_resume_thaws(
    driver: ContainerDriver, start_bunker: StartBunker
) -> None:
    handle = await start_bunker()
    counter = handle.state_dir / "disk" / "upper" / "tmp" / "counter"
    loop = "i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; usleep 20000; done"
    loop = f"({loop}) >/dev/null 2>&1 &"
    assert (await agent_exec(handle, loop))[0] == 0

    async def value() -> int:
        for _ in range(50):
            text = counter.read_text().strip() if counter.exists() else ""
            if text:
                return int(text)
            await asyncio.sleep(0.01)
        raise AssertionError("counter never written")

    await asyncio.sleep(0.2)
    await driver.pause(handle)
    await driver.pause(handle)
    freezer = host_cgroup_dir(driver, "freezer", handle.bunker_id)
    assert (freezer / "freezer.state").read_text().strip() == "FROZEN"
    frozen = await value()
    await asyncio.sleep(0.4)
    assert await value() == frozen
    await driver.resume(handle)
    await driver.resume(handle)
    await asyncio.sleep(0.3)
    assert await value() > frozen
    assert (await agent_exec(handle, "echo alive"))[1].strip() == "alive"


def assert_released(driver: ContainerDriver, bunker_id: str, state_dir: Path) -> None:
    assert not state_dir.exists()
    assert not [m for m in mount_points() if str(state_dir) in m]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    assert str(state_dir) not in loops
    for mount_point in {*driver.cgroups.hierarchies.values()}:
        assert not (mount_point / driver.cgroups.parent / bunker_id).exists()
    assert not (driver.data_dir / "runtime" / driver.runtime / bunker_id).exists()
    assert not [h for h in owner_leases().values() if h.startswith(f"{state_dir}/")]


async def test_stop_releases_everything_and_is_idempotent(
    driver: ContainerDriver, start_bunker: StartBunker
) -> None:
    handle = await start_bunker()
    pid = await handle.init_pid()
    await agent_exec(handle, "sleep 1000 >/dev/null 2>&1 &")
    # A second binding without autoclear, as a worker killed mid-setup would leave.
    subprocess.run(["losetup", "-f", str(handle.state_dir / "disk.ext4")], check=True)
    await driver.stop(handle.bunker_id)
    assert_released(driver, handle.bunker_id, handle.state_dir)
    assert not Path(f"/proc/{pid}").exists()
    assert await handle.wait_exit() == 137
    await driver.stop(handle.bunker_id)
    assert handle.bunker_id not in await driver.list_leftovers()


async def test_wait_exit_returns_pid1_status(
    driver: ContainerDriver, start_bunker: StartBunker
) -> None:
    handle = await start_bunker()
    with contextlib.suppress(ConnectionError):  # PID 1's exit takes the connection down
        await agent_exec(handle, "kill -USR1 1")
    assert await asyncio.wait_for(handle.wait_exit(), 10) == 3
    assert handle.exited


async def test_failed_start_leaves_nothing_behind(
    driver: ContainerDriver, busybox_image: Path, fake_agent_dir: Path
) -> None:
    bunker_id = new_id("bnk")
    spec = BunkerSpec(
        bunker_id=bunker_id,
        rootfs=busybox_image,
        resources=Resources(cpu_millicores=500, memory_mb=64, disk_mb=16),
        agent_runtime=fake_agent_dir,
        init_argv=("/does/not/exist",),
    )
    with pytest.raises(DriverError, match="before its agent listened"):
        await driver.start(spec)
    assert_released(driver, bunker_id, driver.data_dir / "bunkers" / bunker_id)
    assert bunker_id not in await driver.list_leftovers()


async def test_agent_that_never_listens_times_out_cleanly(
    driver: ContainerDriver, busybox_image: Path
) -> None:
    bunker_id = new_id("bnk")
    spec = BunkerSpec(
        bunker_id=bunker_id,
        rootfs=busybox_image,
        resources=Resources(cpu_millicores=500, memory_mb=64, disk_mb=16),
        init_argv=("/bin/sleep", "600"),
    )
    previous, driver.start_timeout_s = driver.start_timeout_s, 0.5
    try:
        with pytest.raises(DriverError, match="did not accept"):
            await driver.start(spec)
    finally:
        driver.start_timeout_s = previous
    assert_released(driver, bunker_id, driver.data_dir / "bunkers" / bunker_id)


async def test_rejects_an_image_tree_that_is_not_shifted(
    driver: ContainerDriver, work_root: Path
) -> None:
    plain = work_root / f"unshifted-{driver.runtime}"
    plain.mkdir(exist_ok=True)
    spec = BunkerSpec(
        bunker_id=new_id("bnk"),
        rootfs=plain,
        resources=Resources(cpu_millicores=500, memory_mb=64, disk_mb=16),
        init_argv=FAKE_AGENT_ARGV,
    )
    with pytest.raises(DriverError, match="not shifted"):
        await driver.start(spec)


WORKER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from scaigrid.worker.drivers.base import BunkerSpec, Resources
    from scaigrid.worker.drivers.container import ContainerDriver

    async def main():
        data_dir, runtime, parent, rootfs, agent, bunker_id = sys.argv[1:]
        driver = ContainerDriver(Path(data_dir), runtimes=(runtime,), cgroup_parent=parent)
        spec = BunkerSpec(
            bunker_id=bunker_id, rootfs=Path(rootfs),
            resources=Resources(cpu_millicores=500, memory_mb=64, disk_mb=16),
            agent_runtime=Path(agent),
            init_argv=("/.scaibunker/fake-agent", "--listen", "/.scaibunker-run/agent.sock"),
        )
        await driver.start(spec)
        print("started", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_leftovers_of_a_killed_worker_are_found_and_cleaned(
    driver: ContainerDriver, busybox_image: Path, fake_agent_dir: Path
) -> None:
    bunker_id = new_id("bnk")
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WORKER_SCRIPT,
        str(driver.data_dir),
        driver.runtime,
        driver.cgroups.parent,
        str(busybox_image),
        str(fake_agent_dir),
        bunker_id,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert worker.stdout is not None
    try:
        async with asyncio.timeout(60):
            while (line := await worker.stdout.readline()).strip() != b"started":
                assert line, "the worker died before starting its bunker"
    finally:
        worker.kill()  # as a crash would: no cleanup runs
        await worker.wait()

    assert bunker_id in await driver.list_leftovers()
    state_dir = driver.data_dir / "bunkers" / bunker_id
    pids = (host_cgroup_dir(driver, "pids", bunker_id) / "cgroup.procs").read_text().split()
    assert pids
    await driver.stop(bunker_id)
    assert_released(driver, bunker_id, state_dir)
    assert bunker_id not in await driver.list_leftovers()
    for pid in pids:
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "State:\tZ" in status.read_text()


async def test_agent_socket_path_longer_than_sun_path_still_connects(
    start_bunker: StartBunker,
) -> None:
    handle = await start_bunker()
    deep = handle.state_dir.parent / ("x" * 90)
    deep.mkdir()
    try:
        os.symlink(handle.state_dir / "run" / "agent.sock", deep / "agent.sock")
        long_handle = ContainerHandle(
            handle.bunker_id, handle.runtime, handle.state_dir, handle._process, []
        )
        long_handle.agent_socket = deep / "agent.sock"
        assert len(str(long_handle.agent_socket)) > 108
        code, out = await agent_exec(long_handle, "echo far")
        assert (code, out.strip()) == (0, "far")
    finally:
        (deep / "agent.sock").unlink(missing_ok=True)
        deep.rmdir()


async def test_stop_during_a_fork_bomb_releases_everything_within_the_deadline(
    driver: ContainerDriver, start_bunker: StartBunker
) -> None:
    handle = await start_bunker(pids_max=256, cpu_millicores=500)
    procs = await setup_workload_cgroup(handle)
    bomb = in_workload(procs, "(bomb() { bomb | bomb & }; bomb) >/dev/null 2>&1 &")
    code, _ = await agent_exec(handle, bomb)
    assert code == 0
    pids = host_cgroup_dir(driver, "pids", handle.bunker_id)
    await asyncio.sleep(3.0)
    assert int((pids / "workload" / "pids.current").read_text()) > 100
    started = time.monotonic()
    await driver.stop(handle.bunker_id)
    assert time.monotonic() - started < 15
    assert_released(driver, handle.bunker_id, handle.state_dir)

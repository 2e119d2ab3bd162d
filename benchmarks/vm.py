"""MicroVM benchmark: the qemu driver's boot → agent ready and exec round trip, beside a
bare ``qemu-system-x86_64`` boot of the same kernel and initramfs to a trivial init.

* boot → agent ready: :meth:`QemuDriver.start` (scratch disk, QEMU start, kernel, initramfs
  mounting the overlay root, ``switch_root`` into the Python agent, which logs
  ``agent.ready`` on the console) plus the first host connection: serial handshake, HTTP/2
  connect and one ``ping``. The base and runtime disks are baked before the first sample.
* baseline: the same QEMU machine, kernel and initramfs with ``rdinit=/bin/busybox --
  poweroff -f`` (no disks, no agent): QEMU start to exit.
* exec round trip: ``POST /v1/exec`` of ``true`` over the agent channel (virtio-serial),
  start to final trailers.
* snapshot of the writable layer (``--snapshots``; the first VM holds a 64 MiB random file
  and a few small ones): agent ``POST /v1/sync``, QMP ``stop``, the driver's
  ``frozen_layer`` (sparse copy of the scratch disk, ``e2fsck``, read-only mount), the
  archive (:func:`~scaigrid.worker.snapshots.archive_layer`), ``cont``: the time the guest
  is frozen or flushing. Baseline: ``archive_layer`` of the same tree from a host directory,
  which is all a container bunker's snapshot freezes for.

Usage (as root, from the repository root)::

    .venv/bin/python -m benchmarks.vm [--boots 10] [--execs 100] [--snapshots 5] [--accel tcg]

The machine runs one VM at a time (2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from tests.vm.conftest import build_busybox_tree

from benchmarks.run import percentile
from scaigrid.ids import new_id
from scaigrid.protocol.agent import AgentClient
from scaigrid.worker.drivers.base import BunkerSpec, Resources
from scaigrid.worker.drivers.qemu import (
    MachineConfig,
    QemuDriver,
    QemuHandle,
    kernel_cmdline,
    qemu_argv,
)
from scaigrid.worker.rootfs.agent_runtime import agent_argv, agent_env, ensure_agent_runtime
from scaigrid.worker.snapshots import archive_layer

DATA = Path("/var/tmp/scaibunker-vm-bench")


def bare_boot_ms(driver: QemuDriver) -> float:
    """QEMU start to exit for the trivial-init boot, in ms."""
    machine = MachineConfig(
        accel=driver.accel,
        vcpus=1,
        memory_mb=512,
        kernel=driver.artifacts.kernel,
        initramfs=driver.artifacts.initramfs,
        cmdline=kernel_cmdline(driver.tsc_khz, "rdinit=/bin/busybox", "--", "poweroff", "-f"),
    )
    started = time.perf_counter()
    subprocess.run(qemu_argv(machine), stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    return (time.perf_counter() - started) * 1000


async def exec_true(client: AgentClient) -> None:
    body = {"exec_id": f"exe_{uuid.uuid4().hex}", "command": ["true"]}
    response = await client.request("POST", "/v1/exec", body, None, timeout_s=30)
    async for _ in response.exec_events():
        pass
    await response.trailers()


async def agent_sync(client: AgentClient) -> None:
    response = await client.request("POST", "/v1/sync", {}, timeout_s=60)
    async with response:
        await response.json()


def archive_ms(upper: Path, out: Path) -> float:
    """Archive ``upper`` (guest ids) into ``out``; return the time in ms."""
    started = time.perf_counter()
    with out.open("wb") as fh:
        archive_layer(upper, fh, 0)
    return (time.perf_counter() - started) * 1000


async def snapshot_samples(
    driver: QemuDriver, handle: QemuHandle, client: AgentClient, runs: int, work: Path
) -> tuple[list[float], list[float], list[float]]:
    """``runs`` snapshots of the VM's layer: (frozen ms, copy+check+mount ms, baseline ms)."""
    body = {
        "exec_id": f"exe_{uuid.uuid4().hex}",
        "command": "mkdir -p /data && head -c 67108864 /dev/urandom > /data/random"
        " && for i in $(seq 1 200); do echo $i > /data/small-$i; done",
        "user": "root",
    }
    response = await client.request("POST", "/v1/exec", body, None, timeout_s=300)
    async for _ in response.exec_events():
        pass
    await response.trailers()
    frozen: list[float] = []
    prepare: list[float] = []
    baseline: list[float] = []
    host_copy = work / "host-upper"
    # Unmeasured first pass: the host copy of the layer for the baseline.
    await agent_sync(client)
    await driver.pause(handle)
    async with driver.frozen_layer(handle.bunker_id) as upper:
        await asyncio.to_thread(shutil.copytree, upper, host_copy, symlinks=True)
    await driver.resume(handle)
    for _ in range(runs):
        started = time.perf_counter()
        await agent_sync(client)
        await driver.pause(handle)
        async with driver.frozen_layer(handle.bunker_id) as upper:
            prepare.append((time.perf_counter() - started) * 1000)
            await asyncio.to_thread(archive_ms, upper, work / "vm.tar.zst")
        await driver.resume(handle)
        frozen.append((time.perf_counter() - started) * 1000)
        baseline.append(await asyncio.to_thread(archive_ms, host_copy, work / "host.tar.zst"))
    return frozen, prepare, baseline


async def measure(
    boots: int, execs: int, snapshots: int, accel: str | None
) -> dict[str, list[float]]:
    DATA.mkdir(mode=0o700, exist_ok=True)
    top = Path(tempfile.mkdtemp(prefix="sbvm-bench-", dir="/var/tmp"))
    try:
        tree = build_busybox_tree(top)
        runtime = ensure_agent_runtime(Path("/var/cache/scaibunker-test"))
        driver = QemuDriver(DATA, accel=accel, boot_timeout_s=120)

        def spec() -> BunkerSpec:
            return BunkerSpec(
                bunker_id=new_id("bnk"),
                rootfs=tree,
                resources=Resources(cpu_millicores=1000, memory_mb=512, disk_mb=256),
                env=agent_env(),
                agent_runtime=runtime,
                init_argv=tuple(agent_argv("/.scaibunker-run/agent.sock")),
            )

        warm = spec()  # bakes the base and runtime disks, fills the page cache
        await driver.start(warm)
        await driver.stop(warm.bunker_id)
        results: dict[str, list[float]] = {"boot": [], "bare": [], "exec": []}
        for index in range(boots):
            results["bare"].append(await asyncio.to_thread(bare_boot_ms, driver))
            one = spec()
            started = time.perf_counter()
            handle = await driver.start(one)
            reader, writer = await handle.open_agent_stream()
            client = await AgentClient.connect(reader, writer, timeout_s=20)
            await client.ping(timeout_s=10)
            results["boot"].append((time.perf_counter() - started) * 1000)
            if index == 0:
                for _ in range(execs):
                    t0 = time.perf_counter()
                    await exec_true(client)
                    results["exec"].append((time.perf_counter() - t0) * 1000)
                if snapshots:
                    frozen, prepare, base = await snapshot_samples(
                        driver, handle, client, snapshots, top
                    )
                    results.update(snap=frozen, snap_prepare=prepare, snap_base=base)
            await client.close()
            await driver.stop(one.bunker_id)
        print(f"accel: {driver.accel}")
        return results
    finally:
        shutil.rmtree(top, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--boots", type=int, default=10)
    parser.add_argument("--execs", type=int, default=100)
    parser.add_argument("--snapshots", type=int, default=5)
    parser.add_argument("--accel", choices=("kvm", "tcg"), default=None)
    args = parser.parse_args()
    results = asyncio.run(measure(args.boots, args.execs, args.snapshots, args.accel))
    boot, bare, execs = results["boot"], results["bare"], results["exec"]
    print(f"machine: {platform.node()}, {platform.machine()}")
    print("| measurement | n | p50 ms | p99 ms | baseline | n | p50 ms | p99 ms | ratio p50 |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| boot → agent ready (qemu driver) | {len(boot)} | {percentile(boot, 50):.0f} | "
        f"{percentile(boot, 99):.0f} | bare QEMU boot, trivial init | {len(bare)} | "
        f"{percentile(bare, 50):.0f} | {percentile(bare, 99):.0f} | "
        f"{percentile(boot, 50) / percentile(bare, 50):.2f} |"
    )
    print(
        f"| exec round trip, `true` (agent over virtio-serial) | {len(execs)} | "
        f"{percentile(execs, 50):.1f} | {percentile(execs, 99):.1f} | — | | | | |"
    )
    if results.get("snap"):
        snap, prepare, base = results["snap"], results["snap_prepare"], results["snap_base"]
        print(
            f"| snapshot, guest frozen or flushing (sync → cont), 64 MiB layer | {len(snap)} | "
            f"{percentile(snap, 50):.0f} | {percentile(snap, 99):.0f} | `archive_layer` of "
            f"the same tree in a host directory | {len(base)} | {percentile(base, 50):.0f} | "
            f"{percentile(base, 99):.0f} | {percentile(snap, 50) / percentile(base, 50):.2f} |"
        )
        print(
            f"| of which sync + stop + copy + e2fsck + mount | {len(prepare)} | "
            f"{percentile(prepare, 50):.0f} | {percentile(prepare, 99):.0f} | — | | | | |"
        )


if __name__ == "__main__":
    main()

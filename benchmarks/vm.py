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

Usage (as root, from the repository root)::

    .venv/bin/python -m benchmarks.vm [--boots 10] [--execs 100] [--accel tcg]

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
from scaigrid.worker.drivers.qemu import MachineConfig, QemuDriver, kernel_cmdline, qemu_argv
from scaigrid.worker.rootfs.agent_runtime import agent_argv, agent_env, ensure_agent_runtime

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


async def measure(boots: int, execs: int, accel: str | None) -> dict[str, list[float]]:
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
    parser.add_argument("--accel", choices=("kvm", "tcg"), default=None)
    args = parser.parse_args()
    results = asyncio.run(measure(args.boots, args.execs, args.accel))
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


if __name__ == "__main__":
    main()

"""Runtime probing and fallback, and the documents the driver writes (OCI config, cgroups.json)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from scaigrid.ids import new_id
from scaigrid.worker.drivers.base import BunkerSpec, DriverError, Resources
from scaigrid.worker.drivers.container import (
    BunkerCgroups,
    ContainerDriver,
    WorkloadLimits,
    build_oci_config,
    cgroups_manifest,
    hybrid_cgroup_conflicts,
)
from tests.worker.helpers import FAKE_AGENT_ARGV, agent_exec


async def run_one_bunker(driver: ContainerDriver, image: Path, agent: Path) -> None:
    spec = BunkerSpec(
        bunker_id=new_id("bnk"),
        rootfs=image,
        resources=Resources(cpu_millicores=500, memory_mb=64, disk_mb=16),
        agent_runtime=agent,
        init_argv=FAKE_AGENT_ARGV,
    )
    handle = await driver.start(spec)
    try:
        assert await agent_exec(handle, "echo up") == (0, "up\n")
    finally:
        await driver.stop(spec.bunker_id)
        driver.cgroups.prune()


async def test_default_choice_follows_the_host(
    work_root: Path, busybox_image: Path, fake_agent_dir: Path
) -> None:
    conflicts = hybrid_cgroup_conflicts()
    with capture_logs() as logs:
        driver = ContainerDriver(work_root / "data-auto", cgroup_parent=f"sbt-{os.getpid()}-auto")
    refused = [e for e in logs if e["event"] == "container_driver.runtime_refused"]
    if conflicts:
        assert driver.runtime == "runc"
        assert refused and refused[0]["runtime"] == "crun"
        assert "hybrid" in refused[0]["reason"]
    else:
        assert driver.runtime == "crun" and not refused
    ready = next(e for e in logs if e["event"] == "container_driver.ready")
    assert ready["runtime"] == driver.runtime
    await run_one_bunker(driver, busybox_image, fake_agent_dir)


HYBRID_PROBE = """
import json, sys
from pathlib import Path
from structlog.testing import capture_logs
from scaigrid.worker.drivers.container import ContainerDriver, hybrid_cgroup_conflicts
with capture_logs() as logs:
    driver = ContainerDriver(Path(sys.argv[1]), cgroup_parent=sys.argv[2])
refused = [e for e in logs if e["event"] == "container_driver.runtime_refused"]
print(json.dumps({"runtime": driver.runtime, "conflicts": hybrid_cgroup_conflicts(),
                  "refused": [[e["runtime"], e["reason"]] for e in refused]}))
"""


def test_crun_refusing_a_hybrid_host_falls_back_to_runc(tmp_path: Path, work_root: Path) -> None:
    unified = Path("/sys/fs/cgroup/unified/cgroup.controllers")
    if not unified.exists():
        pytest.skip("not a hybrid cgroup host")
    # In a private mount namespace, make the unified hierarchy list a controller again, as
    # stock hybrid hosts do, without touching the host's real cgroup layout.
    fake = tmp_path / "controllers"
    fake.write_text("hugetlb\n")
    script = (
        f"mount --bind {fake} {unified} && exec {sys.executable} -c '{HYBRID_PROBE}' "
        f"{work_root / 'data-hybrid'} sbt-{os.getpid()}-hybrid"
    )
    try:
        result = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        BunkerCgroups(f"sbt-{os.getpid()}-hybrid").prune()
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["conflicts"] == ["hugetlb"]
    assert report["runtime"] == "runc"
    assert report["refused"][0][0] == "crun"
    assert "hybrid" in report["refused"][0][1] and "hugetlb" in report["refused"][0][1]


async def test_falls_back_when_the_preferred_runtime_fails_its_probe(
    work_root: Path, busybox_image: Path, fake_agent_dir: Path
) -> None:
    # /bin/false is a real program that "refuses" every container, like a broken runtime.
    with capture_logs() as logs:
        driver = ContainerDriver(
            work_root / "data-fallback",
            runtimes=("false", "runc"),
            cgroup_parent=f"sbt-{os.getpid()}-fallback",
        )
    assert driver.runtime == "runc"
    assert any(e.get("runtime") == "false" for e in logs if e["event"].endswith("runtime_refused"))
    await run_one_bunker(driver, busybox_image, fake_agent_dir)


def test_no_working_runtime_is_a_driver_error(work_root: Path) -> None:
    with pytest.raises(DriverError, match="no OCI runtime works"):
        ContainerDriver(
            work_root / "data-none",
            runtimes=("false", "no-such-runtime"),
            cgroup_parent=f"sbt-{os.getpid()}-none",
        )


def test_oci_config_isolates_the_bunker(tmp_path: Path) -> None:
    config = build_oci_config(
        root_path=tmp_path,
        argv=["/init"],
        env={"LANG": "C.UTF-8"},
        hostname="bunker",
        id_base=2031616,
        cgroups_path="/scaibunker/bnk_x",
        resources=Resources(cpu_millicores=1500, memory_mb=512, disk_mb=1024, pids_max=100),
        memsw=True,
        netns_path=None,
        oom_score_adj=-1000,
    )
    assert config["ociVersion"] == "1.0.2"
    linux = config["linux"]
    assert {ns["type"] for ns in linux["namespaces"]} == {
        "pid",
        "network",
        "ipc",
        "uts",
        "mount",
        "user",
        "cgroup",
    }
    assert all("path" not in ns for ns in linux["namespaces"])
    assert linux["uidMappings"] == [{"containerID": 0, "hostID": 2031616, "size": 65536}]
    assert linux["resources"]["memory"] == {"limit": 512 << 20, "swap": 512 << 20}
    assert linux["resources"]["cpu"] == {"quota": 150000, "period": 100000}
    assert linux["resources"]["pids"] == {"limit": 100}
    assert linux["seccomp"]["defaultAction"] == "SCMP_ACT_ALLOW"
    denied = {name for rule in linux["seccomp"]["syscalls"] for name in rule["names"]}
    assert {"mount", "unshare", "setns", "bpf", "keyctl", "kexec_load", "ptrace"} - denied == {
        "ptrace"
    }
    caps = config["process"]["capabilities"]
    assert "CAP_SYS_ADMIN" not in caps["bounding"] and "CAP_NET_RAW" not in caps["bounding"]
    assert caps["inheritable"] == [] and caps["ambient"] == []
    assert config["process"]["noNewPrivileges"] is True
    assert config["process"]["oomScoreAdj"] == -1000
    assert "LANG=C.UTF-8" in config["process"]["env"]
    assert "/proc/kcore" in linux["maskedPaths"] and "/proc/sys" in linux["readonlyPaths"]
    joined = build_oci_config(
        root_path=tmp_path,
        argv=["/init"],
        env={},
        hostname="bunker",
        id_base=2031616,
        cgroups_path="/x",
        resources=Resources(cpu_millicores=100, memory_mb=64, disk_mb=16),
        memsw=False,
        netns_path="/var/run/netns/x",
        sysfs_source=tmp_path / "sysfs",
    )
    network = next(ns for ns in joined["linux"]["namespaces"] if ns["type"] == "network")
    assert network == {"type": "network", "path": "/var/run/netns/x"}
    assert "swap" not in joined["linux"]["resources"]["memory"]
    assert "oomScoreAdj" not in joined["process"]
    sys_mount = next(m for m in joined["mounts"] if m["destination"] == "/sys")
    assert sys_mount["type"] == "bind" and "ro" in sys_mount["options"]


def test_workload_keeps_headroom_for_the_agent() -> None:
    assert WorkloadLimits.for_resources(Resources(1000, 256, 64, 1024)) == WorkloadLimits(
        memory_bytes=(256 - 32) << 20, pids_max=1024 - 64
    )
    assert WorkloadLimits.for_resources(Resources(1000, 4096, 64, 64)) == WorkloadLimits(
        memory_bytes=(4096 - 128) << 20, pids_max=64 - 16
    )
    tiny = WorkloadLimits.for_resources(Resources(100, 32, 16, 8))
    assert tiny == WorkloadLimits(memory_bytes=16 << 20, pids_max=4)


def test_cgroups_manifest_tells_the_agent_what_to_do(work_root: Path) -> None:
    cgroups = BunkerCgroups(f"sbt-{os.getpid()}-manifest")
    doc = cgroups_manifest(cgroups, Resources(1000, 256, 64, 128), agent_protected=False)
    assert doc["version"] == 1
    assert doc["bunker"] == {
        "memory_bytes": 256 << 20,
        "pids_max": 128,
        "cpu_quota_us": 100000,
        "cpu_period_us": 100000,
    }
    workload = doc["workload"]
    assert workload["oom_score_adj"] == 500
    assert workload["memory_bytes"] == (256 - 32) << 20 and workload["pids_max"] == 112
    if cgroups.version == 1:
        assert set(doc["controllers"]) == {"memory", "pids", "cpu", "cpuacct"}
        assert {"op": "write", "path": "/sys/fs/cgroup/pids/workload/pids.max", "value": "112"} in (
            workload["setup"]
        )
        assert "/sys/fs/cgroup/memory/workload/cgroup.procs" in workload["procs"]
    else:
        assert doc["controllers"] == {"unified": "/sys/fs/cgroup"}

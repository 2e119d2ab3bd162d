"""Exec and files benchmarks (issue #5), each beside a baseline measured in the same run.

* ``exec round trip``: ``POST /exec {"command": ["true"]}`` over the HTTP API. Baseline:
  ``crun exec`` (or ``runc exec``) of ``true`` into a bare container of the same root tree.
* ``stdout throughput``: a foreground exec of ``head -c N /dev/zero`` whose output crosses
  agent → worker → controller (kept head-and-tail there), and the same over SSE to the
  client. Baseline: the same command piped to ``/dev/null`` inside the bunker (timed as an
  exec, so it includes one exec round trip).
* ``upload`` / ``download``: a ``--file-mib`` file streamed with ``PUT`` / ``GET .../files``
  (each upload round writes a new file: the previous one is deleted first, untimed).
  Baselines: ``cat`` of the same file into the bare container through the runtime
  (``cat FILE | crun exec … sh -c 'cat >/dev/null'``), and as many bytes out of it
  (``crun exec … head -c N /dev/zero``; its root is read-only, so no copy of the file).

* ``archive``: ``GET .../files/archive`` of the home directory holding the uploaded file, and
  ``PUT .../files/archive`` of a local tar of it into a fresh directory (same baselines as
  the file rows).

Throughputs are MB/s (10^6 bytes per second) of the best and median of ``--rounds`` runs.
Beside each, the CPU time the controller, the worker and the guest agent spent on it (CPU
seconds per GiB moved, or CPU milliseconds per exec), read from ``/proc/PID/stat``: on a
shared, loaded machine these say where the work goes even when wall times are dominated by
waiting for a core.

Usage (as root, from the repository root)::

    .venv/bin/python -m benchmarks.exec_files [--execs 200] [--stdout-mib 256] \
        [--file-mib 1024] [--rounds 3] [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from tests.fixtures.stack import BASE, Stack, build_busybox_tar, start_stack

from benchmarks.run import BareContainer, bunker_rootfs, percentile, settle_default_image, timed
from benchmarks.shell import PART as SHELL_PART

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Exec, processes and files (issue #5)"
_CHUNK = 1 << 20
_LIMITS = ("KEY", "USER", "TENANT", "PARTNER")


def _rate(
    nbytes: int,
    action: Callable[[], None],
    rounds: int,
    before: Callable[[], None] | None = None,
) -> list[float]:
    """MB/s of ``rounds`` runs of ``action`` moving ``nbytes`` each (``before`` runs untimed
    ahead of each)."""
    rates = []
    for _ in range(rounds):
        if before is not None:
            before()
        start = time.perf_counter()
        action()
        rates.append(nbytes / 1e6 / (time.perf_counter() - start))
    return rates


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds of the controller, its worker and the newest guest agent, per measurement."""

    def __init__(self, controller_pid: int) -> None:
        table = subprocess.run(
            ["ps", "-e", "-o", "pid=,ppid=,args="], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        children: dict[int, list[int]] = {}
        args: dict[int, str] = {}
        for row in table:
            pid, ppid, command = row.strip().split(None, 2) + [""] * (3 - len(row.split(None, 2)))
            children.setdefault(int(ppid), []).append(int(pid))
            args[int(pid)] = command
        self.pids = {"controller": controller_pid}
        workers = children.get(controller_pid, [])
        if workers:
            self.pids["worker"] = workers[0]
            # The agent of the benchmark's bunker: the newest agent below that worker.
            below, agents = list(workers), []
            while below:
                pid = below.pop()
                below.extend(children.get(pid, []))
                if "scaigrid.agent" in args.get(pid, ""):
                    agents.append(pid)
            if agents:
                self.pids["agent"] = max(agents)

    def measure(self, action: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
        """Run ``action``; return its result and the CPU seconds each process used."""
        before = {name: _cpu_s(pid) for name, pid in self.pids.items()}
        result = action()
        return result, {name: _cpu_s(pid) - before[name] for name, pid in self.pids.items()}


@contextlib.contextmanager
def _bare(rootfs: Path) -> Iterator[tuple[str, str]]:
    """A bare container running ``sleep``: yields ``(runtime, name)``."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as workdir:
        bare = BareContainer(rootfs, Path(workdir))
        with bare.running(rootfs):
            yield bare.runtime, "bench-exec"


def measure(
    stack: Stack, image: dict[str, Any], execs: int, stdout_mib: int, file_mib: int, rounds: int
) -> dict[str, Any]:
    """Run every measurement and its baseline; return samples (ms or MB/s)."""
    results: dict[str, Any] = {}
    stdout_bytes, file_bytes = stdout_mib << 20, file_mib << 20
    with tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:
        local = Path(scratch) / "blob"
        digest = hashlib.sha256()
        with local.open("wb") as fh:
            for _ in range(file_mib):
                block = os.urandom(_CHUNK)
                digest.update(block)
                fh.write(block)
        with stack.client() as client:
            client.timeout = httpx.Timeout(600)
            bunker = client.post(
                f"{BASE}/bunkers",
                params={"wait_s": 60},
                json={"image": image["name"], "memory_mb": 1024, "disk_mb": file_mib * 2 + 512},
            ).json()["data"]
            exec_url = f"{BASE}/bunkers/{bunker['id']}/exec"
            files_url = f"{BASE}/bunkers/{bunker['id']}/files"

            def run(command: Any, **fields: Any) -> None:
                body = {"command": command, "timeout_s": 600, **fields}
                answer = client.post(exec_url, json=body).json()
                data = answer.get("data") or {}
                if data.get("status") != "exited" or data.get("exit_code") != 0:
                    raise RuntimeError(f"exec failed: {answer}")

            timed(lambda: run(["true"]), 20)
            meter = CpuMeter(stack.process.pid)
            cpu: dict[str, dict[str, float]] = {}
            results["cpu"] = cpu
            results["exec_round_trip"], cpu["exec_round_trip"] = meter.measure(
                lambda: timed(lambda: run(["true"]), execs)
            )
            produce = f"head -c {stdout_bytes} /dev/zero"
            results["stdout_api"], cpu["stdout_api"] = meter.measure(
                lambda: _rate(stdout_bytes, lambda: run(produce, max_output_bytes=1 << 20), rounds)
            )

            def sse() -> None:
                with client.stream(
                    "POST",
                    exec_url,
                    json={"command": produce, "timeout_s": 600, "encoding": "base64"},
                    headers={"Accept": "text/event-stream"},
                ) as response:
                    for _ in response.iter_bytes(_CHUNK):
                        pass

            results["stdout_sse"], cpu["stdout_sse"] = meter.measure(
                lambda: _rate(stdout_bytes, sse, rounds)
            )
            results["stdout_inside"] = _rate(
                stdout_bytes, lambda: run(f"{produce} >/dev/null"), rounds
            )

            def upload() -> None:
                with local.open("rb") as fh:
                    response = client.put(
                        files_url,
                        params={"path": "blob"},
                        content=iter(lambda: fh.read(_CHUNK), b""),
                        headers={"Content-Type": "application/octet-stream"},
                    )
                if response.json()["data"]["sha256"] != digest.hexdigest():
                    raise RuntimeError(f"upload digest mismatch: {response.text}")

            def download() -> None:
                received = 0
                with client.stream("GET", files_url, params={"path": "blob"}) as response:
                    for chunk in response.iter_bytes(_CHUNK):
                        received += len(chunk)
                if received != file_bytes:
                    raise RuntimeError(f"download returned {received} of {file_bytes} bytes")

            def remove_blob() -> None:
                # Each round uploads a new file: overwriting one that still fills the page
                # cache of the bunker's memory limit would time its disk's writeback.
                client.delete(files_url, params={"path": "blob"})

            results["upload"], cpu["upload"] = meter.measure(
                lambda: _rate(file_bytes, upload, rounds, before=remove_blob)
            )
            results["download"], cpu["download"] = meter.measure(
                lambda: _rate(file_bytes, download, rounds)
            )
            archive_url = f"{files_url}/archive"
            local_tar = Path(scratch) / "blob.tar"
            with tarfile.open(local_tar, "w") as tar:
                tar.add(local, arcname="blob")
            tar_bytes = local_tar.stat().st_size
            client.post(exec_url, json={"command": "mkdir -p /home/user/arch-src"})
            client.post(exec_url, json={"command": "mv blob arch-src/blob"})

            def archive_download() -> None:
                received = 0
                with client.stream("GET", archive_url, params={"path": "arch-src"}) as response:
                    for chunk in response.iter_bytes(_CHUNK):
                        received += len(chunk)
                if received < file_bytes:
                    raise RuntimeError(f"archive of {received} bytes: {response.status_code}")

            def archive_upload() -> None:
                with local_tar.open("rb") as fh:
                    response = client.put(
                        archive_url,
                        params={"path": "arch-dst"},
                        content=iter(lambda: fh.read(_CHUNK), b""),
                    )
                if response.json()["data"].get("bytes") != file_bytes:
                    raise RuntimeError(f"archive upload: {response.text}")

            results["archive_download"], cpu["archive_download"] = meter.measure(
                lambda: _rate(tar_bytes, archive_download, rounds)
            )
            results["archive_upload"], cpu["archive_upload"] = meter.measure(
                lambda: _rate(tar_bytes, archive_upload, rounds)
            )
            results["sizes"] = {
                "stdout": stdout_bytes,
                "file": file_bytes,
                "tar": tar_bytes,
                "rounds": rounds,
                "execs": execs,
            }
            client.delete(f"{BASE}/bunkers/{bunker['id']}")

        with _bare(bunker_rootfs(stack, image)) as (runtime, name):
            results["runtime"] = runtime

            def bare_exec() -> None:
                subprocess.run(
                    [runtime, "exec", name, "true"], capture_output=True, check=True, timeout=30
                )

            timed(bare_exec, 10)
            results["bare_exec"] = timed(bare_exec, execs)

            def bare_upload() -> None:
                # Piped like the API's upload (a file descriptor handed straight to the
                # container would let cat skip the copy).
                subprocess.run(
                    ["sh", "-c", f"cat {local} | {runtime} exec {name} sh -c 'cat >/dev/null'"],
                    check=True,
                    timeout=600,
                )

            # The bare root is read-only, so the bytes that leave it come from /dev/zero.
            def bare_download() -> None:
                subprocess.run(
                    [runtime, "exec", name, "head", "-c", str(file_bytes), "/dev/zero"],
                    stdout=subprocess.DEVNULL,
                    check=True,
                    timeout=600,
                )

            results["bare_upload"] = _rate(file_bytes, bare_upload, rounds)
            results["bare_download"] = _rate(file_bytes, bare_download, rounds)
    return results


def report(results: dict[str, Any], command: str, sizes: str) -> str:
    """Render the results as a Markdown section."""
    runtime = results["runtime"]
    ours, base = results["exec_round_trip"], results["bare_exec"]
    cpu, sizes_of = results["cpu"], results["sizes"]
    exec_cpu = ", ".join(
        f"{name} {seconds * 1000 / sizes_of['execs']:.1f}"
        for name, seconds in cpu["exec_round_trip"].items()
    )
    lines = [
        SECTION,
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.node()}, {platform.machine()}, 2 cores shared with other "
        f"engineers' runs; image `busybox`; bare runtime `{runtime}`; {sizes}; run "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| measurement | n | p50 ms | p99 ms | baseline | p50 ms | p99 ms | ratio p50 "
        "| target p50 |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| exec round trip, `true` (HTTP API) | {len(ours)} | {statistics.median(ours):.1f} | "
        f"{percentile(ours, 99):.1f} | bare `{runtime} exec true` | "
        f"{statistics.median(base):.1f} | {percentile(base, 99):.1f} | "
        f"{statistics.median(ours) / statistics.median(base):.2f} | ≤ 5 |",
        "",
        f"CPU per exec (ms): {exec_cpu}.",
        "",
        "| throughput | n | median MB/s | best MB/s | baseline | median MB/s | best MB/s "
        "| target | CPU s/GiB: controller, worker, agent |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [
        (
            "stdout, foreground exec (HTTP API)",
            "stdout_api",
            "piped to /dev/null inside",
            "stdout_inside",
            "≥ 200",
        ),
        (
            "stdout, SSE stream to the client (base64)",
            "stdout_sse",
            "piped to /dev/null inside",
            "stdout_inside",
            "≥ 200",
        ),
        (
            "upload, PUT /files",
            "upload",
            f"`cat FILE \\| {runtime} exec … cat >/dev/null`",
            "bare_upload",
            "≥ 300",
        ),
        (
            "download, GET /files",
            "download",
            f"`{runtime} exec … head -c N /dev/zero`",
            "bare_download",
            "≥ 300",
        ),
        (
            "tar of a directory, GET /files/archive",
            "archive_download",
            f"`{runtime} exec … head -c N /dev/zero`",
            "bare_download",
            "—",
        ),
        (
            "tar extracted into a directory, PUT /files/archive",
            "archive_upload",
            f"`cat FILE \\| {runtime} exec … cat >/dev/null`",
            "bare_upload",
            "—",
        ),
    ]
    moved = {
        "stdout_api": sizes_of["stdout"],
        "stdout_sse": sizes_of["stdout"],
        "upload": sizes_of["file"],
        "download": sizes_of["file"],
        "archive_download": sizes_of["tar"],
        "archive_upload": sizes_of["tar"],
    }
    for label, key, base_label, base_key, target in rows:
        mine, theirs = results[key], results[base_key]
        gib = moved[key] * sizes_of["rounds"] / (1 << 30)
        per_gib = ", ".join(f"{seconds / gib:.2f}" for seconds in cpu[key].values())
        lines.append(
            f"| {label} | {len(mine)} | {statistics.median(mine):.0f} | {max(mine):.0f} | "
            f"{base_label} | {statistics.median(theirs):.0f} | {max(theirs):.0f} | {target} "
            f"| {per_gib} |"
        )
    return "\n".join(lines) + "\n"


def write_section(section: str) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, keeping the PTY echo part
    ``benchmarks.shell`` writes into it."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        end = rest.find("\n## ") + 1 if "\n## " in rest else len(rest)
        old, tail = rest[:end], rest[end:]
        if SHELL_PART in old:
            section = section.rstrip("\n") + "\n\n" + SHELL_PART + old.partition(SHELL_PART)[2]
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


def main() -> None:
    """Parse arguments, start a stack, measure, print (and optionally record) the results."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--execs", type=int, default=200)
    parser.add_argument("--stdout-mib", type=int, default=256)
    parser.add_argument("--file-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="record in benchmarks/RESULTS.md")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="scaibunker-bench-", dir="/var/tmp"))
    # The SPEC's default rate limits (60 requests a minute per key) would throttle the run.
    unlimited = {f"SCAIGRID_RATE_LIMIT_{level}_PER_MIN": "1000000" for level in _LIMITS}
    stack = start_stack(data_dir, {"SCAIGRID_LOG_LEVEL": "WARNING", **unlimited})
    settle_default_image(stack)
    try:
        image = stack.register_image(
            "busybox", {"kind": "tar", "path": str(build_busybox_tar(data_dir))}
        )
        results = measure(stack, image, args.execs, args.stdout_mib, args.file_mib, args.rounds)
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    command = (
        f".venv/bin/python -m benchmarks.exec_files --execs {args.execs} --stdout-mib "
        f"{args.stdout_mib} --file-mib {args.file_mib} --rounds {args.rounds}"
    )
    sizes = f"stdout {args.stdout_mib} MiB, file {args.file_mib} MiB"
    section = report(results, command, sizes)
    print(section)
    if args.write:
        write_section(section)


if __name__ == "__main__":
    main()

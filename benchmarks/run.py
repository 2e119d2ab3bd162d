"""Walking-skeleton benchmarks: bunker create → first exec, and exec round trip.

Each figure is printed beside a baseline measured on the same machine in the same run:

* ``create_to_first_exec``: ``POST /bunkers?wait_s=60`` then ``POST /exec true`` until it
  answers ``exited 0``, over the HTTP API of a real controller and worker. Baseline: a bare
  ``crun run`` (or ``runc run`` where crun cannot run) of ``true`` from the same root tree.
* ``exec_round_trip``: ``POST /exec {"command": ["true"]}`` on a running bunker. Baseline:
  ``crun exec`` / ``runc exec`` of ``true`` into a bare container of the same root tree.

Usage (as root, from the repository root)::

    .venv/bin/python -m benchmarks.run [--image debian-12] [--creates 50] [--execs 200] [--write]

``--write`` replaces the walking-skeleton section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.fixtures.stack import (
    BASE,
    Stack,
    StackError,
    build_busybox_tar,
    remove_data_dir,
    start_stack,
)

from scaigrid.modules.scaibunker.dev import DEFAULT_IMAGE

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Walking skeleton (issue #2)"


def settle_default_image(stack: Stack) -> None:
    """Wait until the dev worker's bake of the default image (debootstrap, started on every
    fresh data dir) has ended, ready or failed, so that it does not share the cores with
    the measurements."""
    with contextlib.suppress(StackError):
        stack.wait_image(DEFAULT_IMAGE)


def percentile(samples: list[float], pct: float) -> float:
    """Nearest-rank percentile of ``samples`` (milliseconds in, milliseconds out)."""
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def timed(action: Callable[[], None], count: int) -> list[float]:
    """Run ``action`` ``count`` times; return each duration in milliseconds."""
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        action()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


class BareContainer:
    """A bare OCI bundle over an image's root tree, run by crun or runc with no ScaiBunker code."""

    def __init__(self, rootfs: Path, workdir: Path) -> None:
        self.bundle = workdir / "bundle"
        self.bundle.mkdir()
        self.runtime = ""
        for runtime in ("crun", "runc"):
            if shutil.which(runtime) is None:
                continue
            self._write_spec(runtime, rootfs, ["true"])
            probe = subprocess.run(
                [runtime, "run", "--bundle", str(self.bundle), "bench-probe"],
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=30,
                check=False,
            )
            subprocess.run(
                [runtime, "delete", "-f", "bench-probe"], capture_output=True, check=False
            )
            if probe.returncode == 0:
                self.runtime = runtime
                break
        if not self.runtime:
            raise RuntimeError("neither crun nor runc can run a bare container here")

    def _write_spec(self, runtime: str, rootfs: Path, argv: list[str]) -> None:
        (self.bundle / "config.json").unlink(missing_ok=True)
        subprocess.run([runtime, "spec", "--bundle", str(self.bundle)], check=True)
        spec = json.loads((self.bundle / "config.json").read_text())
        spec["root"] = {"path": str(rootfs), "readonly": True}
        spec["process"]["terminal"] = False
        spec["process"]["args"] = argv
        (self.bundle / "config.json").write_text(json.dumps(spec))

    def run_true(self) -> None:
        """One whole container lifecycle: create, start, wait for ``true``, delete."""
        subprocess.run(
            [self.runtime, "run", "--bundle", str(self.bundle), "bench-run"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=True,
            timeout=30,
        )

    @contextlib.contextmanager
    def running(self, rootfs: Path) -> Iterator[Callable[[], None]]:
        """Keep a container running ``sleep``; yield a function that execs ``true`` into it."""
        self._write_spec(self.runtime, rootfs, ["sleep", "100000"])
        name = "bench-exec"
        subprocess.run(
            [self.runtime, "run", "--detach", "--bundle", str(self.bundle), name],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
            timeout=30,
        )

        def exec_true() -> None:
            subprocess.run(
                [self.runtime, "exec", name, "true"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=True,
                timeout=30,
            )

        try:
            yield exec_true
        finally:
            subprocess.run([self.runtime, "delete", "-f", name], capture_output=True, check=False)
            self._write_spec(self.runtime, rootfs, ["true"])


def bunker_rootfs(stack: Stack, image: dict[str, Any]) -> Path:
    """The worker's cached root tree of ``image`` (the tree bunkers start from)."""
    return stack.data_dir / "worker" / "images" / image["id"] / "rootfs"


def measure(stack: Stack, image: dict[str, Any], creates: int, execs: int) -> dict[str, Any]:
    """Run both measurements and their baselines; return samples in milliseconds."""
    with stack.client() as client:

        def create_and_exec() -> None:
            response = client.post(
                f"{BASE}/bunkers",
                params={"wait_s": 60},
                json={"image": image["name"], "memory_mb": 256, "disk_mb": 256},
            )
            bunker = response.json()["data"]
            result = client.post(
                f"{BASE}/bunkers/{bunker['id']}/exec", json={"command": ["true"]}
            ).json()["data"]
            if result["status"] != "exited" or result["exit_code"] != 0:
                raise RuntimeError(f"first exec failed: {result}")
            created.append(bunker["id"])

        created: list[str] = []
        create_samples = []
        for _ in range(creates):
            create_samples += timed(create_and_exec, 1)
            client.delete(f"{BASE}/bunkers/{created[-1]}")

        bunker = client.post(
            f"{BASE}/bunkers",
            params={"wait_s": 60},
            json={"image": image["name"], "memory_mb": 256, "disk_mb": 256},
        ).json()["data"]

        def exec_true() -> None:
            result = client.post(
                f"{BASE}/bunkers/{bunker['id']}/exec", json={"command": ["true"]}
            ).json()["data"]
            if result["exit_code"] != 0:
                raise RuntimeError(f"exec failed: {result}")

        timed(exec_true, 10)
        exec_samples = timed(exec_true, execs)
        client.delete(f"{BASE}/bunkers/{bunker['id']}")

    rootfs = bunker_rootfs(stack, image)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as workdir:
        bare = BareContainer(rootfs, Path(workdir))
        bare_run = timed(bare.run_true, creates)
        with bare.running(rootfs) as bare_exec_true:
            timed(bare_exec_true, 10)
            bare_exec = timed(bare_exec_true, execs)
    return {
        "runtime": bare.runtime,
        "create_to_first_exec": create_samples,
        "bare_run": bare_run,
        "exec_round_trip": exec_samples,
        "bare_exec": bare_exec,
    }


def report(results: dict[str, Any], image: str, command: str) -> str:
    """Render the results as a Markdown section."""
    runtime = results["runtime"]
    rows = [
        (
            "create → first exec ok (HTTP API)",
            "create_to_first_exec",
            f"bare `{runtime} run true`",
            "bare_run",
            400,
        ),
        (
            "exec round trip, `true` (HTTP API)",
            "exec_round_trip",
            f"bare `{runtime} exec true`",
            "bare_exec",
            15,
        ),
    ]
    lines = [
        SECTION,
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.node()}, {platform.machine()}, 2 cores; image `{image}`; "
        f"bare runtime `{runtime}`; run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| measurement | n | p50 ms | p99 ms | baseline | p50 ms | p99 ms | ratio p50 "
        "| target p50 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, key, base_label, base_key, target in rows:
        ours, base = results[key], results[base_key]
        p50, base_p50 = statistics.median(ours), statistics.median(base)
        lines.append(
            f"| {label} | {len(ours)} | {p50:.1f} | {percentile(ours, 99):.1f} | {base_label} | "
            f"{base_p50:.1f} | {percentile(base, 99):.1f} | {p50 / base_p50:.2f} | ≤ {target} |"
        )
    return "\n".join(lines) + "\n"


def write_section(section: str) -> None:
    """Replace (or append) the walking-skeleton section of RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        tail = rest[rest.find("\n## ") + 1 :] if "\n## " in rest else ""
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


def main() -> None:
    """Parse arguments, start a stack, measure, print (and optionally record) the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="debian-12", help="debian-12 or busybox")
    parser.add_argument("--creates", type=int, default=50)
    parser.add_argument("--execs", type=int, default=200)
    parser.add_argument("--write", action="store_true", help="record in benchmarks/RESULTS.md")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="scaibunker-bench-", dir="/var/tmp"))
    stack = start_stack(data_dir, {"SCAIGRID_LOG_LEVEL": "WARNING"})
    try:
        if args.image == "busybox":
            image = stack.register_image(
                "busybox", {"kind": "tar", "path": str(build_busybox_tar(data_dir))}
            )
        else:
            image = stack.wait_image(args.image)
        results = measure(stack, image, args.creates, args.execs)
    finally:
        stack.stop()
        remove_data_dir(data_dir)
    command = ".venv/bin/python -m benchmarks.run " + " ".join(
        f"--{k} {v}"
        for k, v in (("image", args.image), ("creates", args.creates), ("execs", args.execs))
    )
    section = report(results, args.image, command)
    print(section)
    if args.write:
        write_section(section)


if __name__ == "__main__":
    main()

"""PTY keystroke echo over the shell WebSocket (issue #5), beside a local PTY baseline.

* ``keystroke echo (WebSocket)``: one byte sent on ``GET /bunkers/{id}/shell`` (SDK
  :class:`scaigrid.client.Shell`) to ``stty -icanon -echo; cat`` in a busybox bunker, timed
  until the byte comes back: client → controller → worker link → agent → PTY → ``cat`` and
  the whole way back.
* Baseline: the same ``stty -icanon -echo; cat`` on a local PTY of this machine (Python
  ``pty.fork``), same byte, same timing, same run.

Usage (as root, from the repository root)::

    .venv/bin/python -m benchmarks.shell [--keys 500] [--write]

``--write`` replaces the ``### PTY keystroke echo`` part of the
``## Exec, processes and files (issue #5)`` section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import pty
import select
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from tests.fixtures.stack import BASE, build_busybox_tar, start_stack

from benchmarks.run import percentile, settle_default_image
from scaigrid.client import Client

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Exec, processes and files (issue #5)"
PART = "### PTY keystroke echo (shell)"
_LIMITS = ("KEY", "USER", "TENANT", "PARTNER")
_CAT = b"stty -icanon -echo; echo READY; cat\n"


def local_echo(keys: int) -> list[float]:
    """Milliseconds per keystroke echo through ``cat`` on a local PTY."""
    pid, master = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execv("/bin/sh", ["/bin/sh", "-c", "stty -icanon -echo; echo READY; exec cat"])
    try:
        out = b""
        while b"READY" not in out:
            out += os.read(master, 4096)
        samples = []
        for _ in range(keys):
            start = time.perf_counter()
            os.write(master, b"x")
            got = b""
            while b"x" not in got:
                select.select([master], [], [], 5)
                got += os.read(master, 4096)
            samples.append((time.perf_counter() - start) * 1000)
        return samples
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(master)


def websocket_echo(client: Client, bunker_id: str, keys: int) -> list[float]:
    """Milliseconds per keystroke echo through the shell WebSocket."""
    with client.shell(bunker_id) as shell:
        shell.send(_CAT)
        shell.read_until(b"READY\r\n")
        samples = []
        for _ in range(keys):
            start = time.perf_counter()
            shell.send(b"x")
            got = b""
            while b"x" not in got:
                chunk = shell.recv(10)
                assert chunk is not None
                got += chunk
            samples.append((time.perf_counter() - start) * 1000)
        shell.send(b"\x04")
    return samples


def report(ours: list[float], base: list[float], command: str) -> str:
    """The Markdown part for RESULTS.md."""
    ratio = statistics.median(ours) / statistics.median(base)
    return "\n".join(
        [
            PART,
            "",
            f"Command: `{command}`  ",
            f"Machine: {platform.node()}, {platform.machine()}, 2 cores shared with other "
            f"engineers' runs; image `busybox`; run "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            "",
            "| measurement | n | p50 ms | p99 ms | baseline | p50 ms | p99 ms | ratio p50 |",
            "|---|---|---|---|---|---|---|---|",
            f"| keystroke echo, `cat` on the bunker's PTY (WebSocket) | {len(ours)} | "
            f"{statistics.median(ours):.2f} | {percentile(ours, 99):.2f} | "
            f"`cat` on a local PTY | {statistics.median(base):.3f} | "
            f"{percentile(base, 99):.3f} | {ratio:.0f} |",
            "",
        ]
    )


def write_part(part: str) -> None:
    """Replace (or add) this part inside the issue #5 section of RESULTS.md."""
    text = RESULTS.read_text()
    if PART in text:
        head, _, rest = text.partition(PART)
        cut = min(
            (i for i in (rest.find("\n## "), rest.find("\n### ")) if i >= 0), default=len(rest)
        )
        text = head + part + rest[cut + 1 :] if cut < len(rest) else head + part
    elif SECTION in text:
        head, _, rest = text.partition(SECTION)
        cut = rest.find("\n## ")
        if cut >= 0:
            text = head + SECTION + rest[: cut + 1] + "\n" + part + rest[cut:]
        else:
            text = head + SECTION + rest.rstrip("\n") + "\n\n" + part
    else:
        text = text.rstrip("\n") + "\n\n" + SECTION + "\n\n" + part
    RESULTS.write_text(text)


def main() -> None:
    """Start a stack, measure both, print (and optionally record) the results."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--keys", type=int, default=500)
    parser.add_argument("--write", action="store_true", help="record in benchmarks/RESULTS.md")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="scaibunker-bench-", dir="/var/tmp"))
    unlimited = {f"SCAIGRID_RATE_LIMIT_{level}_PER_MIN": "1000000" for level in _LIMITS}
    stack = start_stack(data_dir, {"SCAIGRID_LOG_LEVEL": "WARNING", **unlimited})
    settle_default_image(stack)
    try:
        stack.register_image("busybox", {"kind": "tar", "path": str(build_busybox_tar(data_dir))})
        stack.wait_image("busybox")
        with stack.client() as http:
            response = http.post(
                f"{BASE}/bunkers", params={"wait_s": 60}, json={"image": "busybox"}
            )
            bunker_id = response.json()["data"]["id"]
        with Client(stack.url, stack.admin_key) as client:
            websocket_echo(client, bunker_id, 20)  # warm up
            ours = websocket_echo(client, bunker_id, args.keys)
        base = local_echo(args.keys)
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    part = report(ours, base, f".venv/bin/python -m benchmarks.shell --keys {args.keys}")
    print(part)
    if args.write:
        write_part(part)


if __name__ == "__main__":
    main()

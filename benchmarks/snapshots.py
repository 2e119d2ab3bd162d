"""Snapshot benchmark: a writable layer with 500 MB of changes, snapshotted and restored, beside
``tar | zstd`` and ``zstd -d | tar`` of the same tree in the same run.

* snapshot — :func:`~scaigrid.worker.snapshots.archive_layer` (PAX tar, whiteout and owner
  conversion, zstd level 3 on all cores, sha256 while writing) to a local file, then the
  worker's :class:`~scaigrid.worker.objects.ObjectClient` upload through a standalone
  ``bunker_proxy`` process (local-directory backend) that hashes it again.
* restore — download through the proxy, then
  :func:`~scaigrid.worker.snapshots.restore_layer` (verify sha256, unpack sparse-aware, shift
  owners to the id base).
* baseline — ``tar --sparse --xattrs -c | zstd -3 -T0`` to a file, and
  ``zstd -dc | tar --xattrs -x`` back; no transfer, no checksum.

The tree (default 500 MiB): 200 MiB of random bytes in 4 files, 300 MiB of compressible text in
3000 files of 100 KiB, a 1 GiB sparse file with 1 MiB of data, hard links and symlinks, all
owned by shifted ids like a real upper dir. MB/s = tree content MiB / seconds.

Usage (as root, from the repository root)::

    .venv/bin/python -m benchmarks.snapshots [--runs 3] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.storage.conftest import SECRET, _stop, start_proxy

from benchmarks.run import RESULTS, percentile
from scaigrid.modules.scaibunker.storage.capabilities import mint
from scaigrid.worker.objects import ObjectClient
from scaigrid.worker.rootfs.idshift import DEFAULT_ID_BASE
from scaigrid.worker.snapshots import archive_layer, restore_layer

SECTION = "## Snapshots (issue #8)"
MIB = 1024 * 1024
KEY = "scaibunker/snapshots/tnt_bench/snp_bench.tar.zst"


def build_tree(root: Path, random_mib: int, text_mib: int) -> int:
    """Build the layer; return its content size in bytes (sparse holes not counted)."""
    root.mkdir()
    (root / "random").mkdir()
    for i in range(4):
        (root / "random" / f"blob{i}").write_bytes(os.urandom(random_mib * MIB // 4))
    text = root / "text"
    text.mkdir()
    line = b"def handler(request):\n    return {'status': 'ok', 'value': %d}\n"
    count = text_mib * 10
    for i in range(count):
        sub = text / f"d{i % 30}"
        sub.mkdir(exist_ok=True)
        body = b"".join(line % (i * 1000 + j) for j in range(1800))[: 100 * 1024]
        (sub / f"f{i}.py").write_bytes(body)
    with (root / "sparse.img").open("wb") as handle:
        handle.truncate(1024 * MIB)
        handle.seek(512 * MIB)
        handle.write(os.urandom(MIB))
    os.link(root / "random" / "blob0", root / "blob0.link")
    os.symlink("random/blob1", root / "blob1.sym")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), DEFAULT_ID_BASE + 1000, DEFAULT_ID_BASE + 1000)
    os.chown(root, DEFAULT_ID_BASE, DEFAULT_ID_BASE)
    return random_mib * MIB + count * 100 * 1024 + MIB


async def ours(tree: Path, work: Path, proxy_url: str) -> tuple[float, float, int]:
    """One snapshot and one restore; return (snapshot s, restore s, archive bytes)."""
    archive = work / "layer.tar.zst"
    client = ObjectClient(proxy_url)
    started = time.perf_counter()
    with archive.open("wb") as out:
        stats = await asyncio.to_thread(archive_layer, tree, out, DEFAULT_ID_BASE)
    await client.upload(archive, KEY, mint(SECRET.encode(), ["PUT"], key=KEY)[0], stats.sha256)
    snapshot_s = time.perf_counter() - started
    archive.unlink()
    fetched = work / "fetched.tar.zst"
    dest = work / "restored"
    dest.mkdir()
    started = time.perf_counter()
    await client.download(KEY, mint(SECRET.encode(), ["GET"], key=KEY)[0], fetched)
    await asyncio.to_thread(restore_layer, fetched, dest, DEFAULT_ID_BASE, stats.sha256, 4096 * MIB)
    restore_s = time.perf_counter() - started
    fetched.unlink()
    shutil.rmtree(dest)
    return snapshot_s, restore_s, stats.size_bytes


def baseline(tree: Path, work: Path) -> tuple[float, float, int]:
    """``tar | zstd`` and back; return (archive s, extract s, archive bytes)."""
    archive = work / "base.tar.zst"
    started = time.perf_counter()
    subprocess.run(
        f"tar --sparse --xattrs --numeric-owner -C {tree} -cf - . | zstd -3 -T0 -q -o {archive}",
        shell=True,
        check=True,
    )
    archive_s = time.perf_counter() - started
    size = archive.stat().st_size
    dest = work / "base-restored"
    dest.mkdir()
    started = time.perf_counter()
    subprocess.run(
        f"zstd -dc {archive} | tar --xattrs --numeric-owner -C {dest} -xf -", shell=True, check=True
    )
    extract_s = time.perf_counter() - started
    archive.unlink()
    shutil.rmtree(dest)
    return archive_s, extract_s, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--random-mib", type=int, default=200)
    parser.add_argument("--text-mib", type=int, default=300)
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scaibunker-bench-snap-", dir="/var/tmp"))
    proxy = start_proxy({"SCAIBUNKER_STORAGE_DIR": str(work / "objects")}, work)
    try:
        content = build_tree(work / "tree", args.random_mib, args.text_mib)
        mib = content / MIB
        rows: dict[str, list[float]] = {k: [] for k in ("snap", "restore", "tar", "untar")}
        sizes: dict[str, int] = {}
        for _ in range(args.runs):
            snap_s, restore_s, sizes["ours"] = asyncio.run(ours(work / "tree", work, proxy.url))
            tar_s, untar_s, sizes["tar"] = baseline(work / "tree", work)
            rows["snap"].append(snap_s * 1000)
            rows["restore"].append(restore_s * 1000)
            rows["tar"].append(tar_s * 1000)
            rows["untar"].append(untar_s * 1000)
    finally:
        _stop(proxy.process)
        shutil.rmtree(work, ignore_errors=True)

    def cells(samples: list[float]) -> str:
        p50, p99 = percentile(samples, 50), percentile(samples, 99)
        return f"{p50 / 1000:.2f} | {p99 / 1000:.2f} | {mib / (p50 / 1000):.0f}"

    lines = [
        SECTION,
        "",
        f"Command: `.venv/bin/python -m benchmarks.snapshots --runs {args.runs}`  ",
        f"Machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} cores shared with "
        f"other engineers' runs; run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"Layer: {mib:.0f} MiB of content (200 MiB random, 300 MiB text, 1 GiB sparse file "
        "with 1 MiB data, hard link, symlink); proxy = `bunker_proxy` process, local-directory "
        f"backend. Archive size: ours {sizes['ours'] / MIB:.0f} MiB, "
        f"`tar | zstd` {sizes['tar'] / MIB:.0f} MiB.",
        "",
        "| measurement | n | p50 s | p99 s | MB/s (p50) | baseline | p50 s | p99 s | MB/s (p50) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| snapshot: archive + upload via proxy | {args.runs} | {cells(rows['snap'])} | "
        f"`tar --sparse --xattrs \\| zstd -3 -T0` | {cells(rows['tar'])} |",
        f"| restore: download via proxy + verify + unpack | {args.runs} | "
        f"{cells(rows['restore'])} | `zstd -dc \\| tar -x` | {cells(rows['untar'])} |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        current = RESULTS.read_text()
        start = current.find(SECTION)
        if start == -1:
            RESULTS.write_text(current.rstrip("\n") + "\n\n" + text)
        else:
            end = current.find("\n## ", start + len(SECTION))
            tail = current[end:] if end != -1 else ""
            RESULTS.write_text(current[:start] + text + tail)


if __name__ == "__main__":
    main()

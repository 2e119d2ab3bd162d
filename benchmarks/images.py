"""Image benchmark: OCI pull + bake of a ~250 MB image, beside ``skopeo copy`` + ``umoci unpack``.

Both sides pull the same image from the same local registry (Debian's ``docker-registry`` on
127.0.0.1, started by this script) in the same run:

* ``pull_and_bake`` — :meth:`ImageCache.ensure` with an OCI source: pin the manifest digest
  (``skopeo inspect --raw``), ``skopeo copy`` into a layout, check every layer member, ``umoci
  unpack``, add the guest user and mount points, shift owners for the user namespace.
* baseline — ``skopeo copy docker://… oci:…`` then ``umoci unpack`` (as root), nothing else.
* artifact fetch — what a second worker does instead of pulling and baking again: download the
  baked tree (``scaibunker/images/{id}/rootfs.tar.zst``, published once by the first bake)
  through a standalone storage proxy (``bunker_proxy`` on a local-directory store), check its
  digest, unpack it and shift owners (:meth:`ImageStore.ensure` with ``artifact``).

The image is one layer made from a Debian bookworm minbase + python3 tree (default: the
worker tests' cached debootstrap tree, whose shifted owners are shifted back while packing).

Usage (as root, from the repository root)::

    .venv/bin/python -m benchmarks.images [--runs 5] [--tree DIR --tree-id-base N] [--write]

Without the worker tests' debootstrap tree, any ~250 MB root tree works, e.g. ``--tree
/var/tmp/bench-root --tree-id-base 0``.

``--write`` replaces the images section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from tests.images.conftest import Registry
from tests.storage.conftest import SECRET, Proxy, _stop, start_proxy

from benchmarks.run import RESULTS, percentile
from scaigrid.modules.scaibunker.storage.capabilities import mint
from scaigrid.worker.capabilities import CapabilityBroker
from scaigrid.worker.images import ImageStore, artifact_key
from scaigrid.worker.rootfs import DEFAULT_ID_BASE, ImageCache

SECTION = "## Images (issue #6)"
DEFAULT_TREE = Path("/var/cache/scaibunker-test/images/img_test_bookworm_minbase_python3/rootfs")


def pack_layer(tree: Path, id_base: int, dest: Path) -> Path:
    """Tar ``tree`` into ``dest`` with owners shifted down by ``id_base`` (0: unchanged).

    Device nodes are left out, as in published images (and refused by the OCI source).
    """

    def unshift(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if info.ischr() or info.isblk():
            return None
        info.uid = info.uid - id_base if info.uid >= id_base else info.uid
        info.gid = info.gid - id_base if info.gid >= id_base else info.gid
        info.uname = info.gname = ""
        return info

    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(tree, arcname=".", filter=unshift)
    return dest


def du_mib(path: Path) -> float:
    """Apparent size of ``path`` in MiB (``du -s --apparent-size``)."""
    out = subprocess.run(
        ["du", "-s", "--apparent-size", "--block-size=1", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.split()[0]) / (1 << 20)


def run_ours(ref: str, host: str, work: Path, run: int) -> float:
    """One pull + bake through :class:`ImageCache`; milliseconds."""
    cache = ImageCache(work / "cache", insecure_registries=frozenset({host}))
    start = time.perf_counter()
    asyncio.run(cache.ensure(f"img_bench{run}", {"kind": "oci", "ref": ref}))
    elapsed = (time.perf_counter() - start) * 1000
    asyncio.run(cache.evict(f"img_bench{run}"))
    return elapsed


def _broker(proxy: Proxy) -> CapabilityBroker:
    async def requester(
        purpose: str, *, bunker_id: str | None = None, image_id: str | None = None
    ) -> dict[str, object]:
        token, exp = mint(
            SECRET.encode(), ["GET", "HEAD", "PUT"], prefix=f"scaibunker/images/{image_id}/"
        )
        return {"capability": token, "expires_at": exp, "storage_url": proxy.url}

    return CapabilityBroker(requester)


def publish_artifact(ref: str, host: str, proxy: Proxy, work: Path) -> tuple[str, float, int]:
    """Bake once and publish the artifact; return ``(digest, publish ms, artifact bytes)``."""
    store = ImageStore(
        ImageCache(work / "publisher", insecure_registries=frozenset({host})),
        broker=_broker(proxy),
    )

    async def bake() -> tuple[str, float]:
        await store.ensure(
            "img_benchart", {"kind": "oci", "ref": ref}, {"key": artifact_key("img_benchart")}
        )
        start = time.perf_counter()
        await store.published("img_benchart")
        elapsed = (time.perf_counter() - start) * 1000
        digest = store.digest("img_benchart")
        assert digest is not None, "the artifact was not published"
        return digest, elapsed

    digest, elapsed = asyncio.run(bake())
    size = sum(p.stat().st_size for p in (work / "objects").rglob("rootfs.tar.zst"))
    asyncio.run(store.evict("img_benchart"))
    return digest, elapsed, size


def run_fetch(proxy: Proxy, digest: str, work: Path, run: int) -> float:
    """One artifact fetch + unpack on a fresh cache (another id base); milliseconds."""
    cache = ImageCache(work / f"fetcher{run}", id_base=DEFAULT_ID_BASE + 2 * 65536)
    store = ImageStore(cache, broker=_broker(proxy))
    artifact = {"key": artifact_key("img_benchart"), "digest": digest}
    start = time.perf_counter()
    asyncio.run(store.ensure("img_benchart", {"kind": "tar", "path": "/nonexistent"}, artifact))
    elapsed = (time.perf_counter() - start) * 1000
    assert store.bake_source("img_benchart") == "artifact"
    asyncio.run(store.evict("img_benchart"))
    return elapsed


def run_baseline(ref: str, work: Path, run: int) -> float:
    """One ``skopeo copy`` + ``umoci unpack``; milliseconds."""
    layout, bundle = work / f"layout{run}", work / f"bundle{run}"
    start = time.perf_counter()
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            f"docker://{ref}",
            f"oci:{layout}:t",
        ],
        check=True,
    )
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:t", str(bundle)], check=True)
    elapsed = (time.perf_counter() - start) * 1000
    shutil.rmtree(layout)
    shutil.rmtree(bundle)
    return elapsed


def main() -> None:
    """Build and push the image, measure both pipelines alternately, print (and record)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tree", type=Path, default=DEFAULT_TREE)
    parser.add_argument("--tree-id-base", type=int, default=DEFAULT_ID_BASE)
    parser.add_argument("--write", action="store_true", help="record in benchmarks/RESULTS.md")
    args = parser.parse_args()
    if not args.tree.is_dir():
        raise SystemExit(f"{args.tree} is missing: run tests/worker/test_debootstrap_image.py once")
    root = Path(tempfile.mkdtemp(prefix="sbt-bench-img-", dir="/var/tmp"))
    registry = Registry(root)
    proxy = start_proxy(
        {"SCAIBUNKER_STORAGE_BACKEND": "local", "SCAIBUNKER_STORAGE_DIR": str(root / "objects")},
        root,
    )
    try:
        layer = pack_layer(args.tree, args.tree_id_base, root / "layer.tar")
        ref = registry.push("bench/debian:v1", [layer], work=root)
        tree_mib = du_mib(args.tree)
        digest, publish_ms, artifact_bytes = publish_artifact(ref, registry.host, proxy, root)
        ours, base, fetch = [], [], []
        for run in range(args.runs):
            base.append(run_baseline(ref, root, run))
            ours.append(run_ours(ref, registry.host, root, run))
            fetch.append(run_fetch(proxy, digest, root, run))
        rows = [
            ("OCI pull + bake (`ImageCache.ensure`)", ours),
            ("`skopeo copy` + `umoci unpack`", base),
            ("baked artifact fetch + unpack (second worker, through the proxy)", fetch),
        ]
        command = f".venv/bin/python -m benchmarks.images --runs {args.runs}"
        what = "a Debian bookworm minbase + python3 tree"
        if args.tree != DEFAULT_TREE:
            command += f" --tree {args.tree} --tree-id-base {args.tree_id_base}"
            what = f"the tree {args.tree}"
        lines = [
            SECTION,
            "",
            f"Command: `{command}`  ",
            f"Machine: {platform.node()}, {platform.machine()}, image: one layer of {what} "
            f"({tree_mib:.0f} MiB unpacked, "
            f"{layer.stat().st_size / (1 << 20):.0f} MiB tar, gzip-compressed by umoci), local "
            f"registry on 127.0.0.1; run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            "",
            "| measurement | n | p50 ms | p99 ms |",
            "|---|---|---|---|",
        ]
        for name, samples in rows:
            lines.append(
                f"| {name} | {len(samples)} | {percentile(samples, 50):.0f} | "
                f"{percentile(samples, 99):.0f} |"
            )
        ratio = percentile(ours, 50) / percentile(base, 50)
        lines += [
            "",
            f"Ratio p50 (ours / baseline): {ratio:.2f}. Ours also pins the manifest digest "
            "(`skopeo inspect --raw`), reads every layer once more to refuse unsafe members, "
            "adds the guest user and shifts the owner of every inode for the user namespace. "
            "The machine's 2 cores are shared with other engineers' runs.",
            "",
            f"Artifact: {artifact_bytes / (1 << 20):.0f} MiB `tar.zst`, archived and uploaded "
            f"once by the first bake in {publish_ms:.0f} ms (in the background of that bake); "
            f"ratio p50 fetch / pull + bake: {percentile(fetch, 50) / percentile(ours, 50):.2f}.",
            "",
        ]
        section = "\n".join(lines)
        print(section)
        if args.write:
            text = RESULTS.read_text()
            if SECTION in text:
                head, _, rest = text.partition(SECTION)
                tail = rest[rest.find("\n## ") :] if "\n## " in rest else ""
                text = head + section + tail
            else:
                text = text.rstrip("\n") + "\n\n" + section
            RESULTS.write_text(text)
    finally:
        _stop(proxy.process)
        registry.stop()
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


if __name__ == "__main__":
    main()

"""Snapshots end to end: a real controller on the S3 backend (moto as its own process), its dev
worker, a second worker process, and workers reaching S3 only through a standalone
`bunker_proxy` process. A bunker snapshotted on worker B is restored on worker A, which
never ran it, after B is stopped; the tree hashes inside the two bunkers match."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.fleet import HOSTNAME, WORKER_START_TIMEOUT_S, ExtraWorker, wait_online, warm
from tests.fixtures.stack import BASE, Stack, build_busybox_tar, start_stack
from tests.storage.conftest import BUCKET, SECRET, Proxy, S3Server, _stop, start_proxy

# Builds a layer with every kind of change, over the busybox image.
MAKE_CHANGES = r"""
set -e
mkdir -p /data/sub /data/empty
echo hello > /data/a.txt
printf 'x%.0s' $(seq 1 5000) > /data/sub/b.txt
ln /data/a.txt /data/hardlink
ln -s ../a.txt /data/sub/symlink
chmod 4750 /data/sub/b.txt
chown 1000:50 /data/a.txt
dd if=/dev/urandom of=/data/sparse bs=4096 seek=2560 count=1 2>/dev/null
mkfifo /data/fifo
rm /etc/group
rm -rf /usr/share
"""
# Lists the tree with owners, modes, link counts, contents and (for the layer's own files)
# mtimes. Image files are compared without mtimes: each worker bakes the image itself.
TREE_HASH = r"""
cd / && find data etc usr bin -xdev 2>/dev/null | sort | while read f; do
  stat -c '%n %f %u %g %s %h' "$f"
  case "$f" in data/*) [ -L "$f" ] || stat -c '%Y' "$f";; esac
  if [ -L "$f" ]; then readlink "$f"; elif [ -f "$f" ]; then md5sum "$f"; fi
done
"""


@pytest.fixture(scope="module")
def snap_stack(s3_server: S3Server) -> Iterator[tuple[Stack, Proxy]]:
    data_dir = Path(tempfile.mkdtemp(prefix="scaibunker-snap-", dir="/var/tmp"))
    os.chmod(data_dir, 0o755)
    proxy = start_proxy(s3_server.env(), data_dir)
    env = {
        **s3_server.env(),
        "SCAIBUNKER_STORAGE_CAPABILITY_SECRET": SECRET,
        "SCAIBUNKER_STORAGE_PROXY_URL": proxy.url,
    }
    stack = start_stack(data_dir, env)
    try:
        yield stack, proxy
    finally:
        stack.stop()
        _stop(proxy.process)
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def fleet(snap_stack: tuple[Stack, Proxy]) -> Iterator[tuple[Stack, ExtraWorker, str]]:
    """The stack, worker B (extra process, busybox warmed) and worker A's id (dev worker)."""
    stack, _proxy = snap_stack
    tar_dir = Path(tempfile.mkdtemp(dir="/var/tmp"))
    stack.register_image("busybox", {"kind": "tar", "path": str(build_busybox_tar(tar_dir))})
    data_dir = Path(tempfile.mkdtemp(prefix="scaibunker-snap-b-", dir="/var/tmp"))
    os.chmod(data_dir, 0o755)
    worker = ExtraWorker(stack, data_dir)
    with stack.client() as client:
        dev_ids = [w["id"] for w in client.get(f"{BASE}/workers").json()["data"]]
        token = client.post(f"{BASE}/workers/join-tokens", json={}).json()["data"]["token"]
        worker.start(token)
        worker.worker_id = wait_online(client, HOSTNAME, WORKER_START_TIMEOUT_S)["id"]
        warm(client, "busybox", worker.worker_id)
    try:
        yield stack, worker, dev_ids[0]
    finally:
        worker.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(tar_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def _terminate_bunkers(snap_stack: tuple[Stack, Proxy]) -> Iterator[None]:
    """Each test starts with free workers: terminate every live bunker afterwards."""
    yield
    with snap_stack[0].client() as client:
        for bunker in client.get(f"{BASE}/bunkers", params={"limit": 200}).json()["data"]:
            if bunker["status"] not in ("terminated", "failed"):
                client.delete(f"{BASE}/bunkers/{bunker['id']}")


def _exec(client: httpx.Client, bunker_id: str, command: str) -> str:
    r = client.post(f"{BASE}/bunkers/{bunker_id}/exec", json={"command": command, "user": "root"})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["exit_code"] == 0, data
    return str(data["stdout"])


def _create(client: httpx.Client, **fields: Any) -> httpx.Response:
    body = {"memory_mb": 128, "disk_mb": 64, **fields}
    return client.post(f"{BASE}/bunkers", params={"wait_s": 60}, json=body)


def _wait_snapshot(
    client: httpx.Client, snapshot_id: str, timeout_s: float = 120
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        snap = client.get(f"{BASE}/snapshots/{snapshot_id}").json()["data"]
        if snap["status"] in ("ready", "failed"):
            return dict(snap)
        time.sleep(0.3)
    raise AssertionError(f"snapshot {snapshot_id} did not finish")


def _on_worker(client: httpx.Client, worker_id: str, other: str, **fields: Any) -> dict[str, Any]:
    """Create a bunker with ``other`` drained, so it lands on ``worker_id``."""
    assert client.post(f"{BASE}/workers/{other}/drain").status_code == 200
    try:
        r = _create(client, **fields)
    finally:
        client.post(f"{BASE}/workers/{other}/resume")
    assert r.status_code == 201, r.text
    bunker = r.json()["data"]
    assert bunker["status"] == "running" and bunker["worker_id"] == worker_id, bunker
    return dict(bunker)


def test_snapshot_on_b_restores_on_a_after_b_stops(
    fleet: tuple[Stack, ExtraWorker, str], s3_server: S3Server
) -> None:
    stack, worker_b, worker_a = fleet
    with stack.client() as client:
        source = _on_worker(client, worker_b.worker_id, worker_a, image="busybox")
        _exec(client, source["id"], MAKE_CHANGES)
        before = _exec(client, source["id"], TREE_HASH)

        taken = client.post(f"{BASE}/bunkers/{source['id']}/snapshot", json={"name": "s1"})
        assert taken.status_code == 201, taken.text
        assert taken.json()["data"]["status"] == "pending"
        snap = _wait_snapshot(client, taken.json()["data"]["snapshot_id"])
        assert snap["status"] == "ready", snap
        assert snap["size_bytes"] > 0 and len(snap["sha256"]) == 64
        assert snap["manifest"]["image_id"] == source["image_id"]
        key = f"scaibunker/snapshots/{snap['tenant_id']}/{snap['snapshot_id']}.tar.zst"
        head = s3_server.client().head_object(Bucket=BUCKET, Key=key)
        assert head["ContentLength"] == snap["size_bytes"]
        # The source keeps running after its snapshot.
        assert _exec(client, source["id"], "cat /data/a.txt") == "hello\n"

        worker_b.stop()
        restored = _create(client, snapshot_id=snap["snapshot_id"])
        assert restored.status_code == 201, restored.text
        bunker = restored.json()["data"]
        assert bunker["status"] == "running", bunker
        assert bunker["worker_id"] == worker_a and bunker["snapshot_id"] == snap["snapshot_id"]
        assert _exec(client, bunker["id"], TREE_HASH) == before
        assert _exec(client, bunker["id"], "test ! -e /etc/group && test ! -e /usr/share") == ""

        listed = client.get(f"{BASE}/snapshots", params={"bunker_id": source["id"]}).json()
        assert [s["snapshot_id"] for s in listed["data"]] == [snap["snapshot_id"]]


def test_restore_errors(fleet: tuple[Stack, ExtraWorker, str], s3_server: S3Server) -> None:
    stack = fleet[0]
    with stack.client() as client:
        source = _create(client, image="busybox").json()["data"]
        _exec(client, source["id"], "dd if=/dev/urandom of=/big bs=1M count=20 2>/dev/null")
        taken = client.post(f"{BASE}/bunkers/{source['id']}/snapshot").json()["data"]
        snap = _wait_snapshot(client, taken["snapshot_id"])
        assert snap["status"] == "ready", snap

        small = _create(client, snapshot_id=snap["snapshot_id"], disk_mb=8)
        assert small.status_code == 422, small.text
        assert small.json()["error"]["details"][0]["field"] == "disk_mb"

        unknown = _create(client, snapshot_id="snp_01JZZZZZZZZZZZZZZZZZZZZZZZ")
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "SNAPSHOT_NOT_FOUND"

        key = f"scaibunker/snapshots/{snap['tenant_id']}/{snap['snapshot_id']}.tar.zst"
        s3 = s3_server.client()
        good = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        s3.put_object(Bucket=BUCKET, Key=key, Body=good[:-10] + b"corrupted!")
        broken = _create(client, snapshot_id=snap["snapshot_id"])
        assert broken.status_code == 201, broken.text
        bunker = broken.json()["data"]
        deadline = time.monotonic() + 60
        while bunker["status"] not in ("failed", "running") and time.monotonic() < deadline:
            time.sleep(0.3)
            bunker = client.get(f"{BASE}/bunkers/{bunker['id']}").json()["data"]
        assert bunker["status"] == "failed", bunker
        detail = client.get(f"{BASE}/bunkers/{bunker['id']}").json()["data"]
        assert "checksum mismatch" in str(detail), detail

        deleted = client.delete(f"{BASE}/snapshots/{snap['snapshot_id']}")
        assert deleted.status_code == 200 and deleted.json()["data"]["deleted"] is True
        assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix=key)
        gone = client.get(f"{BASE}/snapshots/{snap['snapshot_id']}")
        assert gone.status_code == 404


def test_store_unreachable_fails_the_snapshot_and_keeps_the_bunker(
    snap_stack: tuple[Stack, Proxy], fleet: tuple[Stack, ExtraWorker, str], s3_server: S3Server
) -> None:
    stack, proxy = snap_stack
    with stack.client() as client:
        source = _create(client, image="busybox").json()["data"]
        _exec(client, source["id"], "echo keep > /keep")
        port = proxy.url.rsplit(":", 1)[1]
        _stop(proxy.process)
        try:
            taken = client.post(f"{BASE}/bunkers/{source['id']}/snapshot").json()["data"]
            snap = _wait_snapshot(client, taken["snapshot_id"])
            assert snap["status"] == "failed"
            assert "OBJECT_STORE_UNAVAILABLE" in snap["status_reason"]
            assert _exec(client, source["id"], "cat /keep") == "keep\n"
        finally:
            restarted = start_proxy(s3_server.env(), stack.data_dir, int(port))
            proxy.process = restarted.process
        again = client.post(f"{BASE}/bunkers/{source['id']}/snapshot").json()["data"]
        assert _wait_snapshot(client, again["snapshot_id"])["status"] == "ready"
        restored = _create(client, snapshot_id=again["snapshot_id"]).json()["data"]
        assert _exec(client, restored["id"], "cat /keep") == "keep\n"


def _other_tenant_key(stack: Stack) -> str:
    scaigrid = str(Path(sys.executable).parent / "scaigrid")

    def run(*argv: str) -> str:
        done = subprocess.run(
            [scaigrid, "admin", *argv], env=stack.env, check=True, capture_output=True, text=True
        )
        return done.stdout.strip().split()[-1]

    tenant = run("create-tenant", "--name", "snapshot-thief")
    run("create-user", "--tenant", tenant, "--email", "thief@other.test", "--role", "tenant_admin")
    return run("create-key", "--user", "thief@other.test")


def test_another_tenants_snapshot_is_404(fleet: tuple[Stack, ExtraWorker, str]) -> None:
    stack = fleet[0]
    with stack.client() as client:
        source = _create(client, image="busybox").json()["data"]
        taken = client.post(f"{BASE}/bunkers/{source['id']}/snapshot").json()["data"]
        assert _wait_snapshot(client, taken["snapshot_id"])["status"] == "ready"
    with stack.client(_other_tenant_key(stack)) as thief:
        for response in (
            thief.get(f"{BASE}/snapshots/{taken['snapshot_id']}"),
            thief.delete(f"{BASE}/snapshots/{taken['snapshot_id']}"),
            _create(thief, snapshot_id=taken["snapshot_id"]),
        ):
            assert response.status_code == 404, response.text
            assert response.json()["error"]["code"] == "SNAPSHOT_NOT_FOUND"
        assert thief.get(f"{BASE}/snapshots").json()["data"] == []
    with stack.client() as client:
        assert client.get(f"{BASE}/snapshots/{taken['snapshot_id']}").status_code == 200


def test_terminate_with_final_snapshot(fleet: tuple[Stack, ExtraWorker, str]) -> None:
    stack = fleet[0]
    with stack.client() as client:
        source = _create(client, image="busybox").json()["data"]
        _exec(client, source["id"], "echo last words > /final")
        gone = client.delete(f"{BASE}/bunkers/{source['id']}", params={"snapshot": "true"})
        assert gone.status_code == 200, gone.text
        bunker = gone.json()["data"]
        assert bunker["status"] == "terminated" and bunker["final_snapshot_id"]
        snap = client.get(f"{BASE}/snapshots/{bunker['final_snapshot_id']}").json()["data"]
        assert snap["status"] == "ready" and snap["bunker_id"] == source["id"]
        restored = _create(client, snapshot_id=snap["snapshot_id"]).json()["data"]
        assert _exec(client, restored["id"], "cat /final") == "last words\n"


def test_lost_persistent_bunker_comes_back_from_its_last_snapshot(
    fleet: tuple[Stack, ExtraWorker, str],
) -> None:
    stack, worker_b, worker_a = fleet
    with stack.client() as client:
        if worker_b.process is None or worker_b.process.poll() is not None:
            worker_b.start()
            wait_online(client, HOSTNAME, WORKER_START_TIMEOUT_S)
        bunker = _on_worker(
            client, worker_b.worker_id, worker_a, image="busybox", lifecycle_mode="persistent"
        )
        _exec(client, bunker["id"], "echo saved > /saved")
        taken = client.post(f"{BASE}/bunkers/{bunker['id']}/snapshot").json()["data"]
        assert _wait_snapshot(client, taken["snapshot_id"])["status"] == "ready"
        _exec(client, bunker["id"], "echo lost > /lost")

        worker_b.kill()
        try:
            deadline = time.monotonic() + 120
            current: dict[str, Any] = {}
            while time.monotonic() < deadline:
                current = client.get(f"{BASE}/bunkers/{bunker['id']}").json()["data"]
                if current["status"] == "running" and current["worker_id"] == worker_a:
                    break
                time.sleep(0.5)
        finally:
            # A SIGKILLed worker leaves its bunkers running; started again it stops them.
            worker_b.start()
            wait_online(client, HOSTNAME, WORKER_START_TIMEOUT_S)
        assert current["status"] == "running" and current["worker_id"] == worker_a, current
        assert current["snapshot_id"] == taken["snapshot_id"]
        assert _exec(client, bunker["id"], "cat /saved") == "saved\n"
        assert _exec(client, bunker["id"], "test -e /lost || echo absent") == "absent\n"


def test_user_capabilities_for_image_objects(
    snap_stack: tuple[Stack, Proxy], fleet: tuple[Stack, ExtraWorker, str]
) -> None:
    stack, proxy = snap_stack
    with stack.client() as client:
        image_id = client.get(f"{BASE}/images", params={"name": "busybox"}).json()["data"][0]["id"]
        prefix = f"scaibunker/images/{image_id}/"
        minted = client.post(
            f"{BASE}/storage/capabilities",
            json={"methods": ["GET", "HEAD"], "prefix": prefix, "expires_in_s": 600},
        )
        assert minted.status_code == 201, minted.text
        cap = minted.json()["data"]["capability"]
        assert minted.json()["data"]["expires_at"]
        # Accepted by the standalone proxy: the object is missing, not forbidden.
        missing = httpx.get(
            f"{proxy.url}{BASE}/storage/objects/{prefix}scan.json", params={"cap": cap}
        )
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "OBJECT_NOT_FOUND"
        for body in (
            {"methods": ["PUT"], "prefix": prefix},
            {"methods": ["GET"], "prefix": prefix, "expires_in_s": 3601},
            {"methods": ["GET"], "key": "scaibunker/snapshots/x/y.tar.zst"},
            {"methods": ["GET"], "prefix": prefix, "key": f"{prefix}a"},
        ):
            refused = client.post(f"{BASE}/storage/capabilities", json=body)
            assert refused.status_code == 422, (body, refused.text)
        unknown = client.post(
            f"{BASE}/storage/capabilities",
            json={"methods": ["GET"], "prefix": "scaibunker/images/img_nothere/"},
        )
        assert unknown.status_code == 403
    not_served = httpx.post(f"{proxy.url}{BASE}/storage/capabilities", json={})
    assert not_served.status_code == 404

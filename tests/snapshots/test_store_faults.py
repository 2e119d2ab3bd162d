"""Object-store paths end to end beside the snapshot tests' stack (controller on moto S3, a
standalone `bunker_proxy`, the dev worker A and a second worker process B):

* B warmed the busybox image by fetching the artifact A baked (no build on B);
* a snapshot upload cut short by SIGKILLing its worker leaves no `ready` snapshot, no object
  and no multipart parts in the bucket;
* snapshots survive a module disable and are restorable after the module is enabled again;
* a warm-up on a worker whose image cache is too small marks it ``skipped``;
* a deactivated image's artifact is deleted, unless a snapshot still references the image;
* ``capability_request`` on the worker channel is refused for other workers' bunkers and
  unknown images, and grants exactly the image's keys otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from scaigrid.errors import ScaiGridError
from scaigrid.modules.scaibunker.storage.capabilities import verify
from tests.fixtures import fleet as fleet_fixture
from tests.fixtures.fleet import HOSTNAME, WORKER_START_TIMEOUT_S, ExtraWorker, wait_online
from tests.fixtures.stack import BASE, Stack, build_busybox_tar
from tests.snapshots.test_e2e import (
    _create,
    _exec,
    _on_worker,
    _terminate_bunkers,
    _wait_snapshot,
    fleet,
    snap_stack,
)
from tests.storage.conftest import BUCKET, SECRET, S3Server

__all__ = ["_terminate_bunkers", "fleet", "snap_stack"]


def _image(client: httpx.Client, name: str) -> dict[str, Any]:
    return dict(client.get(f"{BASE}/images", params={"name": name}).json()["data"][0])


def test_second_worker_fetched_the_baked_artifact(
    fleet: tuple[Stack, ExtraWorker, str], s3_server: S3Server
) -> None:
    stack, worker_b, _worker_a = fleet
    with stack.client() as client:
        image = _image(client, "busybox")
        warm = client.get(f"{BASE}/images/{image['id']}/warm").json()["data"]
    states = {w["worker_id"]: w["state"] for w in warm["workers"]}
    assert states.get(worker_b.worker_id) == "ready", warm
    key = f"scaibunker/images/{image['id']}/rootfs.tar.zst"
    s3 = s3_server.client()
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"scaibunker/images/{image['id']}/")
    assert [o["Key"] for o in listed.get("Contents", [])] == [key]
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert image["digest"] == f"sha256:{hashlib.sha256(body).hexdigest()}"
    # B unpacked the artifact: no pull, unpack or debootstrap ran there.
    meta = json.loads((worker_b.data_dir / "images" / image["id"] / "image.json").read_text())
    assert meta["bake_source"] == "artifact" and meta["artifact_sha256"] == image["digest"][7:]
    log = (worker_b.data_dir / "worker.log").read_text(errors="replace")
    assert "image.artifact_fetched" in log
    assert "bake_source=baked" not in log and '"bake_source": "baked"' not in log
    # A (the dev worker) baked it and published it.
    dev_log = (stack.data_dir / "worker" / "worker.log").read_text(errors="replace")
    assert "image.artifact_uploaded" in dev_log


def test_snapshot_upload_killed_with_its_worker_leaves_nothing(
    fleet: tuple[Stack, ExtraWorker, str], s3_server: S3Server
) -> None:
    stack, worker_b, worker_a = fleet
    s3 = s3_server.client()
    with stack.client() as client:
        if worker_b.process is None or worker_b.process.poll() is not None:
            worker_b.start()
            wait_online(client, HOSTNAME, WORKER_START_TIMEOUT_S)
        bunker = _on_worker(
            client, worker_b.worker_id, worker_a, image="busybox", disk_mb=1024, memory_mb=256
        )
        # Incompressible, so the upload (64 MiB parts) takes a while.
        _exec(client, bunker["id"], "dd if=/dev/urandom of=/big bs=1M count=400 2>/dev/null")
        taken = client.post(f"{BASE}/bunkers/{bunker['id']}/snapshot").json()["data"]
        snapshot_id = taken["snapshot_id"]
        deadline = time.monotonic() + 120
        status = "pending"
        while time.monotonic() < deadline:
            status = client.get(f"{BASE}/snapshots/{snapshot_id}").json()["data"]["status"]
            if status != "pending":
                break
            time.sleep(0.05)
        assert status == "uploading", status
        time.sleep(0.5)  # well inside the upload of ~400 MB
        worker_b.kill()
        try:
            snap = _wait_snapshot(client, snapshot_id)
            assert snap["status"] == "failed", snap
            prefix = f"scaibunker/snapshots/{snap['tenant_id']}/{snapshot_id}"
            deadline = time.monotonic() + 60
            leftovers: list[str] = ["?"]
            while time.monotonic() < deadline:
                objects = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
                uploads = s3.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix)
                leftovers = [o["Key"] for o in objects] + [
                    u["Key"] for u in uploads.get("Uploads", [])
                ]
                if not leftovers:
                    break
                time.sleep(0.5)
            assert leftovers == [], leftovers
        finally:
            # A SIGKILLed worker leaves its bunkers running; started again it stops them.
            worker_b.start()
            wait_online(client, HOSTNAME, WORKER_START_TIMEOUT_S)
        listed = client.get(f"{BASE}/snapshots", params={"status": "ready"}).json()["data"]
        assert snapshot_id not in [s["snapshot_id"] for s in listed]


def test_snapshots_survive_module_disable(fleet: tuple[Stack, ExtraWorker, str]) -> None:
    stack = fleet[0]
    with stack.client() as client:
        source = _create(client, image="busybox").json()["data"]
        _exec(client, source["id"], "echo kept > /kept")
        taken = client.post(f"{BASE}/bunkers/{source['id']}/snapshot").json()["data"]
        assert _wait_snapshot(client, taken["snapshot_id"])["status"] == "ready"
        off = client.post(f"{BASE}/disable")
        assert off.status_code == 200 and off.json()["data"]["enabled"] is False, off.text
        try:
            refused = client.get(f"{BASE}/snapshots/{taken['snapshot_id']}")
            assert refused.status_code == 403
            assert refused.json()["error"]["code"] == "MODULE_NOT_ENABLED"
        finally:
            on = client.post(f"{BASE}/enable")
            assert on.status_code == 200, on.text
        snap = client.get(f"{BASE}/snapshots/{taken['snapshot_id']}").json()["data"]
        assert snap["status"] == "ready"
        ended = client.get(f"{BASE}/bunkers/{source['id']}").json()["data"]
        assert ended["status"] == "terminated", ended
        restored = _create(client, snapshot_id=taken["snapshot_id"])
        assert restored.status_code == 201, restored.text
        assert _exec(client, restored.json()["data"]["id"], "cat /kept") == "kept\n"


def test_capability_requests_are_checked_against_the_asking_worker(
    fleet: tuple[Stack, ExtraWorker, str],
) -> None:
    """A worker gets a capability only for its own bunkers, images it may hold and snapshots
    being taken on it; the grant names exactly the image's keys."""
    stack = fleet[0]
    with stack.client() as client:
        image = _image(client, "busybox")
        on_a = _create(client, image="busybox").json()["data"]
        taken = client.post(f"{BASE}/bunkers/{on_a['id']}/snapshot").json()["data"]
        assert _wait_snapshot(client, taken["snapshot_id"])["status"] == "ready"
        token = client.post(f"{BASE}/workers/join-tokens", json={}).json()["data"]["token"]
    url = stack.url.replace("http://", "ws://") + f"{BASE}/workers/connect"
    register = {
        "type": "register",
        "hostname": "capability-probe",
        "drivers": [{"name": "container", "isolation": "container"}],
        "capacity": {"cpu_millicores": 0, "memory_mb": 0, "disk_mb": 0},
    }
    with connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        ws.send(json.dumps(register))
        worker_id = json.loads(ws.recv(timeout=30))["worker_id"]

        def ask(request_id: str, **fields: str) -> dict[str, Any]:
            ws.send(json.dumps({"type": "capability_request", "request_id": request_id, **fields}))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                message = json.loads(ws.recv(timeout=30))
                if message.get("type") == "capability_grant":
                    assert message["request_id"] == request_id
                    return dict(message)
            raise AssertionError("no capability_grant")

        foreign = ask("r1", purpose="audit", bunker_id=on_a["id"])
        assert foreign["error"]["code"] == "AUTHZ_PERMISSION_DENIED" and "capability" not in foreign
        unknown = ask("r2", purpose="image_artifact", image_id="img_01JZZZZZZZZZZZZZZZZZZZZZZZ")
        assert unknown["error"]["code"] == "AUTHZ_PERMISSION_DENIED"
        for purpose in ("snapshot_layer", "snapshot_manifest"):
            done = ask(f"s-{purpose}", purpose=purpose, snapshot_id=taken["snapshot_id"])
            assert done["error"]["code"] == "AUTHZ_PERMISSION_DENIED", done
        bad = ask("r3", purpose="everything")
        assert bad["error"]["code"] == "VALIDATION_ERROR"
        granted = ask("r4", purpose="image_artifact", image_id=image["id"])
        assert "error" not in granted and granted["expires_at"] > time.time() + 600
    secrets = [SECRET.encode()]
    rootfs = f"scaibunker/images/{image['id']}/rootfs.tar.zst"
    for method in ("GET", "HEAD", "PUT"):
        verify(granted["capability"], secrets, method, rootfs)
    with pytest.raises(ScaiGridError):
        verify(granted["capability"], secrets, "DELETE", rootfs)
    with pytest.raises(ScaiGridError):
        verify(granted["capability"], secrets, "PUT", "scaibunker/images/img_other/rootfs.tar.zst")
    with stack.client() as client:
        client.delete(f"{BASE}/workers/{worker_id}")


def test_warm_skips_a_worker_short_of_cache_space(
    fleet: tuple[Stack, ExtraWorker, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A worker whose image cache (SCAIBUNKER_IMAGE_CACHE_MAX_MB=1) cannot hold the image is
    ``skipped`` with the reason (SPEC §7.6), and keeps nothing of it."""
    stack = fleet[0]
    monkeypatch.setattr(fleet_fixture, "HOSTNAME", "fleet-small-cache")
    monkeypatch.setenv("SCAIBUNKER_IMAGE_CACHE_MAX_MB", "1")
    data_dir = Path(tempfile.mkdtemp(prefix="scaibunker-small-", dir="/var/tmp"))
    os.chmod(data_dir, 0o755)
    small = ExtraWorker(stack, data_dir)
    try:
        with stack.client() as client:
            token = client.post(f"{BASE}/workers/join-tokens", json={}).json()["data"]["token"]
            small.start(token)
            worker_id = wait_online(client, "fleet-small-cache", WORKER_START_TIMEOUT_S)["id"]
            image = _image(client, "busybox")
            queued = client.post(
                f"{BASE}/images/{image['id']}/warm", json={"worker_ids": [worker_id]}
            )
            assert queued.status_code == 200, queued.text
            deadline = time.monotonic() + 120
            row: dict[str, Any] = {}
            while time.monotonic() < deadline:
                warm = client.get(f"{BASE}/images/{image['id']}/warm").json()["data"]
                row = next((w for w in warm["workers"] if w["worker_id"] == worker_id), {})
                if row.get("state") in ("skipped", "failed", "ready"):
                    break
                time.sleep(0.5)
            assert row.get("state") == "skipped", row
            assert "short of cache space" in str(row.get("error")), row
            assert not (data_dir / "images" / image["id"]).exists()
            client.delete(f"{BASE}/workers/{worker_id}")
    finally:
        small.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def _wait_gone_or_kept(s3: Any, key: str, gone: bool, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    present = True
    while time.monotonic() < deadline:
        present = "Contents" in s3.list_objects_v2(Bucket=BUCKET, Prefix=key)
        if present != gone:
            return present
        time.sleep(0.5)
    return present


def test_deactivated_image_artifact_is_deleted_unless_a_snapshot_needs_it(
    fleet: tuple[Stack, ExtraWorker, str], s3_server: S3Server, tmp_path: Path
) -> None:
    stack = fleet[0]
    s3 = s3_server.client()
    tar = str(build_busybox_tar(tmp_path))
    unused = stack.register_image("art-unused", {"kind": "tar", "path": tar})
    kept = stack.register_image("art-kept", {"kind": "tar", "path": tar})
    with stack.client() as client:
        bunker = _create(client, image="art-kept").json()["data"]
        taken = client.post(f"{BASE}/bunkers/{bunker['id']}/snapshot").json()["data"]
        assert _wait_snapshot(client, taken["snapshot_id"])["status"] == "ready"
        client.delete(f"{BASE}/bunkers/{bunker['id']}")
        for image in (unused, kept):
            key = f"scaibunker/images/{image['id']}/rootfs.tar.zst"
            assert "Contents" in s3.list_objects_v2(Bucket=BUCKET, Prefix=key)
            done = client.post(f"{BASE}/images/{image['id']}/deactivate")
            assert done.status_code == 200, done.text
        unused_key = f"scaibunker/images/{unused['id']}/rootfs.tar.zst"
        assert _wait_gone_or_kept(s3, unused_key, gone=True) is False
        # Deactivations run in order: the second one has finished well within this wait.
        kept_key = f"scaibunker/images/{kept['id']}/rootfs.tar.zst"
        time.sleep(3)
        assert "Contents" in s3.list_objects_v2(Bucket=BUCKET, Prefix=kept_key)
        # The snapshot of the deactivated image still restores (SPEC §6.4).
        restored = _create(client, snapshot_id=taken["snapshot_id"])
        assert restored.status_code == 201, restored.text
        assert restored.json()["data"]["status"] == "running", restored.text

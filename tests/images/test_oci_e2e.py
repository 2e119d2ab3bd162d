"""OCI images end to end: a real controller (``scaigrid serve``), a real worker joined with a
token (``scaibunker-worker --insecure-registries``), images pulled from the local registry, and
bunkers booted from them.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from scaigrid.client.cli import main as cli_main
from tests.fixtures.stack import BASE, DEFAULT_QUOTA_PROFILE_ID, E2E_CAPS, free_port
from tests.images.conftest import Registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="bunkers need root")
READY_TIMEOUT_S = 120


class OciStack:
    """Controller and worker processes; ``client()`` is authenticated as the super admin."""

    def __init__(self, root: Path, registry: Registry) -> None:
        self.root = root
        self.registry = registry
        self.workers: list[subprocess.Popen[bytes]] = []
        bin_dir = Path(sys.executable).parent
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "SCAIGRID_DATA_DIR": str(root / "controller"),
            "SCAIGRID_PORT": str(port),
        }
        subprocess.run([str(bin_dir / "scaigrid"), "migrate"], env=env, check=True, timeout=120)
        self.controller = subprocess.Popen(
            [str(bin_dir / "scaigrid"), "serve", "--port", str(port)],
            env=env,
            stdout=(root / "controller.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        key_file = root / "controller" / "admin-api-key"
        try:
            self._wait(lambda: key_file.exists() and self._healthy(), "controller")
            self.admin_key = key_file.read_text().strip()
            with self.client() as client:
                client.patch(
                    f"{BASE}/quota-profiles/{DEFAULT_QUOTA_PROFILE_ID}", json=E2E_CAPS
                ).raise_for_status()
            self.worker_id = self.add_worker("worker")
        except BaseException:
            self.stop()
            raise

    def add_worker(self, name: str) -> str:
        """Join one more worker (data dir ``root/name``); return its id once registered."""
        bin_dir = Path(sys.executable).parent
        with self.client() as client:
            token = client.post(f"{BASE}/workers/join-tokens", json={}).json()["data"]["token"]
            known = {w["id"] for w in client.get(f"{BASE}/workers").json()["data"]}
        worker_dir = self.root / name
        worker_dir.mkdir(mode=0o711)
        self.workers.append(
            subprocess.Popen(
                [
                    str(bin_dir / "scaibunker-worker"),
                    "--controller",
                    self.url,
                    "--join-token",
                    token,
                    "--data-dir",
                    str(worker_dir),
                    "--insecure-registries",
                    self.registry.host,
                    "--cgroup-parent",
                    f"sbt-oci-{os.getpid()}-{name}",
                    "--hostname",
                    name,
                ],
                stdout=(self.root / f"{name}.log").open("ab"),
                stderr=subprocess.STDOUT,
            )
        )
        with self.client() as client:

            def joined() -> list[str]:
                found = client.get(f"{BASE}/workers").json()["data"]
                return [w["id"] for w in found if w["id"] not in known]

            self._wait(lambda: bool(joined()), name)
            return joined()[0]

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def _wait(self, check: Any, what: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > deadline or self.controller.poll() is not None:
                logs = [
                    (self.root / name).read_text(errors="replace")[-3000:]
                    for name in ("controller.log", "worker.log")
                    if (self.root / name).exists()
                ]
                raise RuntimeError(f"{what} did not come up:\n" + "\n".join(logs))
            time.sleep(0.2)

    def client(self) -> httpx.Client:
        """A client of the controller as the super admin."""
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=120
        )

    def wait_image(self, image_id: str) -> dict[str, Any]:
        """Poll until the image leaves ``pending``/``baking``; return it."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        with self.client() as client:
            while time.monotonic() < deadline:
                image: dict[str, Any] = client.get(f"{BASE}/images/{image_id}").json()["data"]
                if image["status"] not in ("pending", "baking"):
                    return image
                time.sleep(0.2)
        raise AssertionError(f"image {image_id} still baking after {READY_TIMEOUT_S} s")

    def stop(self) -> None:
        """Stop the worker (its bunkers go with it), then the controller."""
        for process in (*self.workers, self.controller):
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def oci_stack(registry: Registry) -> Iterator[OciStack]:
    root = Path(tempfile.mkdtemp(prefix="sbt-oci-e2e-", dir="/var/tmp"))
    root.chmod(0o711)
    try:
        stack = OciStack(root, registry)
        try:
            yield stack
        finally:
            stack.stop()
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


def _busybox_layer(path: Path, marker: str) -> Path:
    with tarfile.open(path, "w") as tar:
        busybox = shutil.which("busybox") or "/bin/busybox"
        tar.add(busybox, arcname="bin/busybox")
        link = tarfile.TarInfo("bin/sh")
        link.type, link.linkname = tarfile.SYMTYPE, "busybox"
        tar.addfile(link)
        data = marker.encode()
        info = tarfile.TarInfo("etc/marker")
        info.size, info.uid, info.gid, info.mode = len(data), 1234, 1234, 0o604
        tar.addfile(info, io.BytesIO(data))
    return path


def test_oci_image_bakes_and_runs_a_bunker(oci_stack: OciStack, registry: Registry) -> None:
    work = oci_stack.root / "build"
    work.mkdir(exist_ok=True)
    ref = registry.push("e2e/app:v1", [_busybox_layer(work / "l.tar", "from-oci")], work=work)
    _raw, _type, digest = registry.manifest("e2e/app", "v1")
    with oci_stack.client() as client:
        created = client.post(
            f"{BASE}/images", json={"name": "oci-app", "source": {"kind": "oci", "ref": ref}}
        )
        assert created.status_code == 201, created.text
        image = oci_stack.wait_image(created.json()["data"]["id"])
        assert image["status"] == "ready", image
        assert image["source_digest"] == digest
        assert image["warm"]["ready"] == 1
        warm = client.get(f"{BASE}/images/{image['id']}/warm").json()["data"]
        assert warm["workers"][0]["worker_id"] == oci_stack.worker_id

        bunker = client.post(
            f"{BASE}/bunkers", params={"wait_s": 60}, json={"image": "oci-app"}
        ).json()["data"]
        assert bunker["status"] == "running", bunker
        result = client.post(
            f"{BASE}/bunkers/{bunker['id']}/exec",
            json={"command": ["/bin/busybox", "stat", "-c", "%u %a", "/etc/marker"]},
        ).json()["data"]
        assert result["exit_code"] == 0, result
        assert result["stdout"].strip() == "1234 604"
        cat = client.post(
            f"{BASE}/bunkers/{bunker['id']}/exec",
            json={"command": ["/bin/busybox", "cat", "/etc/marker"]},
        ).json()["data"]
        assert cat["stdout"] == "from-oci"

        scan = client.post(f"{BASE}/images/{image['id']}/scan").json()["data"]
        assert scan["status"] == "pending"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            scan = client.get(f"{BASE}/images/{image['id']}").json()["data"]["scan"]
            if scan["status"] not in ("pending", "scanning"):
                break
            time.sleep(0.2)
        expected = "done" if shutil.which("trivy") else "scanner_unavailable"
        assert scan["status"] == expected
        client.delete(f"{BASE}/bunkers/{bunker['id']}")


def test_missing_reference_fails_the_image(oci_stack: OciStack, registry: Registry) -> None:
    with oci_stack.client() as client:
        created = client.post(
            f"{BASE}/images",
            json={"name": "ghost", "source": {"kind": "oci", "ref": f"{registry.host}/no/such:v1"}},
        ).json()["data"]
        image = oci_stack.wait_image(created["id"])
        assert image["status"] == "failed"
        assert "manifest unknown" in image["status_reason"]
        refused = client.post(f"{BASE}/bunkers", json={"image": "ghost"})
        assert refused.json()["error"]["code"] == "IMAGE_NOT_READY"


def test_unsafe_layer_fails_the_image(oci_stack: OciStack, registry: Registry) -> None:
    work = oci_stack.root / "evil"
    work.mkdir(exist_ok=True)
    layer = work / "evil.tar"
    with tarfile.open(layer, "w") as tar:
        info = tarfile.TarInfo("../../etc/cron.d/evil")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    ref = registry.push("e2e/evil:v1", [layer], work=work)
    with oci_stack.client() as client:
        created = client.post(
            f"{BASE}/images", json={"name": "evil", "source": {"kind": "oci", "ref": ref}}
        ).json()["data"]
        image = oci_stack.wait_image(created["id"])
    assert image["status"] == "failed"
    assert "unsafe archive member" in image["status_reason"]
    assert not Path("/etc/cron.d/evil").exists()


def test_lazy_pull_image_places_on_the_worker(oci_stack: OciStack, registry: Registry) -> None:
    work = oci_stack.root / "lazy"
    work.mkdir(exist_ok=True)
    ref = registry.push("e2e/lazy:v1", [_busybox_layer(work / "l.tar", "lazy")], work=work)
    with oci_stack.client() as client:
        created = client.post(
            f"{BASE}/images",
            json={"name": "lazy", "source": {"kind": "oci", "ref": ref}, "lazy_pull": True},
        ).json()["data"]
        assert oci_stack.wait_image(created["id"])["status"] == "ready"
        bunker = client.post(
            f"{BASE}/bunkers", params={"wait_s": 60}, json={"image": "lazy"}
        ).json()["data"]
        assert bunker["status"] == "running" and bunker["worker_id"] == oci_stack.worker_id
        client.delete(f"{BASE}/bunkers/{bunker['id']}")


def test_cli_registers_and_shows_bake_progress(
    oci_stack: OciStack,
    registry: Registry,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    work = oci_stack.root / "cli"
    work.mkdir(exist_ok=True)
    ref = registry.push("e2e/cli:v1", [_busybox_layer(work / "l.tar", "cli")], work=work)
    monkeypatch.setenv("SCAIGRID_HOST", oci_stack.url)
    monkeypatch.setenv("SCAIGRID_API_KEY", oci_stack.admin_key)
    assert cli_main(["image-register", "cli-img", "--oci", ref]) == 0
    captured = capsys.readouterr()
    image_id, status = captured.out.strip().split("\t")
    assert image_id.startswith("img_") and status == "ready"
    assert "baking cli-img" in captured.err  # the bar itself is drawn only on a terminal
    ghost = f"{registry.host}/e2e/none:v1"
    assert cli_main(["image-register", "cli-ghost", "--oci", ghost]) == 1
    captured = capsys.readouterr()
    assert captured.out.strip().endswith("\tfailed")
    assert "error BAKE_FAILED" in captured.err and "manifest unknown" in captured.err
    assert cli_main(["image-register", "both", "--oci", ref, "--tar", "/x.tar"]) == 2


def _wait_warm(client: httpx.Client, image_id: str, ready: int) -> dict[str, Any]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        warm: dict[str, Any] = client.get(f"{BASE}/images/{image_id}/warm").json()["data"]
        if warm["warm"]["ready"] >= ready or warm["warm"]["failed"]:
            return warm
        time.sleep(0.2)
    raise AssertionError(f"image {image_id} not warm on {ready} workers")


def test_group_fans_out_and_strict_images_place_only_where_ready(
    oci_stack: OciStack, registry: Registry
) -> None:
    first = oci_stack.worker_id
    second = oci_stack.add_worker("second")
    work = oci_stack.root / "fan"
    work.mkdir(exist_ok=True)
    ref = registry.push("e2e/fan:v1", [_busybox_layer(work / "l.tar", "fan")], work=work)
    with oci_stack.client() as client:
        group = client.post(
            f"{BASE}/availability-groups",
            json={"name": "fleet", "scope": "platform", "worker_ids": [first, second]},
        )
        assert group.status_code == 201, group.text
        created = client.post(
            f"{BASE}/images",
            json={"name": "fanned", "scope": "platform", "source": {"kind": "oci", "ref": ref}},
        ).json()["data"]
        assert created["warm"]["queued"] == 2
        assert oci_stack.wait_image(created["id"])["status"] == "ready"
        warm = _wait_warm(client, created["id"], 2)
        assert warm["warm"] == {"queued": 0, "ready": 2, "failed": 0, "skipped": 0}
        assert {w["worker_id"] for w in warm["workers"]} == {first, second}

        pinned = client.post(
            f"{BASE}/images",
            json={
                "name": "pinned",
                "source": {"kind": "oci", "ref": ref},
                "bake_worker_id": second,
            },
        ).json()["data"]
        assert oci_stack.wait_image(pinned["id"])["status"] == "ready"
        # both stay up, yet both go where the image is ready, not to the emptier first worker
        bunkers = [
            client.post(f"{BASE}/bunkers", params={"wait_s": 60}, json={"image": "pinned"}).json()[
                "data"
            ]
            for _ in range(2)
        ]
        assert [b["status"] for b in bunkers] == ["running", "running"], bunkers
        assert [b["worker_id"] for b in bunkers] == [second, second]
        for bunker in bunkers:
            client.delete(f"{BASE}/bunkers/{bunker['id']}")


def test_deactivation_evicts_except_under_running_bunkers(
    oci_stack: OciStack, registry: Registry
) -> None:
    work = oci_stack.root / "evict"
    work.mkdir(exist_ok=True)
    ref = registry.push("e2e/evict:v1", [_busybox_layer(work / "l.tar", "evict")], work=work)
    worker = oci_stack.worker_id
    with oci_stack.client() as client:
        ids = {}
        for name in ("busy", "idle"):
            created = client.post(
                f"{BASE}/images",
                json={
                    "name": name,
                    "source": {"kind": "oci", "ref": ref},
                    "bake_worker_id": worker,
                },
            ).json()["data"]
            assert oci_stack.wait_image(created["id"])["status"] == "ready"
            ids[name] = created["id"]
        bunker = client.post(
            f"{BASE}/bunkers", params={"wait_s": 60}, json={"image": "busy"}
        ).json()["data"]
        assert bunker["status"] == "running", bunker
        tree = oci_stack.root / "worker" / "images" / ids["busy"] / "rootfs"
        idle_tree = oci_stack.root / "worker" / "images" / ids["idle"] / "rootfs"
        assert tree.is_dir() and idle_tree.is_dir()

        for image_id in ids.values():
            response = client.post(f"{BASE}/images/{image_id}/deactivate")
            assert response.json()["data"]["status"] == "deactivated"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            busy = client.get(f"{BASE}/images/{ids['busy']}/warm").json()["data"]["workers"]
            idle = client.get(f"{BASE}/images/{ids['idle']}/warm").json()["data"]["workers"]
            if not idle and busy and busy[0]["error"]:
                break
            time.sleep(0.2)
        assert idle == [] and not idle_tree.exists()
        assert busy[0]["state"] == "ready" and "used by 1 bunker root" in busy[0]["error"]
        assert tree.is_dir()
        still = client.post(
            f"{BASE}/bunkers/{bunker['id']}/exec",
            json={"command": ["/bin/busybox", "cat", "/etc/marker"]},
        ).json()["data"]
        assert still["stdout"] == "evict"
        client.delete(f"{BASE}/bunkers/{bunker['id']}")

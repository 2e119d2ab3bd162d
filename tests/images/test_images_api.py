"""Image routes on the real controller app (SQLite): registration, scopes, built-ins,
availability groups, warm summaries, scan findings and image-aware placement."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from scaigrid import errors
from scaigrid.ids import new_id
from scaigrid.modules.scaibunker.images import service
from scaigrid.modules.scaibunker.images.models import Image, ImageWorker
from scaigrid.modules.scaibunker.state import ModuleState
from scaigrid.modules.scaibunker.workers import scheduler
from scaigrid.modules.scaibunker.workers.models import Worker
from scaigrid.platform.auth.service import authenticate
from scaigrid.platform.db import utcnow
from scaigrid.worker.scan import parse_trivy_report
from tests.conftest import Identity, MakeIdentity

BASE = "/v1/modules/scaibunker"
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
OCI = {"kind": "oci", "ref": "registry.example/test/app:v1"}  # never pulled: no worker bakes


def _state(app: FastAPI) -> ModuleState:
    state: ModuleState = app.state.scaibunker
    return state


async def _worker(app: FastAPI, tenant_id: str | None = None) -> str:
    worker_id = new_id("wrk")
    async with _state(app).db.sessionmaker() as session:
        session.add(
            Worker(
                id=worker_id,
                hostname=worker_id,
                tenant_id=tenant_id,
                drivers=[{"name": "container", "isolation": "container"}],
                capacity={"cpu_millicores": 4000, "memory_mb": 8192, "disk_mb": 100000},
                connection="online",
                credential_hash=secrets.token_hex(32),
            )
        )
        await session.commit()
    return worker_id


async def _register(
    client: httpx.AsyncClient, who: Identity, name: str, **extra: Any
) -> httpx.Response:
    body = {"name": name, "source": OCI, **extra}
    return await client.post(f"{BASE}/images", json=body, headers=who.headers)


async def test_builtins_are_seeded_pending_once(
    platform_app: FastAPI, platform_client: httpx.AsyncClient, make_identity: MakeIdentity
) -> None:
    who = await make_identity("tenant_admin")
    response = await platform_client.get(
        f"{BASE}/images", params={"scope": "platform", "limit": 100}, headers=who.headers
    )
    builtins = {i["name"]: i for i in response.json()["data"] if i["builtin"]}
    assert set(builtins) == set(service.BUILTIN_IMAGES)
    for name, image in builtins.items():
        assert image["status"] == "pending"
        assert image["status_reason"] == service.BUILTIN_PENDING_REASON
        assert image["source"] == {"kind": "oci", "ref": service.BUILTIN_IMAGES[name]}
    await service.seed_builtin_images(_state(platform_app))
    async with _state(platform_app).db.sessionmaker() as session:
        count = len((await session.scalars(select(Image.id).where(Image.builtin))).all())
    assert count == len(service.BUILTIN_IMAGES)
    # a worker registering does not pull built-ins (no registry is reachable here)
    await service.bake_pending_images(_state(platform_app))
    again = await platform_client.get(
        f"{BASE}/images/{builtins['minimal']['id']}", headers=who.headers
    )
    assert again.json()["data"]["status"] == "pending"


async def test_register_oci_image_and_scopes(
    platform_client: httpx.AsyncClient, make_identity: MakeIdentity, admin_headers: dict[str, str]
) -> None:
    alice, bob = await make_identity("tenant_admin"), await make_identity("tenant_admin")
    created = await _register(platform_client, alice, "app", size_mib=512, lazy_pull=True)
    assert created.status_code == 201, created.text
    image = created.json()["data"]
    assert (image["status"], image["scope"], image["lazy_pull"]) == ("pending", "tenant", True)
    assert image["source"] == OCI and image["warm"] == dict.fromkeys(service.WARM_STATES, 0)
    assert (await _register(platform_client, alice, "app")).json()["error"]["code"] == (
        "SLUG_CONFLICT"
    )
    assert (await _register(platform_client, bob, "app")).status_code == 201
    hidden = await platform_client.get(f"{BASE}/images/{image['id']}", headers=bob.headers)
    assert hidden.json()["error"]["code"] == "IMAGE_NOT_FOUND"
    denied = await _register(platform_client, alice, "plat", scope="platform")
    assert denied.json()["error"]["code"] == "AUTHZ_PERMISSION_DENIED"
    platform = await platform_client.post(
        f"{BASE}/images",
        json={"name": "app", "source": OCI, "scope": "platform"},
        headers=admin_headers,
    )
    assert platform.status_code == 201
    missing = await _register(platform_client, alice, "pinned", bake_worker_id="wrk_nope")
    assert missing.json()["error"]["code"] == "WORKER_NOT_FOUND"


@pytest.mark.parametrize(
    "ref",
    ["", "-oops", "UPPER/case", "a b", "x/../y", "x@sha256:short", "x" * 600],
)
async def test_bad_oci_reference_is_a_validation_error(
    platform_client: httpx.AsyncClient, make_identity: MakeIdentity, ref: str
) -> None:
    who = await make_identity("tenant_admin")
    response = await platform_client.post(
        f"{BASE}/images",
        json={"name": "bad", "source": {"kind": "oci", "ref": ref}},
        headers=who.headers,
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "VALIDATION_ERROR"


async def test_name_resolution_prefers_tenant_over_platform(
    platform_app: FastAPI,
    platform_client: httpx.AsyncClient,
    make_identity: MakeIdentity,
    admin_headers: dict[str, str],
) -> None:
    alice = await make_identity("tenant_admin")
    other = await make_identity("tenant_admin")
    await platform_client.post(
        f"{BASE}/images",
        json={"name": "shadowed", "source": OCI, "scope": "platform"},
        headers=admin_headers,
    )
    mine = (await _register(platform_client, alice, "shadowed")).json()["data"]
    db = _state(platform_app).db
    principal = await authenticate(db, alice.key)
    stranger = await authenticate(db, other.key)
    async with db.sessionmaker() as session:
        assert (await service.resolve_image(session, principal, "shadowed")).id == mine["id"]
        found = await service.resolve_image(session, stranger, "shadowed")
        assert found.scope == "platform"


async def test_a_name_never_resolves_to_another_tenants_image_even_for_a_super_admin(
    platform_app: FastAPI,
    platform_client: httpx.AsyncClient,
    make_identity: MakeIdentity,
    admin_headers: dict[str, str],
) -> None:
    await platform_client.post(
        f"{BASE}/images",
        json={"name": "debian-x", "source": OCI, "scope": "platform"},
        headers=admin_headers,
    )
    evil = await make_identity("tenant_admin")
    planted = (await _register(platform_client, evil, "debian-x")).json()["data"]
    db = _state(platform_app).db
    admin_key = admin_headers["Authorization"].removeprefix("Bearer ")
    admin = await authenticate(db, admin_key)
    async with db.sessionmaker() as session:
        found = await service.resolve_image(session, admin, "debian-x")
        assert (found.scope, found.id != planted["id"]) == ("platform", True)
        # By id a super admin may still name any image on purpose.
        assert (await service.resolve_image(session, admin, planted["id"])).id == planted["id"]


async def test_tar_sources_are_for_super_admins_only(
    platform_client: httpx.AsyncClient, make_identity: MakeIdentity, admin_headers: dict[str, str]
) -> None:
    tenant_admin = await make_identity("tenant_admin")
    body = {"name": "stolen", "source": {"kind": "tar", "path": "/var/lib/secret.tar"}}
    refused = await platform_client.post(f"{BASE}/images", json=body, headers=tenant_admin.headers)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "AUTHZ_PERMISSION_DENIED"
    listed = await platform_client.get(f"{BASE}/images", headers=tenant_admin.headers)
    assert all(i["name"] != "stolen" for i in listed.json()["data"])
    allowed = await platform_client.post(f"{BASE}/images", json=body, headers=admin_headers)
    assert allowed.status_code == 201, allowed.text


async def test_internal_registries_are_for_super_admins_only(
    platform_client: httpx.AsyncClient, make_identity: MakeIdentity, admin_headers: dict[str, str]
) -> None:
    """A tenant cannot make workers connect into the platform's own network (a port scan
    read back from the bake failure) by naming a local or private registry address."""
    tenant_admin = await make_identity("tenant_admin")
    for ref in ("127.0.0.1:5432/x/y:latest", "localhost:6379/a:b", "169.254.169.254/m:d"):
        body = {"name": "probe", "source": {"kind": "oci", "ref": ref}}
        refused = await platform_client.post(
            f"{BASE}/images", json=body, headers=tenant_admin.headers
        )
        assert refused.status_code == 403, (ref, refused.text)
    public = {"name": "pub", "source": {"kind": "oci", "ref": "docker.io/library/python:3.12"}}
    ok = await platform_client.post(f"{BASE}/images", json=public, headers=tenant_admin.headers)
    assert ok.status_code == 201, ok.text
    local = {"name": "local", "source": {"kind": "oci", "ref": "127.0.0.1:5000/test/busybox:1"}}
    assert (
        await platform_client.post(f"{BASE}/images", json=local, headers=admin_headers)
    ).status_code == 201


async def test_availability_groups_queue_warm_on_register(
    platform_app: FastAPI,
    platform_client: httpx.AsyncClient,
    make_identity: MakeIdentity,
    admin_headers: dict[str, str],
) -> None:
    alice, bob = await make_identity("tenant_admin"), await make_identity("tenant_admin")
    shared, own = await _worker(platform_app), await _worker(platform_app, alice.tenant_id)
    foreign = await _worker(platform_app, bob.tenant_id)
    groups_url = f"{BASE}/availability-groups"
    created = await platform_client.post(
        groups_url, json={"name": "hot", "worker_ids": [shared, own]}, headers=alice.headers
    )
    assert created.status_code == 201, created.text
    group = created.json()["data"]
    assert (group["scope"], group["tenant_id"]) == ("tenant", alice.tenant_id)
    dup = await platform_client.post(groups_url, json={"name": "hot"}, headers=alice.headers)
    assert dup.json()["error"]["code"] == "SLUG_CONFLICT"
    bad = await platform_client.post(
        groups_url, json={"name": "x", "worker_ids": [foreign]}, headers=alice.headers
    )
    assert bad.json()["error"]["code"] == "VALIDATION_ERROR"
    plat = await platform_client.post(
        groups_url, json={"name": "p", "scope": "platform"}, headers=alice.headers
    )
    assert plat.json()["error"]["code"] == "AUTHZ_PERMISSION_DENIED"

    image = (await _register(platform_client, alice, "warmme")).json()["data"]
    assert image["warm"] == {"queued": 2, "ready": 0, "failed": 0, "skipped": 0}
    read = await platform_client.get(f"{groups_url}/{group['id']}", headers=alice.headers)
    assert read.json()["data"]["image_ids"] == [image["id"]]
    per_worker = await platform_client.get(
        f"{BASE}/images/{image['id']}/warm", headers=alice.headers
    )
    assert {w["worker_id"] for w in per_worker.json()["data"]["workers"]} == {shared, own}
    not_ready = await platform_client.post(
        f"{BASE}/images/{image['id']}/warm", json={}, headers=alice.headers
    )
    assert not_ready.json()["error"]["code"] == "IMAGE_NOT_READY"

    assert (await platform_client.get(f"{groups_url}/{group['id']}", headers=bob.headers)).json()[
        "error"
    ]["code"] == "AVAILABILITY_GROUP_NOT_FOUND"
    patched = await platform_client.patch(
        f"{groups_url}/{group['id']}",
        json={"name": "cold", "worker_ids": [own]},
        headers=alice.headers,
    )
    assert patched.json()["data"]["name"] == "cold"
    assert patched.json()["data"]["worker_ids"] == [own]
    listed = await platform_client.get(groups_url, headers=alice.headers)
    assert [g["id"] for g in listed.json()["data"]] == [group["id"]]
    assert (await platform_client.get(groups_url, headers=bob.headers)).json()["data"] == []
    deleted = await platform_client.delete(f"{groups_url}/{group['id']}", headers=alice.headers)
    assert deleted.json()["data"] == {"id": group["id"], "deleted": True}
    platform_group = await platform_client.post(
        groups_url,
        json={"name": "fleet", "scope": "platform", "worker_ids": [shared]},
        headers=admin_headers,
    )
    assert platform_group.status_code == 201


async def test_warm_on_ready_image_skips_offline_workers(
    platform_app: FastAPI, platform_client: httpx.AsyncClient, make_identity: MakeIdentity
) -> None:
    alice = await make_identity("tenant_admin")
    worker = await _worker(platform_app)
    image = (await _register(platform_client, alice, "readyone")).json()["data"]
    async with _state(platform_app).db.sessionmaker() as session:
        row = await session.get(Image, image["id"])
        assert row is not None
        row.status = "ready"
        await session.commit()
    response = await platform_client.post(
        f"{BASE}/images/{image['id']}/warm", json={"worker_ids": [worker]}, headers=alice.headers
    )
    assert response.json()["data"] == {"queued": 0, "ready": 0, "failed": 0, "skipped": 1}
    detail = await platform_client.get(f"{BASE}/images/{image['id']}/warm", headers=alice.headers)
    assert detail.json()["data"]["workers"][0]["error"] == "worker not eligible"


async def test_scan_results_are_stored_and_paged(
    platform_app: FastAPI, platform_client: httpx.AsyncClient, make_identity: MakeIdentity
) -> None:
    report = DATA / "trivy-report-debian-buster.json"
    if not report.is_file():
        pytest.skip(f"{report} is missing")
    alice = await make_identity("tenant_admin")
    image = (await _register(platform_client, alice, "scanned")).json()["data"]
    pending = await platform_client.post(f"{BASE}/images/{image['id']}/scan", headers=alice.headers)
    assert pending.json()["error"]["code"] == "IMAGE_NOT_READY"
    result = parse_trivy_report(report.read_bytes()).to_dict()
    await service.store_scan(_state(platform_app), image["id"], json.loads(json.dumps(result)))
    read = await platform_client.get(f"{BASE}/images/{image['id']}", headers=alice.headers)
    scan = read.json()["data"]["scan"]
    assert scan["status"] == "done" and scan["scanner"] == "trivy"
    assert scan["counts"] == {"critical": 1, "high": 0, "medium": 0, "low": 1, "unknown": 0}
    url = f"{BASE}/images/{image['id']}/scan"
    first = (await platform_client.get(url, params={"limit": 1}, headers=alice.headers)).json()
    assert len(first["data"]) == 1 and first["has_more"]
    second = await platform_client.get(
        url, params={"limit": 1, "cursor": first["next_cursor"]}, headers=alice.headers
    )
    ids = {first["data"][0]["vulnerability_id"], second.json()["data"][0]["vulnerability_id"]}
    assert len(ids) == 2
    critical = await platform_client.get(
        url, params={"severity": "critical"}, headers=alice.headers
    )
    assert [f["severity"] for f in critical.json()["data"]] == ["critical"]
    bad = await platform_client.get(url, params={"severity": "awful"}, headers=alice.headers)
    assert bad.status_code == 422
    await service.store_scan(_state(platform_app), image["id"], {"status": "scanner_unavailable"})
    scan = (await platform_client.get(f"{BASE}/images/{image['id']}", headers=alice.headers)).json()
    assert scan["data"]["scan"]["status"] == "scanner_unavailable"


async def test_placement_honours_lazy_pull(
    platform_app: FastAPI, make_identity: MakeIdentity
) -> None:
    alice = await make_identity("tenant_admin")
    cold, warm = await _worker(platform_app), await _worker(platform_app)
    async with _state(platform_app).db.sessionmaker() as session:
        strict = scheduler.Request(alice.tenant_id, 100, 128, 64, image_id="img_x", lazy_pull=False)
        with pytest.raises(errors.NoSuitableWorker, match="not ready"):
            await scheduler.place(session, [cold, warm], strict)
        session.add(
            ImageWorker(image_id="img_x", worker_id=warm, state="ready", updated_at=utcnow())
        )
        await session.commit()
        assert (await scheduler.place(session, [cold, warm], strict)).worker_id == warm
        assert (
            await scheduler.place(
                session,
                [cold],
                scheduler.Request(alice.tenant_id, 100, 128, 64, image_id="img_x", lazy_pull=True),
            )
        ).worker_id == cold
        cache_only = await _worker(platform_app)
        worker = await session.get(Worker, cache_only)
        assert worker is not None
        worker.image_cache = [{"image_id": "img_y", "digest": None, "state": "ready"}]
        await session.commit()
        strict_y = scheduler.Request(
            alice.tenant_id, 100, 128, 64, image_id="img_y", lazy_pull=False
        )
        assert (
            await scheduler.place(session, [cold, cache_only], strict_y)
        ).worker_id == cache_only


async def test_block_on_critical_refuses_bunkers_from_vulnerable_images(
    platform_app: FastAPI, platform_client: httpx.AsyncClient, make_identity: MakeIdentity
) -> None:
    debian = DATA / "trivy-report-debian-buster.json"
    alpine = DATA / "trivy-report-alpine-310.json"
    if not (debian.is_file() and alpine.is_file()):
        pytest.skip("the Trivy reports in ../shared/data are missing")
    alice = await make_identity("tenant_admin")
    image = (await _register(platform_client, alice, "vulnerable")).json()["data"]
    async with _state(platform_app).db.sessionmaker() as session:
        row = await session.get(Image, image["id"])
        assert row is not None
        row.status = "ready"
        await session.commit()
    state = _state(platform_app)
    await service.store_scan(state, image["id"], parse_trivy_report(debian.read_bytes()).to_dict())

    async def create() -> str:
        response = await platform_client.post(
            f"{BASE}/bunkers", json={"image": "vulnerable"}, headers=alice.headers
        )
        return str(response.json()["error"]["code"])

    assert await create() != "IMAGE_SCAN_BLOCKED"  # off by default (no worker: not placed)
    config = await platform_client.put(
        "/v1/modules/scaibunker/config", json={"block_on_critical": True}, headers=alice.headers
    )
    assert config.status_code == 200, config.text
    assert await create() == "IMAGE_SCAN_BLOCKED"
    await service.store_scan(state, image["id"], {"status": "failed"})
    assert await create() == "IMAGE_SCAN_BLOCKED"  # the last done scan still counts
    await service.store_scan(state, image["id"], parse_trivy_report(alpine.read_bytes()).to_dict())
    assert await create() != "IMAGE_SCAN_BLOCKED"


async def test_rescan_loop_rescans_ready_images(
    platform_app: FastAPI, platform_client: httpx.AsyncClient, make_identity: MakeIdentity
) -> None:
    alice = await make_identity("tenant_admin")
    image = (await _register(platform_client, alice, "rescanned")).json()["data"]
    state = _state(platform_app)
    async with state.db.sessionmaker() as session:
        row = await session.get(Image, image["id"])
        assert row is not None
        row.status = "ready"
        await session.commit()
    loop = state.spawn(service.rescan_loop(state, interval_s=0.05), name="test-rescan")
    try:
        for _ in range(100):
            read = await platform_client.get(f"{BASE}/images/{image['id']}", headers=alice.headers)
            if read.json()["data"]["scan"] is not None:
                break
            await asyncio.sleep(0.05)
    finally:
        loop.cancel()
    # no worker holds the image here, so the rescan is recorded as failed
    assert read.json()["data"]["scan"]["status"] == "failed"

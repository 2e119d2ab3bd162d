"""Events and webhooks (SPEC §1.8): bunker state changes reach a receiver on 127.0.0.1 as
signed envelopes; failures are retried with backoff up to max_retries and logged; internal
targets are refused unless allowed; other tenants' webhooks are 404."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import shutil
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from scaigrid.ids import new_id
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.platform.app import create_app
from scaigrid.platform.db import Database
from scaigrid.platform.events.service import emit
from scaigrid.settings import Settings

MakeIdentity = Callable[..., Awaitable[Any]]


@dataclass
class Receiver:
    """A webhook receiver: answers with ``statuses`` in turn (then 200), records bodies."""

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            status = state.statuses.pop(0) if state.statuses else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        yield state
    finally:
        server.shutdown()
        thread.join(5)


@pytest.fixture
async def hook_app(
    tmp_path: Path, migrated_sqlite_template: Path, settings_for: Callable[..., Settings]
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, dict[str, str]]]:
    shutil.copy2(migrated_sqlite_template, tmp_path / "scaigrid.db")
    settings = settings_for(tmp_path, webhook_retry_base_s=0.05, webhook_allow_private=True)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        app.state.webhooks.poll_interval_s = 0.05
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            admin = {"Authorization": f"Bearer {settings.admin_key_file.read_text().strip()}"}
            yield app, client, admin


async def _tenant_admin(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> tuple[str, dict[str, str]]:
    tenant = (
        await client.post(
            "/v1/tenants", json={"name": new_id("ten").lower()[-8:] + "x"}, headers=admin
        )
    ).json()["data"]
    user = (
        await client.post(
            "/v1/users",
            json={"email": "a@h.test", "role": "tenant_admin", "tenant_id": tenant["id"]},
            headers=admin,
        )
    ).json()["data"]
    key = (
        await client.post("/v1/api-keys", json={"name": "k", "user_id": user["id"]}, headers=admin)
    ).json()["data"]["key"]
    return tenant["id"], {"Authorization": f"Bearer {key}"}


async def test_bunker_state_changes_arrive_signed_after_retries(
    hook_app: tuple[FastAPI, httpx.AsyncClient, dict[str, str]], receiver: Receiver
) -> None:
    app, client, admin = hook_app
    tenant_id, boss = await _tenant_admin(client, admin)
    created = await client.post(
        "/v1/webhooks",
        json={"url": receiver.url, "event_types": ["scaibunker.bunker.state_changed"]},
        headers=boss,
    )
    assert created.status_code == 201, created.text
    hook = created.json()["data"]
    secret = hook["secret"]
    receiver.statuses = [500, 503]  # two failed attempts, retried

    db: Database = app.state.db
    async with db.sessionmaker() as session:
        bunker = Bunker(
            id=new_id("bnk"),
            tenant_id=tenant_id,
            owner_user_id="usr_x",
            image_name="debian-12",
            image_id=new_id("img"),
            lifecycle_mode="ephemeral",
            network_profile="isolated",
            cpu_millicores=1000,
            memory_mb=512,
            disk_mb=1024,
            status="pending",
            status_reason="created",
        )
        session.add(bunker)
        emit(session, "other.event", tenant_id, {"ignored": True})  # filtered out
        await session.commit()
    # Disabling the module ends the bunker: pending → stopping → terminated.
    assert (await client.post("/v1/modules/scaibunker/disable", headers=boss)).status_code == 200

    url = f"/v1/webhooks/{hook['id']}/deliveries"

    async def log() -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = (await client.get(url, headers=boss)).json()["data"]
        return data

    deadline = asyncio.get_running_loop().time() + 10
    while [d["status"] for d in await log()] != ["delivered", "delivered"]:
        assert asyncio.get_running_loop().time() < deadline, await log()
        await asyncio.sleep(0.05)
    deliveries = await log()
    assert sum(d["attempts"] for d in deliveries) == 4
    assert len(receiver.received) == 4
    bodies = [json.loads(body) for _, body in receiver.received]
    assert {b["event_type"] for b in bodies} == {"scaibunker.bunker.state_changed"}
    assert {b["event_id"] for b in bodies} == {d["event_id"] for d in deliveries}
    transitions = {(b["payload"]["from"], b["payload"]["to"]) for b in bodies}
    assert transitions == {("pending", "stopping"), ("stopping", "terminated")}
    envelope = bodies[-1]
    assert envelope["source"] == "scaibunker" and envelope["tenant_id"] == tenant_id
    assert envelope["partner_id"].startswith("ptn_")
    assert envelope["payload"]["bunker_id"] == bunker.id
    assert envelope["payload"]["reason"] == "module_disabled"
    for headers, body in receiver.received:
        t, v1 = (part.split("=", 1)[1] for part in headers["x-scaigrid-signature"].split(","))
        expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(v1, expected)


async def test_retries_stop_at_max_retries(
    hook_app: tuple[FastAPI, httpx.AsyncClient, dict[str, str]], receiver: Receiver
) -> None:
    app, client, admin = hook_app
    tenant_id, boss = await _tenant_admin(client, admin)
    hook = (
        await client.post(
            "/v1/webhooks", json={"url": receiver.url, "max_retries": 2}, headers=boss
        )
    ).json()["data"]
    receiver.statuses = [500] * 10
    async with app.state.db.sessionmaker() as session:
        emit(session, "test.event", tenant_id, {"n": 1})
        await session.commit()
    url = f"/v1/webhooks/{hook['id']}/deliveries"

    async def status() -> str:
        data = (await client.get(url, headers=boss)).json()["data"]
        return str(data[0]["status"]) if data else "none"

    deadline = asyncio.get_running_loop().time() + 10
    while await status() != "failed":
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    (delivery,) = (await client.get(url, headers=boss)).json()["data"]
    assert delivery["attempts"] == 3 and delivery["last_status_code"] == 500
    assert len(receiver.received) == 3


async def test_internal_targets_are_refused_and_other_tenants_hooks_hidden(
    platform_client: httpx.AsyncClient, make_identity: MakeIdentity
) -> None:
    boss = await make_identity(role="tenant_admin")
    other = await make_identity(role="tenant_admin")
    for url in ("http://127.0.0.1:9/x", "http://10.0.0.1/x", "http://169.254.169.254/", "ftp://x/"):
        response = await platform_client.post(
            "/v1/webhooks", json={"url": url}, headers=boss.headers
        )
        assert response.status_code == 422, url
        assert response.json()["error"]["code"] == "VALIDATION_ERROR"
    listed = await platform_client.get("/v1/webhooks", headers=other.headers)
    assert listed.json()["data"] == []
    missing = await platform_client.get(
        "/v1/webhooks/whk_01JDZ4Q7S8Y6V3N2K5M9T0R1WX", headers=boss.headers
    )
    assert missing.status_code == 404

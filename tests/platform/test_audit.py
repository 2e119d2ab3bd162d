"""Audit log: every mutating request recorded with who/what/where/outcome; reach-scoped
reads, pagination and exports; a tampered, deleted or forked chain is reported."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from click.testing import CliRunner
from fastapi import FastAPI
from sqlalchemy import delete, update

from scaigrid.platform.audit.models import AuditRecord
from scaigrid.platform.audit.service import AuditEntry, AuditLog, verify_chain
from scaigrid.platform.cli import main as cli_main
from scaigrid.platform.db import Database
from scaigrid.platform.migrate import migrate
from scaigrid.settings import Settings

MakeIdentity = Callable[..., Awaitable[Any]]
JOIN = "/v1/modules/scaibunker/workers/join-tokens"


def _entry(n: int) -> AuditEntry:
    return AuditEntry(
        request_id=f"req_{n}",
        actor_id="usr_x",
        actor_type="api_key",
        tenant_id="ten_x",
        partner_id="ptn_x",
        action=f"POST /thing/{n}",
        resource_type="thing",
        resource_id=str(n),
        ip_address="127.0.0.1",
        user_agent="test",
        outcome="SUCCESS",
        status_code=201,
    )


async def test_mutating_requests_are_recorded_with_actor_resource_and_outcome(
    platform_client: httpx.AsyncClient, admin_headers: dict[str, str], make_identity: MakeIdentity
) -> None:
    created = await platform_client.post(
        JOIN, json={}, headers={**admin_headers, "User-Agent": "audit-test/1"}
    )
    assert created.status_code == 201
    user = await make_identity()
    denied = await platform_client.post(JOIN, json={}, headers=user.headers)
    assert denied.status_code == 403
    anonymous = await platform_client.delete("/v1/modules/scaibunker/bunkers/bnk_nope")
    assert anonymous.status_code == 401
    await platform_client.get("/v1/modules", headers=admin_headers)  # reads are not recorded

    page = await platform_client.get("/v1/audit-log", headers=admin_headers)
    assert page.status_code == 200
    records = page.json()["data"]
    assert [r["outcome"] for r in records] == ["FAILURE", "FAILURE", "SUCCESS"]
    gone, forbidden, ok = records
    assert ok["action"] == "POST /v1/modules/scaibunker/workers/join-tokens"
    assert ok["resource_type"] == "join-token"
    assert ok["resource_id"] == created.json()["data"]["id"]
    assert ok["actor_type"] == "api_key"
    assert ok["user_agent"] == "audit-test/1"
    assert ok["ip_address"] == "127.0.0.1"
    assert ok["request_id"] == created.headers["x-request-id"]
    assert ok["status_code"] == 201
    assert forbidden["actor_id"] == user.user_id
    assert forbidden["tenant_id"] == user.tenant_id
    assert gone["actor_type"] == "anonymous" and gone["actor_id"] is None
    assert gone["resource_type"] == "bunker" and gone["resource_id"] == "bnk_nope"
    assert records[0]["prev_hash"] == records[1]["record_hash"]


async def test_reads_are_limited_to_reach_and_need_admin_access(
    platform_client: httpx.AsyncClient, admin_headers: dict[str, str], make_identity: MakeIdentity
) -> None:
    alice = await make_identity(role="tenant_admin")
    bob = await make_identity(role="tenant_admin")
    plain = await make_identity(role="tenant_user", tenant=alice.tenant_slug)
    for who in (alice, bob, plain):
        await platform_client.post(JOIN, json={}, headers=who.headers)

    response = await platform_client.get("/v1/audit-log", headers=alice.headers)
    actors = {r["actor_id"] for r in response.json()["data"]}
    assert actors == {alice.user_id, plain.user_id}
    assert (await platform_client.get("/v1/audit-log", headers=plain.headers)).status_code == 403
    everyone = await platform_client.get("/v1/audit-log", headers=admin_headers)
    assert {r["actor_id"] for r in everyone.json()["data"]} >= {alice.user_id, bob.user_id}
    filtered = await platform_client.get(
        "/v1/audit-log", params={"actor_id": bob.user_id}, headers=admin_headers
    )
    assert [r["actor_id"] for r in filtered.json()["data"]] == [bob.user_id]


async def test_pagination_walks_every_record_once(
    platform_app: FastAPI, platform_client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    audit: AuditLog = platform_app.state.audit
    for n in range(7):
        await audit.append(_entry(n))
    seen: list[int] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = await platform_client.get("/v1/audit-log", params=params, headers=admin_headers)
        body = page.json()
        seen += [r["seq"] for r in body["data"]]
        if not body["has_more"]:
            assert body["next_cursor"] is None
            break
        cursor = body["next_cursor"]
    assert seen == [7, 6, 5, 4, 3, 2, 1]
    for bad in ({"limit": 0}, {"limit": 1001}, {"cursor": "x"}, {"since": "2026-01-01T00:00:00"}):
        response = await platform_client.get("/v1/audit-log", params=bad, headers=admin_headers)
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "VALIDATION_ERROR"


async def test_exports_csv_json_and_ndjson_hold_the_same_records(
    platform_app: FastAPI, platform_client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    audit: AuditLog = platform_app.state.audit
    for n in range(3):
        await audit.append(_entry(n))
    url = "/v1/audit-log/export"
    as_json = await platform_client.get(url, params={"format": "json"}, headers=admin_headers)
    as_nd = await platform_client.get(url, params={"format": "ndjson"}, headers=admin_headers)
    as_csv = await platform_client.get(url, params={"format": "csv"}, headers=admin_headers)
    assert as_csv.headers["content-type"].startswith("text/csv")
    from_json = json.loads(as_json.text)
    from_nd = [json.loads(line) for line in as_nd.text.splitlines()]
    from_csv = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [r["seq"] for r in from_json] == [3, 2, 1]
    assert from_nd == from_json
    assert [r["record_hash"] for r in from_csv] == [r["record_hash"] for r in from_json]
    assert from_csv[0]["action"] == "POST /thing/2"


async def test_concurrent_appends_never_fork_the_chain(platform_app: FastAPI) -> None:
    audit: AuditLog = platform_app.state.audit
    second = AuditLog(platform_app.state.db)  # a second writer, as another process would be
    await asyncio.gather(*((audit if n % 2 else second).append(_entry(n)) for n in range(40)))
    report = await verify_chain(platform_app.state.db)
    assert report.broken_seq is None and report.checked == 40


async def test_a_tampered_row_is_reported_by_verify_and_the_cli(
    platform_app: FastAPI, platform_settings: Settings, tmp_path: Path
) -> None:
    audit: AuditLog = platform_app.state.audit
    for n in range(5):
        await audit.append(_entry(n))
    db: Database = platform_app.state.db
    assert (await verify_chain(db)).broken_seq is None
    runner = CliRunner()
    env = {
        "SCAIGRID_DATA_DIR": str(tmp_path),
        "SCAIGRID_DATABASE_URL": platform_settings.database_url,
    }
    result = await asyncio.to_thread(runner.invoke, cli_main, ["admin", "audit-verify"], env=env)
    assert result.exit_code == 0, result.output
    assert "ok 5 records" in result.output

    async with db.sessionmaker() as session:
        await session.execute(
            update(AuditRecord)
            .where(AuditRecord.seq == 3)
            .values(outcome="SUCCESS", actor_id="usr_y")
        )
        await session.commit()
    report = await verify_chain(db)
    assert report.broken_seq == 3 and "contents" in (report.reason or "")
    result = await asyncio.to_thread(runner.invoke, cli_main, ["admin", "audit-verify"], env=env)
    assert result.exit_code == 1
    assert "broken at seq 3" in result.output

    async with db.sessionmaker() as session:
        await session.execute(delete(AuditRecord).where(AuditRecord.seq.in_([2, 3])))
        await session.commit()
    report = await verify_chain(db)
    assert report.broken_seq == 4 and report.reason == "expected seq 2"


async def test_chain_on_every_database(empty_database_url: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=empty_database_url, log_level="WARNING")
    await migrate(settings)
    db = Database(empty_database_url)
    try:
        writers = [AuditLog(db), AuditLog(db)]
        await asyncio.gather(*(writers[n % 2].append(_entry(n)) for n in range(20)))
        assert await verify_chain(db) == type(await verify_chain(db))(20)
        async with db.sessionmaker() as session:
            await session.execute(
                update(AuditRecord).where(AuditRecord.seq == 11).values(prev_hash="f" * 64)
            )
            await session.commit()
        assert (await verify_chain(db)).broken_seq == 11
    finally:
        await db.dispose()


async def test_module_reads_are_recorded_only_where_read_audit_is_on(
    platform_client: httpx.AsyncClient, admin_headers: dict[str, str], make_identity: MakeIdentity
) -> None:
    watched = await make_identity(role="tenant_admin")
    unwatched = await make_identity(role="tenant_admin")
    bunkers = "/v1/modules/scaibunker/bunkers"
    config = "/v1/modules/scaibunker/config"
    await platform_client.get(bunkers, headers=watched.headers)
    put = await platform_client.put(config, json={"read_audit": True}, headers=watched.headers)
    assert put.status_code == 200
    await platform_client.get(bunkers, headers=watched.headers)
    await platform_client.get(bunkers, headers=unwatched.headers)
    await platform_client.get("/v1/modules", headers=watched.headers)  # not a module route

    records = (await platform_client.get("/v1/audit-log", headers=admin_headers)).json()["data"]
    reads = [r for r in records if r["action"].startswith("GET ")]
    assert [(r["action"], r["actor_id"]) for r in reads] == [(f"GET {bunkers}", watched.user_id)]
    assert reads[0]["outcome"] == "SUCCESS"

"""Lifecycle benchmarks (issue #4): quota admission throughput and worker death → ``failed``.

1. **Admission over HTTP** (real controller on SQLite, real dev worker): the default quota
   profile is set to ``--quota`` concurrent bunkers, then creates (``wait_s=0``) are fired one
   after another until one answers 429. Reported: admitted creates per second and the latency
   of admitted and refused creates, beside a baseline in the same run: the same request refused
   at validation (422), i.e. the HTTP, auth and parsing cost without admission.
2. **Admission on PostgreSQL** (service level, ``--pg-concurrency`` sessions at once, no
   in-process lock): ``admit`` + insert until the cap, beside plain inserts of the same rows.
3. **Worker death → bunkers failed**: a second real worker process holds ``--loss-bunkers``
   bunkers and is SIGKILLed; the time until every one of them is ``failed`` (``worker_lost``)
   is measured from the kill and from the worker's last heartbeat, ``--loss-rounds`` times,
   beside terminating the same number of bunkers through the API.

Run: ``.venv/bin/python -m benchmarks.lifecycle`` (needs root, crun, PostgreSQL on loopback).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import platform
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from tests.fixtures.fleet import HOSTNAME, ExtraWorker, wait_online, warm, workers_by_host
from tests.fixtures.stack import BASE, E2E_CAPS, Stack, build_busybox_tar, start_stack

import scaigrid.platform.auth  # noqa: F401  (platform import cycle: auth must load before iam)
from benchmarks.run import percentile
from scaigrid import errors
from scaigrid.ids import new_id
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.config import PlatformCeilings
from scaigrid.modules.scaibunker.quotas import service as quotas
from scaigrid.modules.scaibunker.quotas.models import DEFAULT_PROFILE_ID, QuotaProfile
from scaigrid.platform.db import Database, utcnow
from scaigrid.platform.migrate import run_alembic

PG_ADMIN_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
SMALL = {"memory_mb": 128, "disk_mb": 64, "cpu_millicores": 100}


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def admission_http(stack: Stack, image: str, quota: int, baseline_n: int) -> dict[str, Any]:
    """Creates until the quota refuses; return timings (ms) and the admitted rate (1/s)."""
    admitted: list[float] = []
    refused: list[float] = []
    invalid: list[float] = []
    ids: list[str] = []
    with stack.client() as client:
        caps = {**E2E_CAPS, "max_concurrent_bunkers": quota}
        client.patch(f"{BASE}/quota-profiles/{DEFAULT_PROFILE_ID}", json=caps).raise_for_status()
        began = time.perf_counter()
        while True:
            start = time.perf_counter()
            response = client.post(f"{BASE}/bunkers", json={"image": image, **SMALL})
            took = _ms(start)
            if response.status_code == 429:
                refused.append(took)
                break
            response.raise_for_status()
            admitted.append(took)
            ids.append(response.json()["data"]["id"])
        window_s = time.perf_counter() - began
        for _ in range(baseline_n - 1):
            start = time.perf_counter()
            response = client.post(f"{BASE}/bunkers", json={"image": image, **SMALL})
            assert response.status_code == 429, response.text
            refused.append(_ms(start))
        for _ in range(baseline_n):
            start = time.perf_counter()
            response = client.post(f"{BASE}/bunkers", json={"image": image, "memory_mb": 1})
            assert response.status_code == 422, response.text
            invalid.append(_ms(start))
        for bunker_id in ids:
            client.delete(f"{BASE}/bunkers/{bunker_id}")
        client.patch(
            f"{BASE}/quota-profiles/{DEFAULT_PROFILE_ID}", json=E2E_CAPS
        ).raise_for_status()
    return {
        "admitted": admitted,
        "refused": refused,
        "invalid": invalid,
        "rate": len(admitted) / window_s,
    }


def _bunker(user: str) -> Bunker:
    now = utcnow()
    return Bunker(
        id=new_id("bnk"),
        tenant_id="ten_bench",
        owner_user_id=user,
        image_name="busybox",
        image_id="img_bench",
        lifecycle_mode="ephemeral",
        network_profile="isolated",
        cpu_millicores=100,
        memory_mb=128,
        disk_mb=64,
        gpu_count=0,
        status="running",
        status_reason="booted",
        status_changed_at=now,
        created_at=now,
        label_set={},
        env_vars={},
        interfaces=[],
    )


async def _pg_round(db: Database, quota: int, concurrency: int) -> tuple[float, float, int]:
    """Admit ``concurrency`` at once with cap ``quota``; return (admit s, insert s, admitted)."""
    async with db.sessionmaker() as session:
        profile = await session.get(QuotaProfile, DEFAULT_PROFILE_ID)
        assert profile is not None
        profile.max_concurrent_bunkers = quota
        profile.max_cpu_millicores = profile.max_memory_mb = profile.max_disk_mb = 10**9
        await session.commit()
    user = new_id("usr")
    ask = quotas.Ask(100, 128, 64, 0, False)

    async def admit_one() -> bool:
        async with db.sessionmaker() as session:
            try:
                pairs = await quotas.admit(session, "ten_bench", user, ask, PlatformCeilings())
            except errors.BunkerQuotaExceeded:
                return False
            bunker = _bunker(user)
            session.add(bunker)
            await session.flush()
            quotas.record(session, bunker.id, pairs)
            await session.commit()
            return True

    async def insert_one() -> bool:
        async with db.sessionmaker() as session:
            session.add(_bunker(new_id("usr")))
            await session.commit()
            return True

    start = time.perf_counter()
    results = await asyncio.gather(*(admit_one() for _ in range(concurrency)))
    admit_s = time.perf_counter() - start
    start = time.perf_counter()
    await asyncio.gather(*(insert_one() for _ in range(concurrency)))
    insert_s = time.perf_counter() - start
    return admit_s, insert_s, sum(results)


async def admission_pg(rounds: int, quota: int, concurrency: int) -> dict[str, Any]:
    """Service-level admission on a throwaway PostgreSQL database."""
    name = f"scaigrid_bench_{secrets.token_hex(6)}"
    admin = create_async_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    async with admin.connect() as connection:
        await connection.execute(text(f"CREATE DATABASE {name}"))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"

    def upgrade(config: Config) -> None:
        command.upgrade(config, "heads")

    try:
        await run_alembic(url, upgrade)
        db = Database(url)
        admit, insert, admitted = [], [], []
        try:
            for _ in range(rounds):
                a, i, n = await _pg_round(db, quota, concurrency)
                admit.append(a * 1000)
                insert.append(i * 1000)
                admitted.append(n)
        finally:
            await db.dispose()
    finally:
        async with admin.connect() as connection:
            await connection.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        await admin.dispose()
    return {"admit": admit, "insert": insert, "admitted": admitted}


def _wait_all(client: httpx.Client, ids: list[str], status: str, timeout_s: float) -> float:
    start = time.monotonic()
    pending = set(ids)
    while pending and time.monotonic() - start < timeout_s:
        for bunker_id in list(pending):
            if client.get(f"{BASE}/bunkers/{bunker_id}").json()["data"]["status"] == status:
                pending.discard(bunker_id)
        time.sleep(0.1)
    if pending:
        raise RuntimeError(f"{len(pending)} bunkers not {status} after {timeout_s} s")
    return time.monotonic()


def worker_loss(stack: Stack, image: str, rounds: int, bunkers: int) -> dict[str, Any]:
    """SIGKILL a worker holding ``bunkers`` bunkers; time until all are failed (ms)."""
    data_dir = Path(tempfile.mkdtemp(prefix="scaibunker-bench-", dir="/var/tmp"))
    data_dir.chmod(0o755)
    worker = ExtraWorker(stack, data_dir)
    from_kill: list[float] = []
    from_heartbeat: list[float] = []
    terminate: list[float] = []
    try:
        with stack.client() as client:
            token = client.post(f"{BASE}/workers/join-tokens", json={}).json()["data"]["token"]
            worker.start(token)
            worker.worker_id = wait_online(client, HOSTNAME, 60)["id"]
            warm(client, image, worker.worker_id)
            others = [
                w["id"] for w in workers_by_host(client).values() if w["hostname"] != HOSTNAME
            ]
            for _ in range(rounds):
                for other in others:
                    client.post(f"{BASE}/workers/{other}/drain")
                created = [
                    client.post(
                        f"{BASE}/bunkers", params={"wait_s": 60}, json={"image": image, **SMALL}
                    ).json()["data"]
                    for _ in range(bunkers * 2)
                ]
                for other in others:
                    client.post(f"{BASE}/workers/{other}/resume")
                victims = [b["id"] for b in created[:bunkers]]
                start = time.perf_counter()
                for bunker_id in [b["id"] for b in created[bunkers:]]:
                    client.delete(f"{BASE}/bunkers/{bunker_id}")
                terminate.append(_ms(start))
                heartbeat = workers_by_host(client)[HOSTNAME]["last_heartbeat"]
                last_beat = datetime.fromisoformat(heartbeat.replace("Z", "+00:00")).timestamp()
                worker.kill()
                killed = time.monotonic()
                killed_wall = time.time()
                done = _wait_all(client, victims, "failed", 60)
                from_kill.append((done - killed) * 1000)
                from_heartbeat.append((done - killed + killed_wall - last_beat) * 1000)
                worker.start()
                wait_online(client, HOSTNAME, 60)
    finally:
        worker.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    return {"from_kill": from_kill, "from_heartbeat": from_heartbeat, "terminate": terminate}


def _row(name: str, samples: list[float], base: str, base_samples: list[float], unit: str) -> str:
    p50, p99 = percentile(samples, 50), percentile(samples, 99)
    b50, b99 = percentile(base_samples, 50), percentile(base_samples, 99)
    ratio = p50 / b50 if b50 else float("nan")
    return (
        f"| {name} | {len(samples)} | {p50:.1f} | {p99:.1f} | {base} | {b50:.1f} | {b99:.1f} "
        f"| {ratio:.2f} | {unit} |"
    )


def main() -> None:
    """Run every lifecycle benchmark and print a Markdown table for RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quota", type=int, default=20)
    parser.add_argument("--baseline", type=int, default=20)
    parser.add_argument("--pg-rounds", type=int, default=5)
    parser.add_argument("--pg-quota", type=int, default=5)
    parser.add_argument("--pg-concurrency", type=int, default=50)
    parser.add_argument("--loss-rounds", type=int, default=3)
    parser.add_argument("--loss-bunkers", type=int, default=3)
    args = parser.parse_args()

    pg = asyncio.run(admission_pg(args.pg_rounds, args.pg_quota, args.pg_concurrency))
    data_dir = Path(tempfile.mkdtemp(prefix="scaibunker-bench-stack-", dir="/var/tmp"))
    unlimited = {
        f"SCAIGRID_RATE_LIMIT_{level}_PER_MIN": "1000000"
        for level in ("KEY", "USER", "TENANT", "PARTNER")
    }
    stack = start_stack(data_dir, extra_env=unlimited)
    try:
        tar = build_busybox_tar(data_dir)
        stack.register_image("busybox", {"kind": "tar", "path": str(tar)})
        http = admission_http(stack, "busybox", args.quota, args.baseline)
        loss = worker_loss(stack, "busybox", args.loss_rounds, args.loss_bunkers)
    finally:
        stack.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(data_dir)
    row: Callable[..., str] = _row
    ms = "ms"
    validation = "create refused at validation (422)"
    terminate = f"API terminate of {args.loss_bunkers} bunkers"
    pg_name = f"{args.pg_concurrency} concurrent admit+insert, cap {args.pg_quota} (PostgreSQL)"
    pg_base = f"{args.pg_concurrency} concurrent plain inserts"
    killed = f"SIGKILL → {args.loss_bunkers} bunkers failed"
    now = time.strftime("%Y-%m-%d %H:%M")
    print(f"Machine: {platform.node()}, {platform.machine()}; run {now} UTC")
    print(f"Admitted over HTTP until 429: {len(http['admitted'])}, {http['rate']:.1f} creates/s")
    print(f"PostgreSQL: admitted per round {pg['admitted']} (cap {args.pg_quota})")
    print()
    print("| measurement | n | p50 | p99 | baseline | p50 | p99 | ratio p50 | unit |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(row("create admitted (HTTP, SQLite)", http["admitted"], validation, http["invalid"], ms))
    print(row("create refused by quota (429)", http["refused"], validation, http["invalid"], ms))
    print(row(pg_name, pg["admit"], pg_base, pg["insert"], "ms per round"))
    print(row(killed, loss["from_kill"], terminate, loss["terminate"], ms))
    print(
        row(
            "last heartbeat → bunkers failed",
            loss["from_heartbeat"],
            terminate,
            loss["terminate"],
            ms,
        )
    )


if __name__ == "__main__":
    main()

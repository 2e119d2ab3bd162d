"""Platform benchmark: authenticated request overhead (issue #3).

Measures ``GET /v1/modules/scaibunker/bunkers/{id}`` (API-key authentication, principal
cache, module-enabled check, rate limiting, a bunker read) beside ``GET /health`` (no
authentication, no database) on the same real controller (``scaigrid serve`` on 127.0.0.1,
SQLite, keep-alive HTTP/1.1 client), requests interleaved so both see the same machine load.
Run twice: with the in-process rate limiter and, when Redis answers on 127.0.0.1:6379, with
the Redis limiter. Rate limits are raised so nothing is refused; the limiter still runs.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.platform [--n 2000]
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

import httpx
import redis
from sqlalchemy import select
from tests.fixtures.stack import BASE, free_port

from benchmarks.run import percentile
from scaigrid.ids import new_id
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.platform.db import Database
from scaigrid.platform.tenancy.models import User

BIN = Path(".venv/bin").resolve()


async def _seed_bunker(database_url: str) -> str:
    """Insert one bunker row owned by the bootstrap admin; return its id."""
    db = Database(database_url)
    try:
        async with db.sessionmaker() as session:
            admin = (await session.scalars(select(User).where(User.role == "super_admin"))).one()
            bunker = Bunker(
                id=new_id("bnk"),
                tenant_id=admin.tenant_id,
                owner_user_id=admin.id,
                image_name="debian-12",
                image_id=new_id("img"),
                lifecycle_mode="ephemeral",
                network_profile="isolated",
                cpu_millicores=1000,
                memory_mb=512,
                disk_mb=1024,
                status="terminated",
                status_reason="api_terminate",
            )
            session.add(bunker)
            await session.commit()
            return bunker.id
    finally:
        await db.dispose()


def measure(n: int, redis_url: str | None) -> tuple[list[float], list[float]]:
    """Start a controller, return ``(health_ms, bunker_ms)`` samples."""
    data_dir = Path(tempfile.mkdtemp(prefix="scaigrid-bench-", dir="/var/tmp"))
    port = free_port()
    env = {
        **os.environ,
        "SCAIGRID_DATA_DIR": str(data_dir),
        "SCAIGRID_PORT": str(port),
        "SCAIGRID_LOG_LEVEL": "WARNING",
        **{
            f"SCAIGRID_RATE_LIMIT_{level}_PER_MIN": "100000000"
            for level in ("KEY", "USER", "TENANT", "PARTNER")
        },
    }
    if redis_url:
        env["SCAIGRID_REDIS_URL"] = redis_url
        env["SCAIGRID_REDIS_PREFIX"] = f"scaigrid-bench-{os.getpid()}:"
    subprocess.run([str(BIN / "scaigrid"), "migrate"], env=env, check=True, capture_output=True)
    log = (data_dir / "controller.log").open("wb")
    server = subprocess.Popen([str(BIN / "scaigrid"), "serve"], env=env, stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("controller did not start")
            time.sleep(0.2)
        key = (data_dir / "admin-api-key").read_text().strip()
        bunker_id = asyncio.run(_seed_bunker(f"sqlite+aiosqlite:///{data_dir / 'scaigrid.db'}"))
        health: list[float] = []
        read: list[float] = []
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as client:
            for _ in range(100):  # warm-up: connections, caches
                client.get("/health")
                client.get(f"{BASE}/bunkers/{bunker_id}")
            for _ in range(n):
                start = time.perf_counter()
                assert client.get("/health").status_code == 200
                health.append((time.perf_counter() - start) * 1000)
                start = time.perf_counter()
                response = client.get(f"{BASE}/bunkers/{bunker_id}")
                read.append((time.perf_counter() - start) * 1000)
                assert response.status_code == 200, response.text
        return health, read
    finally:
        server.terminate()
        server.wait(30)
        log.close()
        if redis_url:
            client = redis.Redis.from_url(redis_url)
            keys = list(client.scan_iter(match=f"scaigrid-bench-{os.getpid()}:*"))
            if keys:
                client.delete(*keys)
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="requests of each kind")
    args = parser.parse_args()
    runs: list[tuple[str, str | None]] = [("in-process limiter", None)]
    try:
        redis.Redis.from_url("redis://127.0.0.1:6379/0", socket_connect_timeout=2).ping()
        runs.append(("Redis limiter", "redis://127.0.0.1:6379/0"))
    except redis.RedisError as exc:
        print(f"Redis run skipped: {exc}")
    print(f"machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} cores")
    print("| measurement | n | p50 ms | p99 ms | baseline | p50 ms | p99 ms | overhead p50 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for label, redis_url in runs:
        health, read = measure(args.n, redis_url)
        h50, h99 = percentile(health, 50), percentile(health, 99)
        r50, r99 = percentile(read, 50), percentile(read, 99)
        print(
            f"| GET /bunkers/{{id}}, API key ({label}) | {args.n} | {r50:.2f} | {r99:.2f} "
            f"| GET /health | {h50:.2f} | {h99:.2f} | {r50 - h50:.2f} |"
        )


if __name__ == "__main__":
    main()

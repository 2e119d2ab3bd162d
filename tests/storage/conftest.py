"""Storage fixtures: moto's S3 server and `scaigrid serve` in bunker_proxy mode, each started as
its own process on 127.0.0.1 (moto is the only S3-compatible server installable here)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import httpx
import pytest

from tests.fixtures.stack import free_port

VENV_BIN = Path(sys.executable).parent
SECRET = "s" * 40
BUCKET = "scaibunker-test"


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} process exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout_s}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class S3Server:
    """A running moto S3 server."""

    endpoint: str
    process: subprocess.Popen[bytes]

    def client(self):  # type: ignore[no-untyped-def]
        """A boto3 client on the server (the test's own view of the bucket)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )

    def env(self, bucket: str = BUCKET) -> dict[str, str]:
        """The ``SCAIBUNKER_S3_*`` variables pointing at this server, 5 MiB parts."""
        return {
            "SCAIBUNKER_STORAGE_BACKEND": "s3",
            "SCAIBUNKER_S3_ENDPOINT": self.endpoint,
            "SCAIBUNKER_S3_BUCKET": bucket,
            "SCAIBUNKER_S3_ACCESS_KEY_ID": "test",
            "SCAIBUNKER_S3_SECRET_ACCESS_KEY": "test",
            "SCAIBUNKER_S3_PART_SIZE_BYTES": str(5 * 1024 * 1024),
            "SCAIBUNKER_S3_TIMEOUT_S": "5",
        }


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto_server as its own process on a free 127.0.0.1 port."""
    port = free_port()
    proc = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_http(endpoint, proc)
        yield S3Server(endpoint, proc)
    finally:
        _stop(proc)


@dataclass
class Proxy:
    """A running standalone storage proxy."""

    url: str
    process: subprocess.Popen[bytes]

    @property
    def objects(self) -> str:
        """Base URL of the object routes."""
        return f"{self.url}/v1/modules/scaibunker/storage/objects"


def start_proxy(env_extra: dict[str, str], data_dir: Path, port: int | None = None) -> Proxy:
    """Start ``scaigrid serve`` with ``SCAIGRID_MODE=bunker_proxy`` (no database, no Redis) on
    ``port`` (default: a free one)."""
    port = port or free_port()
    env = {
        **os.environ,
        "SCAIGRID_MODE": "bunker_proxy",
        "SCAIGRID_PORT": str(port),
        "SCAIGRID_DATA_DIR": str(data_dir),
        "SCAIGRID_DATABASE_URL": "postgresql+asyncpg://nobody@127.0.0.1:1/none",
        "SCAIGRID_LOG_LEVEL": "WARNING",
        "SCAIBUNKER_STORAGE_CAPABILITY_SECRET": SECRET,
        **env_extra,
    }
    env.pop("SCAIGRID_REDIS_URL", None)
    log = (data_dir / f"proxy-{port}.log").open("wb")
    proc = subprocess.Popen(
        [str(VENV_BIN / "scaigrid"), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    _wait_http(f"{url}/health", proc)
    return Proxy(url, proc)


@pytest.fixture(scope="session")
def proxies(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Proxy]]:
    """Two interchangeable proxies on the same S3 bucket."""
    data_dir = tmp_path_factory.mktemp("proxy")
    started: list[Proxy] = []
    try:
        for _ in range(2):
            started.append(start_proxy(s3_server.env(), data_dir))
        yield started
    finally:
        for proxy in started:
            _stop(proxy.process)


@pytest.fixture
def secret_key() -> str:
    """A random object-key suffix so tests never collide."""
    return secrets.token_hex(8)

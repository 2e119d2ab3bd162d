"""The real thing: ``scaigrid serve`` as a process on a loopback port, the admin CLI
walkthrough (second tenant, tenant user, key), and WebSockets through the middleware stack
under uvicorn."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import WebSocket
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from scaigrid.platform.app import create_app
from scaigrid.platform.auth import CurrentPrincipal
from scaigrid.settings import Settings

START_TIMEOUT_S = 30
SCAIGRID = str(Path(sys.executable).parent / "scaigrid")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCAIGRID_")}
    # The walkthrough revokes a key from another process (the CLI): no principal cache, so
    # the revocation is visible to the very next request.
    return {
        **env,
        "SCAIGRID_DATA_DIR": str(data_dir),
        "SCAIGRID_LOG_LEVEL": "INFO",
        "SCAIGRID_AUTH_CACHE_TTL_S": "0",
    }


def _cli(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [SCAIGRID, *args], env=env, check=True, capture_output=True, text=True, timeout=60
    )
    return result.stdout.strip()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, dict[str, str], subprocess.Popen[bytes]]]:
    """``scaigrid serve --port P`` in its own process; yields (base URL, env, process)."""
    env = _env(tmp_path / "data")
    port = _free_port()
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [SCAIGRID, "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "scaigrid serve did not answer /health"
            time.sleep(0.1)
        yield url, env, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)
        log.close()


def test_serve_answers_over_real_http_and_stops_on_sigterm(
    served: tuple[str, dict[str, str], subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    url, env, process = served
    key_file = Path(env["SCAIGRID_DATA_DIR"]) / "admin-api-key"
    key = key_file.read_text().strip()
    with httpx.Client(base_url=url, timeout=10) as client:
        health = client.get("/health")
        assert health.json()["data"]["status"] == "healthy"
        assert health.headers["x-request-id"].startswith("req_")
        assert "scaigrid_http_requests_total" in client.get("/metrics").text
        assert client.get("/v1/modules").json()["error"]["code"] == "AUTH_TOKEN_MISSING"
        modules = client.get("/v1/modules", headers={"Authorization": f"Bearer {key}"})
        assert modules.status_code == 200 and modules.json()["status"] == "ok"
    process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert process.wait(timeout=20) in (0, -signal.SIGTERM)
    log = (tmp_path / "serve.log").read_text()
    assert '"event": "app.stopped"' in log
    assert key not in log
    assert str(key_file) in log


def test_admin_cli_walkthrough_second_tenant_and_user(
    served: tuple[str, dict[str, str], subprocess.Popen[bytes]],
) -> None:
    url, env, _ = served
    tenant_id = _cli(env, "admin", "create-tenant", "--name", "Other Co")
    assert tenant_id.startswith("ten_")
    user_id = _cli(env, "admin", "create-user", "--tenant", "other-co", "--email", "eve@other.test")
    assert user_id.startswith("usr_")
    key = _cli(env, "admin", "create-key", "--user", "eve@other.test", "--tenant", tenant_id)
    assert key.startswith("sgk_") and len(key) >= 36
    duplicate = subprocess.run(
        [SCAIGRID, "admin", "create-tenant", "--name", "x", "--slug", "other-co"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert duplicate.returncode != 0 and "SLUG_CONFLICT" in duplicate.stderr

    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{url}/v1/modules", headers=headers, timeout=10).status_code == 200
    assert _cli(env, "admin", "revoke-key", key).startswith("key_")
    revoked = httpx.get(f"{url}/v1/modules", headers=headers, timeout=10)
    assert revoked.json()["error"]["code"] == "AUTH_TOKEN_INVALID"


async def test_websocket_routes_work_through_the_middleware_under_uvicorn(
    settings_for: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = settings_for(tmp_path)
    app = create_app(settings)

    async def echo(websocket: WebSocket, principal: CurrentPrincipal) -> None:
        await websocket.accept()
        text = await websocket.receive_text()
        await websocket.send_text(f"{websocket.state.request_id}:{principal.role}:{text}")
        await websocket.close()

    app.add_api_websocket_route("/test/ws", echo)
    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.05)
        assert server.started
        url = f"ws://127.0.0.1:{port}/test/ws"
        # Refused upgrades answer with the HTTP error envelope.
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url):
                pass
        assert refused.value.response.status_code == 401
        body = json.loads(refused.value.response.body or b"{}")
        assert body["error"]["code"] == "AUTH_TOKEN_MISSING"

        key = settings.admin_key_file.read_text().strip()
        async with connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            await ws.send("ping")
            reply = await asyncio.wait_for(ws.recv(), 10)
        request_id, role, echoed = str(reply).split(":")
        assert request_id.startswith("req_") and (role, echoed) == ("super_admin", "ping")
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)

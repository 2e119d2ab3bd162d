"""End to end: a real controller over HTTP, a real worker process, real bunkers.

Covers the walking skeleton's "done when" and its bad-input and fault list (issue #2).
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import create_bunker
from tests.fixtures.stack import BASE, Stack

pytestmark = pytest.mark.e2e


def _exec(client: httpx.Client, bunker_id: str, command: Any, **fields: Any) -> dict[str, Any]:
    response = client.post(f"{BASE}/bunkers/{bunker_id}/exec", json={"command": command, **fields})
    assert response.status_code == 200, response.text
    return dict(response.json()["data"])


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert body["status"] == "error"
    assert body["meta"]["request_id"].startswith("req_")
    return dict(body["error"])


@pytest.fixture(scope="module")
def debian_bunker(stack: Stack, debian_image: str) -> Any:
    bunker = create_bunker(stack, debian_image, memory_mb=256, disk_mb=256)
    yield bunker
    with stack.client() as client:
        client.delete(f"{BASE}/bunkers/{bunker['id']}")


def test_quickstart_create_exec_files_terminate(stack: Stack, debian_image: str) -> None:
    bunker = create_bunker(stack, debian_image, name="quickstart", label_set={"suite": "e2e"})
    assert bunker["id"].startswith("bnk_")
    assert bunker["driver"] == "container" and bunker["isolation"] == "container"
    payload = os.urandom(300_000) + "héllo\n".encode()
    with stack.client() as client:
        result = _exec(client, bunker["id"], "python3 -c 'print(6*7)'")
        assert (result["status"], result["exit_code"], result["stdout"]) == ("exited", 0, "42\n")
        upload = client.put(
            f"{BASE}/bunkers/{bunker['id']}/files",
            params={"path": "data/blob.bin"},
            content=payload,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert upload.status_code == 200, upload.text
        assert upload.json()["data"]["sha256"] == hashlib.sha256(payload).hexdigest()
        assert upload.json()["data"]["path"] == "/home/user/data/blob.bin"
        download = client.get(
            f"{BASE}/bunkers/{bunker['id']}/files", params={"path": "data/blob.bin"}
        )
        assert download.status_code == 200 and download.content == payload
        listing = client.get(f"{BASE}/bunkers/{bunker['id']}/files/list", params={"path": "data"})
        assert [e["name"] for e in listing.json()["data"]] == ["blob.bin"]
        assert listing.json()["data"][0]["size"] == len(payload)
        deleted = client.delete(
            f"{BASE}/bunkers/{bunker['id']}/files", params={"path": "data/blob.bin"}
        )
        assert deleted.json()["data"] == {"path": "/home/user/data/blob.bin", "deleted": True}
        gone = client.get(f"{BASE}/bunkers/{bunker['id']}/files", params={"path": "data/blob.bin"})
        assert gone.status_code == 404 and _error(gone)["code"] == "FILE_NOT_FOUND"
        ended = client.delete(f"{BASE}/bunkers/{bunker['id']}")
        assert ended.json()["data"]["status"] == "terminated"
        record = client.get(f"{BASE}/bunkers/{bunker['id']}").json()["data"]
        assert [(h["from"], h["to"]) for h in record["status_history"]] == [
            (None, "pending"),
            ("pending", "provisioning"),
            ("provisioning", "running"),
            ("running", "stopping"),
            ("stopping", "terminated"),
        ]
        late = client.post(f"{BASE}/bunkers/{bunker['id']}/exec", json={"command": "true"})
        assert late.status_code == 409 and _error(late)["code"] == "BUNKER_NOT_RUNNING"


def test_agent_runs_in_an_image_without_python(stack: Stack, busybox_image: str) -> None:
    bunker = create_bunker(stack, busybox_image)
    with stack.client() as client:
        result = _exec(client, bunker["id"], ["sh", "-c", "ls /usr/bin/python3 || echo no-python"])
        assert "no-python" in result["stdout"]
        assert _exec(client, bunker["id"], "id -u")["stdout"] == "1000\n"
        client.delete(f"{BASE}/bunkers/{bunker['id']}")


def test_unknown_image_is_404(stack: Stack) -> None:
    with stack.client() as client:
        response = client.post(f"{BASE}/bunkers", json={"image": "no-such-image"})
    assert response.status_code == 404 and _error(response)["code"] == "IMAGE_NOT_FOUND"


def test_malformed_body_is_422_with_field_details(stack: Stack) -> None:
    with stack.client() as client:
        response = client.post(f"{BASE}/bunkers", json={"image": "debian-12", "cpu_millicores": 5})
    error = _error(response)
    assert response.status_code == 422 and error["code"] == "VALIDATION_ERROR"
    assert [d["field"] for d in error["details"]] == ["cpu_millicores"]


def test_missing_and_wrong_tokens_are_401(stack: Stack) -> None:
    missing = httpx.get(f"{stack.url}{BASE}/bunkers")
    assert missing.status_code == 401 and _error(missing)["code"] == "AUTH_TOKEN_MISSING"
    wrong = httpx.get(
        f"{stack.url}{BASE}/bunkers", headers={"Authorization": "Bearer sgk_" + "x" * 40}
    )
    assert wrong.status_code == 401 and _error(wrong)["code"] == "AUTH_TOKEN_INVALID"


def test_other_tenants_bunker_is_404(stack: Stack, debian_bunker: dict[str, Any]) -> None:
    scaigrid = str(Path(sys.executable).parent / "scaigrid")
    tenant = (
        subprocess.run(
            [scaigrid, "admin", "create-tenant", "--name", "other"],
            env=stack.env,
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .split()[-1]
    )
    subprocess.run(
        [
            scaigrid,
            "admin",
            "create-user",
            "--tenant",
            tenant,
            "--email",
            "eve@other.test",
            "--role",
            "tenant_admin",
        ],
        env=stack.env,
        check=True,
        capture_output=True,
        text=True,
    )
    key = (
        subprocess.run(
            [scaigrid, "admin", "create-key", "--user", "eve@other.test"],
            env=stack.env,
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .split()[-1]
    )
    with stack.client(key) as client:
        for response in (
            client.get(f"{BASE}/bunkers/{debian_bunker['id']}"),
            client.post(f"{BASE}/bunkers/{debian_bunker['id']}/exec", json={"command": "true"}),
            client.get(
                f"{BASE}/bunkers/{debian_bunker['id']}/files", params={"path": "/etc/hostname"}
            ),
            client.delete(f"{BASE}/bunkers/{debian_bunker['id']}"),
        ):
            assert response.status_code == 404 and _error(response)["code"] == "BUNKER_NOT_FOUND"
        assert client.get(f"{BASE}/bunkers").json()["data"] == []


def test_missing_file_is_404(stack: Stack, debian_bunker: dict[str, Any]) -> None:
    with stack.client() as client:
        response = client.get(
            f"{BASE}/bunkers/{debian_bunker['id']}/files", params={"path": "/nope/nothing"}
        )
    assert response.status_code == 404 and _error(response)["code"] == "FILE_NOT_FOUND"


def test_timeout_kills_every_process_of_the_command(
    stack: Stack, debian_bunker: dict[str, Any]
) -> None:
    with stack.client() as client:
        result = _exec(
            client,
            debian_bunker["id"],
            "sleep 300 & (sleep 301 &) ; nohup sleep 302 >/dev/null 2>&1 & sleep 303",
            timeout_s=2,
        )
        assert (result["status"], result["exit_code"], result["signal"]) == (
            "timed_out",
            None,
            "SIGKILL",
        )
        assert 1500 <= result["duration_ms"] < 10_000
        left = _exec(client, debian_bunker["id"], "ps -eo args | grep -c '^sleep 30' || true")
        assert left["stdout"].strip() == "0"


def test_memory_bomb_is_oom_killed_and_bunker_survives(stack: Stack, debian_image: str) -> None:
    bunker = create_bunker(stack, debian_image, memory_mb=128)
    with stack.client() as client:
        result = _exec(
            client,
            bunker["id"],
            ["python3", "-c", "b = []\nwhile True: b.append(bytearray(1 << 24))"],
            timeout_s=60,
        )
        assert result["status"] == "oom_killed" and result["signal"] == "SIGKILL"
        assert _exec(client, bunker["id"], "echo alive")["stdout"] == "alive\n"
        client.delete(f"{BASE}/bunkers/{bunker['id']}")


def test_fork_bomb_stops_at_the_pids_limit(stack: Stack, busybox_image: str) -> None:
    bunker = create_bunker(stack, busybox_image)
    with stack.client() as client:
        result = _exec(
            client, bunker["id"], "bomb() { bomb | bomb & }; bomb; sleep 3; echo done", timeout_s=10
        )
        assert result["status"] in ("exited", "timed_out")
        assert subprocess.run(["true"], check=False).returncode == 0
        time.sleep(1)
        assert _exec(client, bunker["id"], "echo alive", timeout_s=30)["stdout"] == "alive\n"
        client.delete(f"{BASE}/bunkers/{bunker['id']}")


def test_paths_and_symlinks_stay_inside_the_bunker(
    stack: Stack, debian_bunker: dict[str, Any]
) -> None:
    bunker_id = debian_bunker["id"]
    marker = f"host-only-{os.getpid()}"
    host_file = Path("/tmp") / marker
    host_file.write_text("host secret")
    try:
        with stack.client() as client:
            _exec(
                client,
                bunker_id,
                f"ln -sf /tmp/{marker} escape; ln -sf /proc/1/root/tmp proc-escape; "
                "ln -sf /.. dotdot",
            )
            for path in (
                f"../../../../tmp/{marker}",
                "escape",
                f"proc-escape/{marker}",
                f"dotdot/tmp/{marker}",
            ):
                response = client.get(f"{BASE}/bunkers/{bunker_id}/files", params={"path": path})
                assert response.status_code in (403, 404), (path, response.text)
                assert response.content != b"host secret"
            write = client.put(
                f"{BASE}/bunkers/{bunker_id}/files", params={"path": "escape"}, content=b"inside"
            )
            assert write.status_code == 200
            assert host_file.read_text() == "host secret"
            inside = client.get(
                f"{BASE}/bunkers/{bunker_id}/files", params={"path": f"/tmp/{marker}"}
            )
            assert inside.content == b"inside"
    finally:
        host_file.unlink()


def test_binary_and_non_utf8_output_survive(stack: Stack, debian_bunker: dict[str, Any]) -> None:
    with stack.client() as client:
        raw = _exec(
            client,
            debian_bunker["id"],
            r"printf 'a\377\000b\n'; printf 'e\376' >&2",
            encoding="base64",
        )
        assert base64.b64decode(raw["stdout"]) == b"a\xff\x00b\n"
        assert base64.b64decode(raw["stderr"]) == b"e\xfe"
        text = _exec(client, debian_bunker["id"], r"printf 'ok\377'")
        assert text["stdout"] == "ok\ufffd"


def test_ten_concurrent_execs_all_return(stack: Stack, debian_bunker: dict[str, Any]) -> None:
    def run(i: int) -> str:
        with stack.client() as client:
            return str(_exec(client, debian_bunker["id"], f"sleep 0.5; echo {i}")["stdout"])

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        outputs = list(pool.map(run, range(10)))
    assert outputs == [f"{i}\n" for i in range(10)]


def test_cli_create_exec_cp_ls_rm_terminate(
    stack: Stack, busybox_image: str, tmp_path: Path
) -> None:
    cli = str(Path(sys.executable).parent / "scaibunker")
    env = {**stack.env, "SCAIGRID_HOST": stack.url, "SCAIGRID_API_KEY": stack.admin_key}

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [cli, *args], env=env, capture_output=True, text=True, check=check, timeout=120
        )

    bunker_id = run("create", "--image", busybox_image).stdout.strip()
    assert bunker_id.startswith("bnk_")
    assert bunker_id in run("list").stdout
    assert run("exec", bunker_id, "--", "echo", "hello").stdout == "hello\n"
    assert run("exec", bunker_id, "--", "sh", "-c", "exit 3", check=False).returncode == 3
    source = tmp_path / "in.bin"
    source.write_bytes(os.urandom(100_000))
    run("cp", str(source), f"{bunker_id}:in.bin")
    assert "in.bin" in run("ls", bunker_id).stdout
    run("cp", f"{bunker_id}:in.bin", str(tmp_path / "out.bin"))
    assert (tmp_path / "out.bin").read_bytes() == source.read_bytes()
    run("rm", bunker_id, "in.bin")
    assert "in.bin" not in run("ls", bunker_id).stdout
    run("terminate", bunker_id)
    assert "terminated" in run("get", bunker_id, "--json").stdout

"""The interactive shell end to end (SPEC §5): a real controller, worker and bunker, the
SDK's shell sessions, raw WebSocket clients for the protocol's edges, and the
``scaibunker shell`` CLI driven through a real pseudo-terminal."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pytest
import websockets.exceptions as ws_errors
import websockets.sync.client as ws_sync

from scaigrid.client import AsyncClient, Client
from scaigrid.client.errors import ScaiGridAPIError
from tests.e2e.conftest import create_bunker
from tests.fixtures.stack import BASE, Stack

SMALL = {"memory_mb": 128, "cpu_millicores": 250}


@pytest.fixture(scope="module")
def bunker(stack: Stack, busybox_image: str) -> Any:
    created = create_bunker(stack, busybox_image, **SMALL)
    yield created
    with stack.client() as admin:
        admin.delete(f"{BASE}/bunkers/{created['id']}")


@pytest.fixture
def client(stack: Stack) -> Any:
    with Client(stack.url, stack.admin_key) as sdk:
        yield sdk


def _ws_url(stack: Stack, bunker_id: str, query: str = "") -> str:
    return f"{stack.url.replace('http://', 'ws://')}{BASE}/bunkers/{bunker_id}/shell{query}"


def _tenant_user_key(stack: Stack, name: str, permissions: list[str]) -> str:
    with stack.client() as admin:
        tenant = admin.post("/v1/tenants", json={"name": name}).json()["data"]
        user = admin.post(
            "/v1/users", json={"email": f"dev@{name}.test", "tenant_id": tenant["id"]}
        ).json()["data"]
        key = admin.post("/v1/api-keys", json={"name": "k", "user_id": user["id"]}).json()["data"]
        response = admin.put(
            f"/v1/users/{user['id']}/module-permissions", json={"permissions": permissions}
        )
        assert response.status_code == 200, response.text
    return str(key["key"])


def test_terminal_echo_env_resize_and_exit_code(client: Client, bunker: dict[str, Any]) -> None:
    with client.shell(bunker["id"], cols=100, rows=30) as shell:
        assert shell.session_id is not None and shell.session_id.startswith("shs_")
        assert shell.replayed_bytes == 0
        shell.send(b"echo T=$TERM L=$LANG U=$(id -u) D=$(pwd); stty size\n")
        out = shell.read_until(b"30 100")
        assert b"T=xterm-256color L=C.UTF-8 U=1000 D=/home/user" in out
        shell.resize(132, 43)
        time.sleep(0.3)
        shell.send(b"stty size\n")
        shell.read_until(b"43 132")
        shell.send(b"exit 7\n")
        assert shell.wait(30) == 7
        assert shell.closed


def test_split_utf8_arrives_intact(client: Client, bunker: dict[str, Any]) -> None:
    count = 20000
    with client.shell(bunker["id"]) as shell:
        shell.send(
            b"stty -onlcr; printf BEGIN; i=0; while [ $i -lt %d ]; do "
            b"printf '\\303\\251\\342\\202\\254\\360\\237\\230\\200'; i=$((i+1)); done; "
            b"printf 'END\\n'; exit\n" % count
        )
        out = bytearray()
        chunks = 0
        while (chunk := shell.recv(60)) is not None:
            out += chunk
            chunks += 1
        assert shell.exit_code == 0
    body = bytes(out[out.rindex(b"BEGIN") + 5 : out.rindex(b"END")])
    assert body.decode("utf-8") == "é€😀" * count
    assert chunks > 1  # it really crossed chunk boundaries


def test_ctrl_c_and_signal_frames_interrupt_the_foreground_job(
    client: Client, bunker: dict[str, Any]
) -> None:
    with client.shell(bunker["id"]) as shell:
        shell.send(b"sleep 60\n")
        time.sleep(0.5)
        shell.send(b"\x03")
        shell.send(b"echo ctrl-c-$?\n")
        shell.read_until(b"ctrl-c-130")
        shell.send(b"sleep 60\n")
        time.sleep(0.5)
        shell.signal("SIGINT")
        shell.send(b"echo frame-$?\n")
        shell.read_until(b"frame-130")
        shell.send(b"exit\n")
        assert shell.wait(30) == 0


def test_reconnect_replays_missed_output_and_newer_attach_takes_over(
    stack: Stack, client: Client, bunker: dict[str, Any]
) -> None:
    shell = client.shell(bunker["id"])
    shell.send(b"echo before-$((1+1))\n")
    shell.read_until(b"before-2\r\n")
    shell.send(b"sleep 1; echo during-$((2+2))\n")
    shell.read_until(b"sleep 1")
    shell.abort()  # the connection drops; the session lives on
    time.sleep(2.5)
    shell.reconnect(cols=90, rows=20)
    assert shell.replayed_bytes > 0
    replayed = shell.read_until(b"during-4\r\n")
    assert b"before-2" not in replayed
    # A second attach takes the session over; the first connection is closed with 1000.
    with client.shell(bunker["id"], session=shell.session_id) as second:
        for _ in range(100):  # whatever was in flight, then the close
            if shell.recv(10) is None:
                break
        assert shell.closed
        second.send(b"stty size; exit 4\n")
        assert b"20 90" in second.read_until(b"20 90")
        assert second.wait(30) == 4
    with pytest.raises(ScaiGridAPIError) as info:
        client.shell(bunker["id"], session=shell.session_id)
    assert info.value.code == "SHELL_SESSION_NOT_FOUND" and info.value.status_code == 404
    with stack.client() as admin:
        records = admin.get(
            "/v1/audit-log", params={"action": "scaibunker.shell.open", "limit": 1000}
        ).json()["data"]
    opened = [r for r in records if r["resource_id"] == bunker["id"]]
    assert len(opened) >= 3 and {r["action"] for r in opened} == {"scaibunker.shell.open"}


def test_grace_period_ends_the_session(stack: Stack, client: Client, busybox_image: str) -> None:
    with stack.client() as admin:
        response = admin.put(
            "/v1/modules/scaibunker/config", json={"shell": {"reconnect_grace_s": 1}}
        )
        assert response.status_code == 200, response.text
    bunker = create_bunker(stack, busybox_image, **SMALL)
    try:
        shell = client.shell(bunker["id"])
        shell.send(b"echo up-$((1+2)); sleep 1000\n")
        shell.read_until(b"up-3")
        running = client.bunkers.exec(bunker["id"], "ps | grep -c '[s]leep 1000'")
        assert running.stdout.strip() == b"1"
        shell.abort()
        time.sleep(3)
        with pytest.raises(ScaiGridAPIError) as info:
            shell.reconnect()
        assert info.value.code == "SHELL_SESSION_NOT_FOUND"
        # The hang-up reached the foreground job too.
        left = client.bunkers.exec(bunker["id"], "ps | grep -c '[s]leep 1000'")
        assert left.stdout.strip() == b"0", left
    finally:
        with stack.client() as admin:
            admin.put("/v1/modules/scaibunker/config", json={"shell": None})
            admin.delete(f"{BASE}/bunkers/{bunker['id']}")


def test_ticket_is_one_use_and_bound_to_the_bunker(
    stack: Stack, client: Client, bunker: dict[str, Any]
) -> None:
    ticket = client.shell_ticket(bunker["id"])["ticket"]
    with client.shell(bunker["id"], ticket=ticket) as shell:
        shell.send(b"echo by-$((3+3))-ticket; exit\n")
        shell.read_until(b"by-6-ticket")
        assert shell.wait(30) == 0
    for query in (f"?ticket={ticket}", "?ticket=sbt_forged"):
        with pytest.raises(ws_errors.InvalidStatus) as refused:
            ws_sync.connect(_ws_url(stack, bunker["id"], query))
        assert refused.value.response.status_code == 401
        body = json.loads(refused.value.response.body or b"{}")
        assert body["status"] == "error" and body["error"]["code"] == "AUTH_TOKEN_INVALID"
    other = create_bunker(stack, "busybox", **SMALL)
    ticket = client.shell_ticket(other["id"])["ticket"]
    client.bunkers.terminate(other["id"])
    with pytest.raises(ScaiGridAPIError) as info:
        client.shell(bunker["id"], ticket=ticket)  # minted for another bunker
    assert info.value.code == "AUTH_TOKEN_INVALID"


def test_permissions_are_checked_before_the_upgrade(stack: Stack, bunker: dict[str, Any]) -> None:
    with pytest.raises(ws_errors.InvalidStatus) as missing:
        ws_sync.connect(_ws_url(stack, bunker["id"]))
    assert missing.value.response.status_code == 401
    body = json.loads(missing.value.response.body or b"{}")
    assert body["error"]["code"] == "AUTH_TOKEN_MISSING"
    no_shell = _tenant_user_key(stack, "noshell", ["scaibunker:create", "scaibunker:execute"])
    with Client(stack.url, no_shell) as sdk:
        with pytest.raises(ScaiGridAPIError) as denied:
            sdk.shell(bunker["id"])
        assert denied.value.code == "AUTHZ_PERMISSION_DENIED" and denied.value.status_code == 403
        with pytest.raises(ScaiGridAPIError) as ticket:
            sdk.shell_ticket(bunker["id"])
        assert ticket.value.code == "AUTHZ_PERMISSION_DENIED"
    stranger = _tenant_user_key(stack, "stranger", ["scaibunker:create", "scaibunker:shell"])
    with Client(stack.url, stranger) as sdk:
        # Not the caller's bunker: its existence is not disclosed.
        with pytest.raises(ScaiGridAPIError) as hidden:
            sdk.shell(bunker["id"])
        assert hidden.value.code == "BUNKER_NOT_FOUND"
        with pytest.raises(ScaiGridAPIError) as hidden_ticket:
            sdk.shell_ticket(bunker["id"])
        assert hidden_ticket.value.code == "BUNKER_NOT_FOUND"
        with pytest.raises(ScaiGridAPIError) as root:
            sdk.shell(bunker["id"], user="root")
        assert root.value.code == "AUTHZ_PERMISSION_DENIED"
    with Client(stack.url, stack.admin_key) as sdk:
        with pytest.raises(ScaiGridAPIError) as bad:
            sdk.shell(bunker["id"], cols=0)
        assert bad.value.code == "VALIDATION_ERROR" and bad.value.status_code == 422
        with pytest.raises(ScaiGridAPIError) as unknown:
            sdk.shell("bnk_00000000000000000000000000")
        assert unknown.value.code == "BUNKER_NOT_FOUND"


def test_bad_text_frames_get_an_error_frame_and_the_session_goes_on(
    stack: Stack, bunker: dict[str, Any]
) -> None:
    headers = {"Authorization": f"Bearer {stack.admin_key}"}
    with ws_sync.connect(_ws_url(stack, bunker["id"]), additional_headers=headers) as ws:
        first = json.loads(ws.recv(timeout=30))
        assert first["type"] == "session" and first["replayed_bytes"] == 0
        for bad in (
            "not json",
            "[1, 2]",
            '{"type": "resize", "cols": 0, "rows": 5}',
            '{"type": "warp"}',
            '{"type": "signal", "signal": "SIGNOPE"}',
        ):
            ws.send(bad)
            while True:
                frame = ws.recv(timeout=30)
                if isinstance(frame, str):
                    break
            error = json.loads(frame)
            assert error["type"] == "error" and error["code"] == "VALIDATION_ERROR", error
        ws.send(b"echo still-$((5+5))-alive; exit 9\n")
        seen = b""
        frames: list[Any] = []
        while True:
            try:
                frame = ws.recv(timeout=30)
            except ws_errors.ConnectionClosedOK as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 1000
                break
            frames.append(frame)
            if isinstance(frame, bytes):
                seen += frame
        assert b"still-10-alive" in seen
        assert json.loads(frames[-1]) == {"type": "exit", "exit_code": 9, "signal": None}


def test_idle_paused_bunker_resumes_for_a_shell(
    stack: Stack, client: Client, busybox_image: str
) -> None:
    bunker = create_bunker(stack, "busybox", lifecycle_mode="session", idle_timeout_s=1, **SMALL)
    deadline = time.monotonic() + 60
    while client.bunkers.get(bunker["id"]).status != "paused":
        assert time.monotonic() < deadline, "the idle bunker was never paused"
        time.sleep(0.5)
    with client.shell(bunker["id"]) as shell:
        shell.send(b"echo resumed-$((4*4))\n")
        shell.read_until(b"resumed-16")
        # A connected shell is activity: the 1 s idle timer does not pause the bunker.
        time.sleep(5)
        assert client.bunkers.get(bunker["id"]).status == "running"
        shell.send(b"echo still-$((5*5)); exit\n")
        shell.read_until(b"still-25", timeout_s=10)
        assert shell.wait(30) == 0
    assert client.bunkers.get(bunker["id"]).status == "running"
    client.bunkers.terminate(bunker["id"])


def _read_pty(fd: int, needle: bytes, timeout_s: float = 30.0) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout_s
    while needle not in out:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{needle!r} not seen in {out[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            out += data
    return out


def test_cli_shell_through_a_real_terminal(stack: Stack, bunker: dict[str, Any]) -> None:
    cli = str(Path(sys.executable).parent / "scaibunker")
    pid, master = pty.fork()
    if pid == 0:  # pragma: no cover - the child becomes the CLI
        os.execv(
            cli,
            [cli, "--host", stack.url, "--api-key", stack.admin_key, "shell", bunker["id"]],
        )
    try:
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
        os.write(master, b"stty size\r")
        _read_pty(master, b"33 111")
        # Raw mode locally: Ctrl-C travels to the remote foreground job, not the CLI.
        os.write(master, b"sleep 60\r")
        time.sleep(0.5)
        os.write(master, b"\x03")
        os.write(master, b"echo int-$?\r")
        _read_pty(master, b"int-130")
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 21, 77, 0, 0))
        time.sleep(0.5)  # SIGWINCH → resize frame
        os.write(master, b"stty size\r")
        _read_pty(master, b"21 77")
        os.write(master, b"exit 6\r")
        _read_pty(master, b"exit 6", timeout_s=10)
        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            assert time.monotonic() < deadline, "the CLI did not exit"
            with_data, _, _ = select.select([master], [], [], 0.2)
            if with_data:
                with contextlib.suppress(OSError):
                    os.read(master, 65536)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 6
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(master)


def test_terminated_bunker_closes_the_shell_with_1011(
    stack: Stack, client: Client, busybox_image: str
) -> None:
    bunker = create_bunker(stack, busybox_image, **SMALL)
    shell = client.shell(bunker["id"])
    shell.send(b"echo up-$((2+5))\n")
    shell.read_until(b"up-7")
    client.bunkers.terminate(bunker["id"])
    with pytest.raises(ScaiGridAPIError) as lost:
        while shell.recv(60) is not None:
            pass
    assert lost.value.code == "AGENT_UNAVAILABLE"
    with pytest.raises(ScaiGridAPIError) as gone:
        client.shell(bunker["id"])
    assert gone.value.code in ("BUNKER_NOT_RUNNING", "BUNKER_NOT_FOUND")


def test_cli_shell_with_piped_stdin_exits_with_the_remote_status(
    stack: Stack, bunker: dict[str, Any]
) -> None:
    cli = str(Path(sys.executable).parent / "scaibunker")
    done = subprocess.run(
        [cli, "--host", stack.url, "--api-key", stack.admin_key, "shell", bunker["id"]],
        input=b"echo piped-$((6*7))\nexit 12\n",
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 12, done.stderr
    assert b"piped-42" in done.stdout


async def test_async_client_shell(stack: Stack, bunker: dict[str, Any]) -> None:
    async with AsyncClient(stack.url, stack.admin_key) as sdk:
        shell = await sdk.shell(bunker["id"], cols=70, rows=10)
        async with shell:
            await shell.send("stty size; echo async-$((8*8))\n")
            out = await shell.read_until(b"async-64")
            assert b"10 70" in out
            await shell.signal("SIGINT")
            await shell.send(b"exit 2\n")
            assert await shell.wait() == 2


def test_a_client_that_stops_reading_never_blocks_the_shell(
    client: Client, bunker: dict[str, Any]
) -> None:
    total = 32 << 20
    with client.shell(bunker["id"]) as shell:
        shell.send(
            b"stty -onlcr; head -c %d /dev/zero | tr '\\0' a; echo; echo flood-$((3*3))\n" % total
        )
        time.sleep(8)  # read nothing while the shell writes 32 MiB
        shell.send(b"echo after-$((4+4))\n")
        out = shell.read_until(b"after-8", timeout_s=120)
        assert b"flood-9" in out
        # The agent's replay buffer (1 MiB) absorbed what the stalled client could not take:
        # the shell finished, some output was dropped, the rest arrived in order.
        assert len(out) < total
        shell.send(b"exit\n")
        assert shell.wait(30) == 0

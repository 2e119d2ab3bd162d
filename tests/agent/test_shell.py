"""PTY shell sessions through the real agent (SPEC §5): terminal, resize, signals, exit,
detach and replay, grace expiry."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from scaigrid.protocol.agent import AgentClient, AgentError, AgentResponse


class Attached:
    """One ``POST /v1/shell`` stream: input queue in, output collected."""

    def __init__(self, response: AgentResponse, inputs: asyncio.Queue[bytes | None]) -> None:
        self.response = response
        self.inputs = inputs
        self.start = json.loads(response.headers["x-start"])
        self.output = bytearray()
        self.gaps: list[dict[str, Any]] = []
        self._events = response.exec_events()

    async def send(self, data: bytes) -> None:
        await self.inputs.put(data)

    async def read_until(self, needle: bytes, timeout_s: float = 10.0) -> bytes:
        async with asyncio.timeout(timeout_s):
            while needle not in self.output:
                kind, data = await anext(self._events)
                if kind == "gap":
                    self.gaps.append(json.loads(data))
                else:
                    self.output += data
        return bytes(self.output)

    async def result(self, timeout_s: float = 10.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            async for kind, data in self._events:
                if kind != "gap":
                    self.output += data
            trailers = await self.response.trailers()
        value: dict[str, Any] = json.loads(trailers["x-result"])
        return value

    async def detach(self) -> None:
        await self.response.aclose()


async def attach(client: AgentClient, **args: Any) -> Attached:
    inputs: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def body() -> AsyncIterator[bytes]:
        while (chunk := await inputs.get()) is not None:
            yield chunk

    args.setdefault("owner", "usr_test")
    response = await client.request("POST", "/v1/shell", args, body(), timeout_s=None)
    return Attached(response, inputs)


def new_session_id() -> str:
    return f"shs_{uuid.uuid4().hex}"


async def test_shell_is_a_terminal_with_term_and_utf8_locale(client: AgentClient) -> None:
    sid = new_session_id()
    shell = await attach(client, session_id=sid, create=True, cols=100, rows=30)
    assert shell.start["session_id"] == sid and shell.start["replayed_bytes"] == 0
    await shell.send(b"echo T=$TERM L=$LANG U=$(id -u) D=$(pwd); tty; stty size\n")
    out = await shell.read_until(b"30 100")
    assert b"T=xterm-256color L=C.UTF-8 U=1000 D=/home/user" in out
    assert b"/dev/pts/" in out
    await shell.send(b"exit 3\n")
    result = await shell.result()
    assert result["status"] == "exited" and result["exit_code"] == 3
    with pytest.raises(AgentError) as info:
        await client.request(
            "POST",
            f"/v1/shells/{sid}/resize",
            {"owner": "usr_test", "cols": 1, "rows": 1},
            timeout_s=5,
        )
    assert info.value.code == "SHELL_SESSION_NOT_FOUND"


async def test_resize_and_ctrl_c_reach_the_foreground_job(client: AgentClient) -> None:
    sid = new_session_id()
    shell = await attach(client, session_id=sid, create=True, user="root")
    await shell.send(b"id -u; stty size\n")
    await shell.read_until(b"24 80")
    response = await client.request(
        "POST",
        f"/v1/shells/{sid}/resize",
        {"owner": "usr_test", "cols": 132, "rows": 43},
        timeout_s=5,
    )
    await response.json()
    await shell.send(b"stty size\n")
    await shell.read_until(b"43 132")
    await shell.send(b"sleep 30\n")
    await asyncio.sleep(0.3)
    await shell.send(b"\x03")  # Ctrl-C through the line discipline
    await shell.send(b"echo after-$?\n")
    await shell.read_until(b"after-130")
    await shell.send(b"sleep 30\n")
    await asyncio.sleep(0.3)
    response = await client.request(
        "POST",
        f"/v1/shells/{sid}/signal",
        {"owner": "usr_test", "signal": "SIGINT"},
        timeout_s=5,
    )
    await response.json()
    await shell.send(b"echo again-$?\n")
    await shell.read_until(b"again-130")
    await shell.send(b"exit\n")
    assert (await shell.result())["exit_code"] == 0


async def test_split_utf8_arrives_intact(client: AgentClient) -> None:
    sid = new_session_id()
    shell = await attach(client, session_id=sid, create=True)
    text = "é€😀" * 30000
    await shell.send(
        b"stty -onlcr; printf '%s' 'BEGIN'; "
        b"i=0; while [ $i -lt 30000 ]; do printf '\\303\\251\\342\\202\\254\\360\\237\\230\\200';"
        b" i=$((i+1)); done; printf 'END\\n'; exit\n"
    )
    await shell.result(timeout_s=120)
    out = bytes(shell.output)
    body = out[out.rindex(b"BEGIN") + 5 : out.rindex(b"END")]
    assert body.decode("utf-8") == text


async def test_detach_keeps_the_session_and_reattach_replays(client: AgentClient) -> None:
    sid = new_session_id()
    shell = await attach(client, session_id=sid, create=True, grace_s=30)
    await shell.send(b"echo first-$((0+1))-mark\n")
    await shell.read_until(b"first-1-mark\r\n")
    seen = len(shell.output)
    await shell.send(b"sleep 0.5; echo while-$((1+1))-away\n")
    await shell.read_until(b"sleep 0.5")
    await shell.detach()
    await asyncio.sleep(1.5)
    with pytest.raises(AgentError) as info:
        await attach(client, session_id=sid, owner="usr_other")
    assert info.value.code == "SHELL_SESSION_NOT_FOUND"
    again = await attach(client, session_id=sid, offset=seen)
    assert again.start["offset"] == seen and again.start["replayed_bytes"] > 0
    out = await again.read_until(b"while-2-away\r\n")
    assert b"first-1-mark" not in out
    # A newer attach takes the session over; the older one ends with taken_over.
    third = await attach(client, session_id=sid, cols=90, rows=20)
    assert (await again.result())["status"] == "taken_over"
    await third.send(b"stty size; exit 5\n")
    result = await third.result()
    assert result["exit_code"] == 5 and b"20 90" in third.output


async def test_grace_expiry_hangs_up_the_session(client: AgentClient) -> None:
    sid = new_session_id()
    shell = await attach(client, session_id=sid, create=True, grace_s=1)
    await shell.send(b"echo up\n")
    await shell.read_until(b"up\r\n")
    listing = await (await client.request("GET", "/v1/shells", {}, timeout_s=5)).json()
    assert any(s["session_id"] == sid and s["attached"] for s in listing)
    await shell.detach()
    await asyncio.sleep(2.0)
    listing = await (await client.request("GET", "/v1/shells", {}, timeout_s=5)).json()
    assert sid not in [s["session_id"] for s in listing]
    with pytest.raises(AgentError) as info:
        await attach(client, session_id=sid)
    assert info.value.code == "SHELL_SESSION_NOT_FOUND"


async def test_bad_arguments_are_validation_errors(client: AgentClient) -> None:
    for args in (
        {"session_id": new_session_id(), "create": True, "cols": 0},
        {"session_id": new_session_id(), "create": True, "command": ["relative"]},
        {"session_id": "", "create": True},
    ):
        with pytest.raises(AgentError) as info:
            await attach(client, **args)
        assert info.value.code == "VALIDATION_ERROR"

"""Exec through the real agent running as PID 1 of a busybox-only bunker."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator

import pytest

from scaigrid.protocol.agent import AgentClient, AgentError
from tests.agent.conftest import AgentProcess, new_exec_id, run_exec


async def test_the_bunker_has_no_python_and_the_agent_is_pid_1(
    agent: AgentProcess, client: AgentClient
) -> None:
    assert not [p for p in agent.root.rglob("*python*") if ".scaibunker" not in p.parts]
    home = (agent.root / "home/user").stat()
    assert (home.st_uid, home.st_gid, home.st_mode & 0o7777) == (1000, 1000, 0o755)
    info = await client.ping()
    assert info["pid"] == 1
    assert info["protocol_version"] == 1
    assert info["capabilities_missing"] == []
    result, out, _ = await run_exec(client, "echo $$; ls /.scaibunker/bin")
    assert result["status"] == "exited"
    assert b"python3" in out


async def test_string_command_runs_in_sh_with_exit_code_and_both_streams(
    client: AgentClient,
) -> None:
    result, out, err = await run_exec(client, "echo out; echo err >&2; exit 3")
    assert (out, err) == (b"out\n", b"err\n")
    assert result["status"] == "exited"
    assert result["exit_code"] == 3
    assert result["signal"] is None
    assert result["stdout_bytes"] == 4 and result["stderr_bytes"] == 4
    assert result["started_at"].endswith("Z") and result["duration_ms"] >= 0


async def test_argv_command_is_not_parsed_by_a_shell(client: AgentClient) -> None:
    result, out, _ = await run_exec(client, ["printf", "%s|", "a b", "$HOME", "'c'"])
    assert result["exit_code"] == 0
    assert out == b"a b|$HOME|'c'|"


async def test_user_identity_environment_and_cwd(client: AgentClient) -> None:
    script = 'id -u; id -g; pwd; echo "$HOME $USER $LANG $PATH $EXTRA"; umask'
    _, out, _ = await run_exec(client, script, env={"EXTRA": "x y"})
    uid, gid, cwd, env, umask = out.decode().splitlines()
    assert (uid, gid, cwd) == ("1000", "1000", "/home/user")
    assert env == (
        "/home/user user C.UTF-8 /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin x y"
    )
    assert umask == "0022"
    _, out, _ = await run_exec(client, "id -u; pwd; echo $HOME", user="root", cwd="/tmp")
    assert out == b"0\n/tmp\n/root\n"
    await run_exec(client, "mkdir -p sub")
    _, out, _ = await run_exec(client, "pwd", cwd="sub")
    assert out == b"/home/user/sub\n"


async def test_children_get_a_new_session_and_oom_score_adj_0(client: AgentClient) -> None:
    _, out, _ = await run_exec(
        client, "cat /proc/self/oom_score_adj; cut -d' ' -f6 /proc/$$/stat; echo $$"
    )
    adj, session, pid = out.decode().split()
    assert adj == "0"
    assert session == pid


async def test_stdin_from_the_body_is_piped_in_and_closed(client: AgentClient) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 100_000):
            yield payload[i : i + 100_000]
            await asyncio.sleep(0)

    # Paced, as the controller's foreground execs are: this client reads the output only once
    # it has sent the body, and an unpaced exec would drop (and report as a gap) what
    # overflows the output buffer meanwhile.
    result, out, err = await run_exec(client, "cat; echo eof >&2", stdin=chunks(), paced=True)
    assert result["exit_code"] == 0
    assert hashlib.sha256(out).digest() == hashlib.sha256(payload).digest()
    assert err == b"eof\n"
    _, out, _ = await run_exec(client, ["cat"], stdin=b"bytes body")
    assert out == b"bytes body"


async def test_stdin_is_dev_null_by_default(client: AgentClient) -> None:
    result, out, _ = await run_exec(client, "cat; readlink /proc/self/fd/0")
    assert result["exit_code"] == 0
    assert out == b"/dev/null\n"


async def test_binary_and_non_utf8_output_is_kept_byte_for_byte(client: AgentClient) -> None:
    _, out, err = await run_exec(client, r"printf '\377\376\000\200'; printf '\351' >&2")
    assert out == b"\xff\xfe\x00\x80"
    assert err == b"\xe9"
    blob = bytes(range(256)) * 4096
    response = await client.request("PUT", "/v1/files", {"path": "blob.bin"}, blob, timeout_s=10)
    await response.json()
    _, out, _ = await run_exec(client, ["cat", "blob.bin"])
    assert out == blob


async def test_missing_executable_or_cwd_completes_with_127(client: AgentClient) -> None:
    result, _, err = await run_exec(client, ["no-such-program", "x"])
    assert (result["status"], result["exit_code"]) == ("exited", 127)
    assert b"no-such-program" in err and b"No such file" in err
    result, _, err = await run_exec(client, "true", cwd="/does/not/exist")
    assert (result["status"], result["exit_code"]) == ("exited", 127)
    assert b"/does/not/exist" in err
    result, _, _ = await run_exec(client, "no-such-program-either")
    assert result["exit_code"] == 127


async def test_signaled_process_reports_the_signal_name(client: AgentClient) -> None:
    result, _, _ = await run_exec(client, "kill -TERM $$")
    assert result["status"] == "signaled"
    assert result["signal"] == "SIGTERM"
    assert result["exit_code"] is None


async def test_timeout_kills_the_whole_tree(client: AgentClient) -> None:
    script = (
        "sleep 4711 & "
        "sh -c 'sleep 4711 & wait' & "
        "setsid sleep 4711 & "
        "(trap '' TERM; sleep 4711) & "
        "wait"
    )
    began = time.monotonic()
    result, _, _ = await run_exec(client, script, timeout_s=1)
    assert time.monotonic() - began < 5
    assert result["status"] == "timed_out"
    assert result["signal"] == "SIGKILL"
    assert result["exit_code"] is None
    for _ in range(50):
        check, out, _ = await run_exec(client, "ps -o args | grep '^sleep 4711'")
        if check["exit_code"] == 1:
            break
        await asyncio.sleep(0.05)
    assert check["exit_code"] == 1, out


async def test_orphans_are_reaped_by_pid_1(client: AgentClient) -> None:
    result, _, _ = await run_exec(client, "(sleep 0.1 &) ; exit 0")
    assert result["exit_code"] == 0
    await asyncio.sleep(0.4)
    _, out, _ = await run_exec(client, "grep -l 'State:.*Z' /proc/[0-9]*/status; true")
    assert out == b""


async def test_a_background_child_holding_the_pipe_does_not_hold_the_result(
    client: AgentClient,
) -> None:
    began = time.monotonic()
    result, out, _ = await run_exec(client, "echo started; sleep 3 & exit 0")
    assert time.monotonic() - began < 2
    assert (result["exit_code"], out) == (0, b"started\n")


async def test_hundred_concurrent_execs_on_one_connection(client: AgentClient) -> None:
    results = await asyncio.gather(*(run_exec(client, ["echo", str(i)]) for i in range(100)))
    assert [out for _, out, _ in results] == [f"{i}\n".encode() for i in range(100)]
    assert {r["status"] for r, _, _ in results} == {"exited"}
    assert len({r["pid"] for r, _, _ in results}) == 100


async def test_a_slow_reader_never_blocks_the_process(client: AgentClient) -> None:
    exec_id = new_exec_id()
    total = 6_000_000
    response = await client.request(
        "POST",
        "/v1/exec",
        {"exec_id": exec_id, "command": f"head -c {total} /dev/zero"},
        timeout_s=30,
    )
    started = json.loads(response.headers["x-start"])
    assert started["exec_id"] == exec_id
    record: dict[str, object] = {}
    for _ in range(100):
        record = await (
            await client.request("GET", f"/v1/processes/{exec_id}", {}, timeout_s=5)
        ).json()
        if record["status"] != "running":
            break
        await asyncio.sleep(0.05)
    assert record["status"] == "exited", "the process blocked while nobody read its output"
    assert record["stdout_bytes"] == total
    received, dropped = 0, 0
    async for kind, data in response.exec_events():
        if kind == "gap":
            gap = json.loads(data)
            assert gap["stream"] == "stdout"
            dropped += gap["dropped_bytes"]
            assert gap["offset"] == received + dropped
        else:
            assert data.count(0) == len(data)
            received += len(data)
    assert received + dropped == total
    assert dropped > 0
    result = json.loads((await response.trailers())["x-result"])
    assert result["stdout_bytes"] == total


async def test_a_client_that_gives_up_leaves_the_process_running(client: AgentClient) -> None:
    exec_id = new_exec_id()
    response = await client.request(
        "POST", "/v1/exec", {"exec_id": exec_id, "command": "sleep 0.3; echo done"}, timeout_s=5
    )
    await response.aclose()
    for _ in range(100):
        record = await (
            await client.request("GET", f"/v1/processes/{exec_id}", {}, timeout_s=5)
        ).json()
        if record["status"] != "running":
            break
        await asyncio.sleep(0.05)
    assert (record["status"], record["exit_code"], record["stdout_bytes"]) == ("exited", 0, 5)


@pytest.mark.parametrize(
    "args",
    [
        {"command": ""},
        {"command": []},
        {"command": 5},
        {"command": "true", "user": "nobody"},
        {"command": "true", "timeout_s": 0},
        {"command": "true", "env": {"A=B": "x"}},
        {"command": "true", "cwd": ""},
        {"command": "true", "stdin": "pipe"},
    ],
)
async def test_invalid_exec_arguments_are_validation_errors(
    client: AgentClient, args: dict[str, object]
) -> None:
    with pytest.raises(AgentError) as caught:
        await client.request("POST", "/v1/exec", {"exec_id": new_exec_id(), **args}, timeout_s=5)
    assert caught.value.code == "VALIDATION_ERROR"
    assert caught.value.status == 422


async def test_a_reused_exec_id_is_refused(client: AgentClient) -> None:
    exec_id = new_exec_id()
    await (
        await client.request(
            "POST", "/v1/exec", {"exec_id": exec_id, "command": "true"}, timeout_s=5
        )
    ).trailers()
    with pytest.raises(AgentError) as caught:
        await client.request(
            "POST", "/v1/exec", {"exec_id": exec_id, "command": "true"}, timeout_s=5
        )
    assert caught.value.code == "VALIDATION_ERROR"

"""End to end: background processes and exec timeouts in real bunkers (issue #5, SPEC §3.6)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import create_bunker
from tests.fixtures.stack import BASE, Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def bunker_id(stack: Stack, busybox_image: str) -> Any:
    bunker = create_bunker(stack, busybox_image, memory_mb=256, disk_mb=256)
    yield bunker["id"]
    with stack.client() as client:
        client.delete(f"{BASE}/bunkers/{bunker['id']}")


def _ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()["data"]


def _error_code(response: httpx.Response) -> str:
    body = response.json()
    assert body["status"] == "error", body
    return str(body["error"]["code"])


def _exec(client: httpx.Client, bunker_id: str, command: Any, **fields: Any) -> dict[str, Any]:
    response = client.post(f"{BASE}/bunkers/{bunker_id}/exec", json={"command": command, **fields})
    return dict(_ok(response))


def _wait_ended(client: httpx.Client, bunker_id: str, ref: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        record = _ok(client.get(f"{BASE}/bunkers/{bunker_id}/processes/{ref}"))
        if record["status"] != "running":
            return dict(record)
        time.sleep(0.05)
    raise AssertionError(f"{ref} still running")


def test_background_exec_with_open_stdin_output_resume_and_listing(
    stack: Stack, bunker_id: str
) -> None:
    with stack.client() as client:
        started = _exec(client, bunker_id, "cat; echo done", background=True, stdin_open=True)
        assert set(started) == {"exec_id", "pid"} and started["exec_id"].startswith("exe_")
        base = f"{BASE}/bunkers/{bunker_id}/processes"
        record = _ok(client.get(f"{base}/{started['pid']}"))
        assert (record["exec_id"], record["status"], record["stdin_open"]) == (
            started["exec_id"],
            "running",
            True,
        )
        wrote = _ok(client.post(f"{base}/{started['exec_id']}/stdin", json={"data": "héllo "}))
        assert wrote == {"bytes_written": 7, "stdin_open": True}
        wrote = _ok(
            client.post(
                f"{base}/{started['exec_id']}/stdin",
                json={"data_b64": base64.b64encode(b"world\n").decode(), "eof": True},
            )
        )
        assert wrote == {"bytes_written": 6, "stdin_open": False}
        ended = _wait_ended(client, bunker_id, started["exec_id"])
        assert (ended["status"], ended["exit_code"], ended["background"]) == ("exited", 0, True)
        whole = _ok(client.get(f"{base}/{started['exec_id']}/output"))
        assert whole["data"] == "héllo world\ndone\n" and whole["eof"] is True
        assert (whole["offset"], whole["next_offset"], whole["dropped_bytes"]) == (0, 18, 0)
        # Resuming at an offset inside "é" (bytes 1-2) in utf8 mode replaces the lone byte;
        # base64 gives the raw bytes from any offset.
        tail = _ok(client.get(f"{base}/{started['exec_id']}/output", params={"offset": 7}))
        assert tail["data"] == "world\ndone\n"
        raw = _ok(
            client.get(
                f"{base}/{started['exec_id']}/output", params={"offset": 2, "encoding": "base64"}
            )
        )
        assert base64.b64decode(raw["data"]) == "héllo world\ndone\n".encode()[2:]
        listed = _ok(client.get(base, params={"status": "exited"}))
        assert started["exec_id"] in [p["exec_id"] for p in listed]
        late = client.post(f"{base}/{started['exec_id']}/stdin", json={"data": "x"})
        assert late.status_code == 409 and _error_code(late) == "PROCESS_NOT_RUNNING"


def test_utf8_output_is_never_split_inside_a_character(stack: Stack, bunker_id: str) -> None:
    with stack.client() as client:
        started = _exec(client, bunker_id, "printf '€€€€'; sleep 30", background=True)
        base = f"{BASE}/bunkers/{bunker_id}/processes/{started['exec_id']}"
        text, offset = "", 0
        deadline = time.monotonic() + 10
        while len(text) < 4 and time.monotonic() < deadline:
            chunk = _ok(client.get(f"{base}/output", params={"offset": offset, "max_bytes": 4}))
            assert "\ufffd" not in chunk["data"]
            text += chunk["data"]
            offset = chunk["next_offset"]
        assert text == "€€€€"
        _ok(client.post(f"{base}/signal", json={"signal": "KILL"}))


def test_signals_group_and_errors(stack: Stack, bunker_id: str) -> None:
    with stack.client() as client:
        started = _exec(
            client, bunker_id, "trap 'exit 7' USR1; while true; do sleep 1; done", background=True
        )
        base = f"{BASE}/bunkers/{bunker_id}/processes"
        time.sleep(0.3)
        no_stdin = client.post(f"{base}/{started['exec_id']}/stdin", json={"data": "x"})
        assert no_stdin.status_code == 409 and _error_code(no_stdin) == "STDIN_CLOSED"
        bad = client.post(f"{base}/{started['exec_id']}/signal", json={"signal": "SIGNOPE"})
        assert bad.status_code == 422 and _error_code(bad) == "VALIDATION_ERROR"
        _ok(client.post(f"{base}/{started['exec_id']}/signal", json={"signal": "USR1"}))
        ended = _wait_ended(client, bunker_id, started["exec_id"])
        assert (ended["status"], ended["exit_code"]) == ("exited", 7)
        again = client.post(f"{base}/{started['exec_id']}/signal", json={"signal": "TERM"})
        assert again.status_code == 409 and _error_code(again) == "PROCESS_NOT_RUNNING"
        grouped = _exec(client, bunker_id, "sleep 300 & sleep 300 & wait", background=True)
        time.sleep(0.3)
        _ok(client.post(f"{base}/{grouped['pid']}/signal", json={"signal": "TERM", "group": True}))
        assert _wait_ended(client, bunker_id, grouped["exec_id"])["status"] == "signaled"
        missing = client.get(f"{base}/exe_doesnotexist")
        assert missing.status_code == 404 and _error_code(missing) == "PROCESS_NOT_FOUND"
        hostile = client.get(f"{base}/..%2F..%2Fping")
        assert hostile.status_code in (404, 422)


def test_timeout_kills_double_forked_daemons_that_ignore_sigterm(
    stack: Stack, bunker_id: str
) -> None:
    daemon = (
        "setsid sh -c '(trap \"\" TERM HUP; exec sleep 4711) &' </dev/null >/dev/null 2>&1; "
        "sleep 600"
    )
    with stack.client() as client:
        began = time.monotonic()
        result = _exec(client, bunker_id, daemon, timeout_s=1)
        assert time.monotonic() - began < 10
        assert (result["status"], result["signal"], result["exit_code"]) == (
            "timed_out",
            "SIGKILL",
            None,
        )
        survivors: dict[str, Any] = {}
        for _ in range(50):
            survivors = _exec(client, bunker_id, "ps -o args | grep '^sleep 4711'")
            if survivors["exit_code"] == 1:
                break
            time.sleep(0.1)
        assert survivors["exit_code"] == 1, survivors["stdout"]


def test_output_follows_as_sse_from_an_offset_until_exit(stack: Stack, bunker_id: str) -> None:
    with stack.client() as client:
        started = _exec(
            client, bunker_id, "for i in 1 2 3; do echo line$i; sleep 0.3; done", background=True
        )
        url = f"{BASE}/bunkers/{bunker_id}/processes/{started['exec_id']}/output"
        events: list[tuple[str, Any]] = []
        with client.stream(
            "GET", url, params={"offset": 2}, headers={"Accept": "text/event-stream"}
        ) as response:
            assert response.status_code == 200
            event = ""
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[len("event: ") :]
                elif line.startswith("data: "):
                    events.append((event, json.loads(line[len("data: ") :])))
        assert events[0] == ("start", {"exec_id": started["exec_id"], "pid": started["pid"]})
        out = [d for e, d in events if e == "stdout"]
        assert out[0]["seq"] == 2
        assert "".join(d["data"] for d in out) == "line1\nline2\nline3\n"[2:]
        assert events[-1][0] == "exit" and events[-1][1]["status"] == "exited"
        missing = client.get(
            f"{BASE}/bunkers/{bunker_id}/processes/exe_nothere/output",
            headers={"Accept": "text/event-stream"},
        )
        assert missing.status_code == 404 and _error_code(missing) == "PROCESS_NOT_FOUND"


def test_process_listing_pages_with_real_cursors(stack: Stack, bunker_id: str) -> None:
    with stack.client() as client:
        base = f"{BASE}/bunkers/{bunker_id}/processes"
        ran = {_exec(client, bunker_id, f"echo {n}")["exec_id"] for n in range(3)}
        seen: list[str] = []
        cursor: str | None = None
        while True:
            params = {"limit": 1, "status": "exited", **({"cursor": cursor} if cursor else {})}
            response = client.get(base, params=params)
            assert response.status_code == 200, response.text
            body = response.json()
            seen += [p["exec_id"] for p in body["data"]]
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert len(seen) == len(set(seen)) and ran <= set(seen)
        for bad in ("garbage", "exe_doesnotexist"):
            refused = client.get(base, params={"cursor": bad})
            assert refused.status_code == 422 and _error_code(refused) == "VALIDATION_ERROR"
            assert [d["field"] for d in refused.json()["error"]["details"]] == ["query.cursor"]

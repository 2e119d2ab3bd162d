"""End to end: streaming exec over Server-Sent Events in real bunkers (SPEC §3.5)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import create_bunker
from tests.fixtures.stack import BASE, Stack

pytestmark = pytest.mark.e2e

_PATTERN = b"0123456789abcdef\n"


@pytest.fixture(scope="module")
def bunker_id(stack: Stack, busybox_image: str) -> Any:
    bunker = create_bunker(stack, busybox_image, memory_mb=256, disk_mb=256)
    yield bunker["id"]
    with stack.client() as client:
        client.delete(f"{BASE}/bunkers/{bunker['id']}")


def _frames(response: httpx.Response) -> Iterator[tuple[str, Any]]:
    """Yield ``(event, data)``; a keepalive comment yields ``("keepalive", None)``."""
    event, data = "", ""
    for line in response.iter_lines():
        if line.startswith(":"):
            yield "keepalive", None
        elif line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            data = line[len("data: ") :]
        elif line == "" and event:
            yield event, json.loads(data)
            event, data = "", ""


def _stream(
    client: httpx.Client, bunker_id: str, command: str, **fields: Any
) -> list[tuple[str, Any]]:
    with client.stream(
        "POST",
        f"{BASE}/bunkers/{bunker_id}/exec",
        json={"command": command, **fields},
        headers={"Accept": "text/event-stream"},
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(_frames(response))


def test_sse_sends_start_output_with_offsets_and_exit(stack: Stack, bunker_id: str) -> None:
    with stack.client() as client:
        frames = _stream(client, bunker_id, "echo out; echo err >&2; echo more; exit 3")
    events = [e for e, _ in frames if e != "keepalive"]
    assert events[0] == "start" and events[-1] == "exit"
    start, exit_ = frames[0][1], frames[-1][1]
    assert start["exec_id"].startswith("exe_") and isinstance(start["pid"], int)
    assert (exit_["exec_id"], exit_["status"], exit_["exit_code"]) == (
        start["exec_id"],
        "exited",
        3,
    )
    assert "stdout" not in exit_ and "stderr" not in exit_
    out = [d for e, d in frames if e == "stdout"]
    assert "".join(d["data"] for d in out) == "out\nmore\n"
    assert out[0]["seq"] == 0
    assert [d for e, d in frames if e == "stderr"] == [{"seq": 0, "data": "err\n"}]


def test_sse_never_splits_a_multibyte_character(stack: Stack, bunker_id: str) -> None:
    # 3-byte characters over many 64 KiB agent records: boundaries fall inside characters.
    with stack.client() as client:
        frames = _stream(
            client,
            bunker_id,
            "i=0; while [ $i -lt 2000 ]; do printf '€%.0s' $(seq 100); i=$((i+1)); done",
        )
    out = [d for e, d in frames if e == "stdout"]
    assert len(out) > 1
    text = "".join(d["data"] for d in out)
    assert "\ufffd" not in text and text == "€" * 200_000
    seq = 0
    for chunk in out:
        assert chunk["seq"] == seq
        seq += len(chunk["data"].encode())
    assert frames[-1][1]["status"] == "exited"


def test_sse_base64_and_stdin(stack: Stack, bunker_id: str) -> None:
    with stack.client() as client:
        frames = _stream(client, bunker_id, "cat; printf '\\377'", stdin="héllo", encoding="base64")
    raw = b"".join(base64.b64decode(d["data"]) for e, d in frames if e == "stdout")
    assert raw == "héllo".encode() + b"\xff"


def test_sse_keepalive_while_the_process_is_silent(stack: Stack, bunker_id: str) -> None:
    with stack.client() as client:
        frames = _stream(client, bunker_id, "sleep 16; echo late", timeout_s=30)
    events = [e for e, _ in frames]
    assert "keepalive" in events
    assert events.index("keepalive") < events.index("stdout")
    assert frames[-1][1]["status"] == "exited"


def test_a_reader_that_pauses_gets_uncorrupted_output_with_offsets(
    stack: Stack, bunker_id: str
) -> None:
    """The process writes 64 MiB while the client reads nothing for 60 s: the process is
    never blocked (it finishes while nobody reads), and every byte that arrives sits at its
    true offset."""
    total = 64 << 20
    command = f"rm -f /tmp/wrote; yes 0123456789abcdef | head -c {total}; touch /tmp/wrote"
    with (
        stack.client() as client,
        client.stream(
            "POST",
            f"{BASE}/bunkers/{bunker_id}/exec",
            json={"command": command, "timeout_s": 180},
            headers={"Accept": "text/event-stream"},
        ) as response,
    ):
        frames = _frames(response)
        assert next(frames)[0] == "start"
        stalled_at = time.monotonic()
        with stack.client() as other:
            done = False
            while not done and time.monotonic() < stalled_at + 40:
                time.sleep(1)
                check = other.post(
                    f"{BASE}/bunkers/{bunker_id}/exec", json={"command": "test -e /tmp/wrote"}
                )
                done = check.json()["data"]["exit_code"] == 0
        assert done, "the writer was blocked by a reader that reads nothing"
        time.sleep(max(0.0, stalled_at + 60 - time.monotonic()))
        received, last_end, exit_ = 0, 0, None
        for event, data in frames:
            if event == "stdout":
                chunk = data["data"].encode()
                assert data["seq"] >= last_end
                offset = data["seq"] % len(_PATTERN)
                expected = (_PATTERN * (len(chunk) // len(_PATTERN) + 2))[offset:][: len(chunk)]
                assert chunk == expected
                received += len(chunk)
                last_end = data["seq"] + len(chunk)
            elif event == "exit":
                exit_ = data
    assert exit_ is not None and (exit_["status"], exit_["exit_code"]) == ("exited", 0)
    assert last_end == total
    assert 0 < received <= total

"""The SDK's event-stream parser (SPEC §3.5 frames, §1.5 error frame)."""

from __future__ import annotations

import pytest

from scaigrid.client import BunkerNotRunning, ExecEvent
from scaigrid.client._sse import frames
from scaigrid.client.errors import ProtocolError


def test_frames_skip_comments_and_join_event_and_data() -> None:
    lines = [
        "event: start",
        'data: {"exec_id": "exe_1", "pid": 7}',
        "",
        ": keepalive",
        "",
        "event: stdout",
        'data: {"seq": 0, "data": "aGk="}',
        "",
    ]
    parsed = list(frames(iter(lines)))
    assert parsed == [
        ("start", {"exec_id": "exe_1", "pid": 7}),
        ("stdout", {"seq": 0, "data": "aGk="}),
    ]
    event = ExecEvent.from_sse(*parsed[1])
    assert event is not None and (event.kind, event.seq, event.data) == ("stdout", 0, b"hi")


def test_an_error_frame_raises_the_typed_error() -> None:
    lines = [
        "event: error",
        'data: {"code": "BUNKER_NOT_RUNNING", "message": "stopped"}',
        "",
        "data: [DONE]",
        "",
    ]
    with pytest.raises(BunkerNotRunning):
        list(frames(iter(lines)))


def test_a_frame_that_is_not_json_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        list(frames(iter(["event: stdout", "data: {nope", ""])))

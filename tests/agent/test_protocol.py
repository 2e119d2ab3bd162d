"""The HTTP/2 agent protocol, client and router, over an in-process socket pair."""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from scaigrid.protocol.agent import (
    CHANNEL_GAP,
    CHANNEL_STDERR,
    CHANNEL_STDOUT,
    MAX_ARGS_BYTES,
    STREAM_WINDOW_BYTES,
    AgentClient,
    AgentConnectionLost,
    AgentError,
    AgentRouter,
    RecordDecoder,
    ServerRequest,
    encode_record,
)


class Server:
    """A router with test operations, and what its handlers observed."""

    def __init__(self) -> None:
        self.sent = 0
        self.upload_outcome = ""
        self.router = AgentRouter()
        self.router.add("GET", "/t/args", self.args)
        self.router.add("GET", "/t/items/{item}", self.item)
        self.router.add("POST", "/t/upload", self.upload)
        self.router.add("GET", "/t/big", self.big)
        self.router.add("GET", "/t/fail", self.fail)
        self.router.add("GET", "/t/crash", self.crash)
        self.router.add("GET", "/t/slow", self.slow)
        self.router.add("POST", "/t/early", self.early)
        self.router.add("GET", "/t/records", self.records)

    async def args(self, request: ServerRequest) -> None:
        await request.send_json(request.args)

    async def item(self, request: ServerRequest) -> None:
        await request.send_json(request.params)

    async def upload(self, request: ServerRequest) -> None:
        digest, size = hashlib.sha256(), 0
        try:
            async for chunk in request.body():
                digest.update(chunk)
                size += len(chunk)
        except BaseException as exc:
            self.upload_outcome = type(exc).__name__
            raise
        self.upload_outcome = "complete"
        await request.send_json({"size": size, "sha256": digest.hexdigest()})

    async def big(self, request: ServerRequest) -> None:
        request.start(200)
        for _ in range(request.args["chunks"]):
            await request.write(b"b" * 65536)
            self.sent += 65536
        request.finish({"x-result": "done"})

    async def fail(self, request: ServerRequest) -> None:
        raise AgentError("FILE_NOT_FOUND", "nothing here", {"path": "/x"})

    async def crash(self, request: ServerRequest) -> None:
        raise RuntimeError("boom")

    async def slow(self, request: ServerRequest) -> None:
        await asyncio.sleep(10)

    async def early(self, request: ServerRequest) -> None:
        await request.send_json({"early": True})

    async def records(self, request: ServerRequest) -> None:
        request.start(200)
        data = b"".join(
            [
                encode_record(CHANNEL_STDOUT, b"out"),
                encode_record(CHANNEL_STDERR, b"\xff\x00"),
                encode_record(CHANNEL_GAP, b'{"stream":"stdout","offset":9,"dropped_bytes":6}'),
            ]
        )
        for byte in data:
            await request.write(bytes([byte]))
        request.finish({"x-result": "{}"})


@pytest.fixture
async def pair() -> AsyncIterator[tuple[AgentClient, Server, asyncio.Task[None]]]:
    left, right = socket.socketpair()
    server = Server()
    s_reader, s_writer = await asyncio.open_connection(sock=right)
    serving = asyncio.create_task(server.router.serve(s_reader, s_writer))
    c_reader, c_writer = await asyncio.open_connection(sock=left)
    client = await AgentClient.connect(c_reader, c_writer, timeout_s=5)
    yield client, server, serving
    await client.close()
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)


async def test_json_request_response_and_path_parameters(pair: Any) -> None:
    client, _, _ = pair
    args = {"a": [1, 2], "s": "ünïcode \n", "n": None}
    assert await (await client.request("GET", "/t/args", args, timeout_s=5)).json() == args
    response = await client.request("GET", "/t/items/abc", {}, timeout_s=5)
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    assert await response.json() == {"item": "abc"}


async def test_large_arguments_fit_in_the_header_block_quickly(pair: Any) -> None:
    client, _, _ = pair
    args = {"env": {f"VAR_{i}": "v" * 1000 for i in range(900)}}
    began = time.monotonic()
    assert await (await client.request("GET", "/t/args", args, timeout_s=5)).json() == args
    assert time.monotonic() - began < 2
    with pytest.raises(ValueError):
        await client.request("GET", "/t/args", {"x": "y" * MAX_ARGS_BYTES}, timeout_s=5)


async def test_errors_carry_code_status_and_details(pair: Any) -> None:
    client, _, _ = pair
    with pytest.raises(AgentError) as caught:
        await client.request("GET", "/t/fail", {}, timeout_s=5)
    error = caught.value
    assert (error.code, error.status, error.message, error.details) == (
        "FILE_NOT_FOUND",
        404,
        "nothing here",
        {"path": "/x"},
    )
    with pytest.raises(AgentError) as caught:
        await client.request("GET", "/t/crash", {}, timeout_s=5)
    assert (caught.value.code, caught.value.status) == ("INTERNAL_ERROR", 500)
    with pytest.raises(AgentError) as caught:
        await client.request("DELETE", "/t/args", {}, timeout_s=5)
    assert (caught.value.code, caught.value.status) == ("NOT_FOUND", 404)


async def test_flow_control_holds_back_a_sender_whose_reader_does_not_read(pair: Any) -> None:
    client, server, _ = pair
    response = await client.request("GET", "/t/big", {"chunks": 128}, timeout_s=10)
    await asyncio.sleep(0.3)
    assert server.sent <= STREAM_WINDOW_BYTES + 65536
    began = time.monotonic()
    echoed = await (await client.request("GET", "/t/args", {"x": 1}, timeout_s=2)).json()
    assert echoed == {"x": 1}
    assert time.monotonic() - began < 1
    received = 0
    async for chunk in response.iter_body():
        received += len(chunk)
    assert received == 128 * 65536
    assert (await response.trailers()) == {"x-result": "done"}


async def test_a_slow_body_iterator_does_not_hold_up_other_streams(pair: Any) -> None:
    client, _, _ = pair
    payload = [random.randbytes(100_000) for _ in range(3)]

    async def slow() -> AsyncIterator[bytes]:
        for part in payload:
            yield part
            await asyncio.sleep(0.3)

    upload = asyncio.create_task(client.request("POST", "/t/upload", {}, slow(), timeout_s=10))
    began = time.monotonic()
    results = await asyncio.gather(
        *(client.request("GET", "/t/args", {"i": i}, timeout_s=5) for i in range(20))
    )
    assert time.monotonic() - began < 0.5
    assert [await r.json() for r in results] == [{"i": i} for i in range(20)]
    result = await (await upload).json()
    assert result == {"size": 300_000, "sha256": hashlib.sha256(b"".join(payload)).hexdigest()}


async def test_a_failing_body_resets_the_stream_and_raises_its_error(pair: Any) -> None:
    client, server, _ = pair

    async def failing() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        await asyncio.sleep(0.1)
        raise ValueError("source broke")

    with pytest.raises(ValueError, match="source broke"):
        await client.request("POST", "/t/upload", {}, failing(), timeout_s=5)
    for _ in range(100):
        if server.upload_outcome:
            break
        await asyncio.sleep(0.01)
    assert server.upload_outcome == "CancelledError"
    assert await (await client.request("GET", "/t/args", {}, timeout_s=5)).json() == {}


async def test_an_early_answer_stops_the_upload(pair: Any) -> None:
    client, _, _ = pair
    response = await client.request("POST", "/t/early", {}, b"z" * 5_000_000, timeout_s=5)
    assert await response.json() == {"early": True}
    assert await (await client.request("GET", "/t/args", {}, timeout_s=5)).json() == {}


async def test_the_deadline_covers_the_whole_exchange(pair: Any) -> None:
    client, _, _ = pair
    with pytest.raises(TimeoutError):
        await client.request("GET", "/t/slow", {}, timeout_s=0.2)
    # Twice the window: the body stalls until the client reads, so the deadline passes.
    chunks = 2 * STREAM_WINDOW_BYTES // 65536
    response = await client.request("GET", "/t/big", {"chunks": chunks}, timeout_s=0.3)
    await asyncio.sleep(0.4)
    with pytest.raises(TimeoutError):
        await response.trailers()
    assert await (await client.request("GET", "/t/args", {}, timeout_s=5)).json() == {}


async def test_exec_records_are_parsed_across_any_split(pair: Any) -> None:
    client, _, _ = pair
    response = await client.request("GET", "/t/records", {}, timeout_s=5)
    events = [event async for event in response.exec_events()]
    assert events == [
        ("stdout", b"out"),
        ("stderr", b"\xff\x00"),
        ("gap", b'{"stream":"stdout","offset":9,"dropped_bytes":6}'),
    ]
    assert await response.trailers() == {"x-result": "{}"}


def test_record_decoder_handles_arbitrary_chunking() -> None:
    records = [(CHANNEL_STDOUT, random.randbytes(n)) for n in (0, 1, 5, 70_000)]
    stream = b"".join(encode_record(c, p) for c, p in records)
    decoder, parsed = RecordDecoder(), []
    position = 0
    while position < len(stream):
        step = random.randint(1, 9000)
        parsed += decoder.feed(stream[position : position + step])
        position += step
    assert parsed == records
    assert decoder.pending == 0
    with pytest.raises(ValueError):
        RecordDecoder().feed(b"\x09\x00\x00\x00\x01x")


async def test_a_broken_connection_fails_pending_requests(pair: Any) -> None:
    client, _, serving = pair
    pending = asyncio.create_task(client.request("GET", "/t/slow", {}, timeout_s=5))
    await asyncio.sleep(0.05)
    serving.cancel()
    with pytest.raises(AgentConnectionLost):
        await pending
    await asyncio.wait_for(client.wait_closed(), 5)
    assert client.closed
    with pytest.raises(AgentConnectionLost):
        await client.request("GET", "/t/args", {}, timeout_s=5)

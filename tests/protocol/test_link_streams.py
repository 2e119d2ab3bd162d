"""The worker channel's byte streams: framing, EOF, credit-based flow control."""

from __future__ import annotations

import asyncio

import pytest

from scaigrid.protocol.link import (
    RECEIVE_WINDOW_BYTES,
    STREAM_WINDOW_BYTES,
    LinkClosed,
    ProtocolViolation,
    StreamMux,
    decode_frame,
    encode_frame,
    loads,
)


class Pair:
    """Two muxes wired back to back, as the controller and a worker would be."""

    def __init__(self, *, deliver: bool = True) -> None:
        self.deliver = deliver
        self.in_flight_to_b = 0
        self.a = StreamMux(self._a_text, self._a_bytes, odd_ids=True)
        self.b = StreamMux(self._b_text, self._b_bytes, odd_ids=False)

    async def _a_text(self, text: str) -> None:
        message = loads(text)
        if message["type"] == "stream_credit":
            self.b.feed_credit(message)

    async def _a_bytes(self, frame: bytes) -> None:
        self.in_flight_to_b += len(decode_frame(frame)[1])
        if self.deliver:
            self.b.feed_binary(frame)

    async def _b_text(self, text: str) -> None:
        message = loads(text)
        if message["type"] == "stream_credit":
            self.a.feed_credit(message)

    async def _b_bytes(self, frame: bytes) -> None:
        self.a.feed_binary(frame)


def test_frame_round_trip_keeps_binary_payload() -> None:
    payload = bytes(range(256)) * 3
    assert decode_frame(encode_frame(2**40 + 7, payload)) == (2**40 + 7, payload)
    with pytest.raises(ProtocolViolation):
        decode_frame(b"\x00\x01")


async def test_stream_delivers_bytes_in_order_then_eof() -> None:
    pair = Pair()
    stream_id = pair.a.allocate()
    inbound = pair.b.inbound(stream_id)
    outbound = pair.a.outbound(stream_id)
    blob = b"\xff\x00" * 1_500_000

    async def send() -> None:
        await outbound.write(blob)
        await outbound.end()

    received = bytearray()

    async def receive() -> None:
        async for chunk in inbound:
            received.extend(chunk)

    await asyncio.wait_for(asyncio.gather(send(), receive()), 10)
    assert bytes(received) == blob


async def test_sender_stops_at_one_window_without_credit() -> None:
    pair = Pair()
    stream_id = pair.a.allocate()
    pair.b.inbound(stream_id)  # registered but never read: no credit comes back
    outbound = pair.a.outbound(stream_id)
    writer = asyncio.ensure_future(outbound.write(b"x" * (3 * STREAM_WINDOW_BYTES)))
    await asyncio.sleep(0.2)
    assert not writer.done()
    assert pair.in_flight_to_b == STREAM_WINDOW_BYTES
    pair.a.close()
    with pytest.raises(LinkClosed):
        await writer


async def test_a_consumer_that_keeps_up_widens_the_window_which_still_bounds_the_sender() -> None:
    pair = Pair()
    stream_id = pair.a.allocate()
    inbound = pair.b.inbound(stream_id)
    outbound = pair.a.outbound(stream_id)
    writer = asyncio.ensure_future(outbound.write(b"w" * (2 * RECEIVE_WINDOW_BYTES)))
    await asyncio.sleep(0.1)
    assert pair.in_flight_to_b == STREAM_WINDOW_BYTES, "one window before any read"
    taken = 0
    while taken <= STREAM_WINDOW_BYTES:  # a whole window, then it waits for more
        taken += len(await inbound.read())
    await asyncio.sleep(0.1)
    ahead = pair.in_flight_to_b - taken
    assert 4 * STREAM_WINDOW_BYTES < ahead <= RECEIVE_WINDOW_BYTES
    assert not writer.done()
    with pytest.raises(ProtocolViolation):
        pair.b.feed_binary(encode_frame(stream_id, b"y" * (RECEIVE_WINDOW_BYTES - ahead + 1)))
    writer.cancel()


async def test_a_slow_consumer_keeps_the_one_window() -> None:
    pair = Pair()
    stream_id = pair.a.allocate()
    inbound = pair.b.inbound(stream_id)
    outbound = pair.a.outbound(stream_id)
    writer = asyncio.ensure_future(outbound.write(b"s" * (4 * STREAM_WINDOW_BYTES)))
    taken = 0
    for _ in range(12):
        taken += len(await inbound.read())
        await asyncio.sleep(0.01)  # slower than the sender, which refills at once
        assert pair.in_flight_to_b - taken <= STREAM_WINDOW_BYTES
    assert taken > STREAM_WINDOW_BYTES
    writer.cancel()


async def test_credit_overrun_is_a_protocol_violation() -> None:
    pair = Pair()
    stream_id = pair.a.allocate()
    pair.b.inbound(stream_id)
    frame = encode_frame(stream_id, b"y" * 65536)
    with pytest.raises(ProtocolViolation):
        for _ in range(STREAM_WINDOW_BYTES // 65536 + 1):
            pair.b.feed_binary(frame)


async def test_closing_the_link_fails_pending_readers() -> None:
    pair = Pair()
    inbound = pair.b.inbound(pair.a.allocate())
    reader = asyncio.ensure_future(inbound.read())
    await asyncio.sleep(0)
    pair.b.close(LinkClosed("gone"))
    with pytest.raises(LinkClosed):
        await reader


def test_stream_ids_never_collide_between_sides() -> None:
    pair = Pair()
    ours = {pair.a.allocate() for _ in range(100)}
    theirs = {pair.b.allocate() for _ in range(100)}
    assert not ours & theirs

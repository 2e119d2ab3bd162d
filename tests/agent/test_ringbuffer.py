"""The per-stream output ring buffer."""

from __future__ import annotations

import random

from scaigrid.agent.ringbuffer import RingBuffer


def test_small_output_is_kept_whole_and_costs_only_its_size() -> None:
    ring = RingBuffer(1024)
    ring.write(b"hello ")
    ring.write(b"world")
    assert (ring.start, ring.end, ring.held_bytes) == (0, 11, 11)
    assert ring.read(0, 100) == (0, b"hello world")
    assert ring.read(6, 3) == (6, b"wor")
    assert ring.read(11, 10) == (11, b"")


def test_wrapping_keeps_the_last_capacity_bytes_and_reports_the_skip() -> None:
    ring = RingBuffer(10)
    ring.write(b"0123456789abc")
    assert (ring.start, ring.end) == (3, 13)
    assert ring.read(0, 100) == (3, b"3456789abc")
    ring.write(b"XYZ")
    assert ring.read(5, 100) == (6, b"6789abcXYZ")
    assert ring.read(14, 100) == (14, b"YZ")


def test_matches_a_reference_under_random_writes() -> None:
    rng = random.Random(7)
    ring, reference = RingBuffer(777), bytearray()
    for _ in range(500):
        data = rng.randbytes(rng.choice([0, 1, 50, 300, 777, 2000]))
        ring.write(data)
        reference += data
        offset = rng.randrange(0, len(reference) + 1)
        start, got = ring.read(offset, rng.randrange(1, 1000))
        assert start == max(offset, len(reference) - 777, 0)
        assert got == bytes(reference[start : start + len(got)])
        assert len(got) == min(len(reference) - start, len(got)) and ring.end == len(reference)


def test_release_drops_the_bytes_but_keeps_counting() -> None:
    ring = RingBuffer(100)
    ring.write(b"abc")
    ring.release()
    ring.write(b"de")
    assert (ring.held_bytes, ring.end) == (0, 5)
    assert ring.read(0, 10) == (5, b"")

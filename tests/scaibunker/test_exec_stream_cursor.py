"""SSE chunk framing of the streaming exec: byte offsets, split characters and gaps."""

from __future__ import annotations

import base64

from scaigrid.modules.scaibunker.bunkers.exec import HeadTail, _StreamCursor, sse_frame
from scaigrid.modules.scaibunker.bunkers.processes import incomplete_utf8_tail


def test_a_character_split_across_chunks_is_sent_whole_with_its_offset() -> None:
    cursor = _StreamCursor("utf8")
    euro = "€".encode()
    assert cursor.feed(b"a" + euro[:1]) == [{"seq": 0, "data": "a"}]
    assert cursor.feed(euro[1:2]) == []
    assert cursor.feed(euro[2:] + b"b") == [{"seq": 1, "data": "€b"}]
    assert cursor.finish() == []


def test_a_truncated_character_at_the_end_becomes_a_replacement() -> None:
    cursor = _StreamCursor("utf8")
    assert cursor.feed(b"ok\xe2\x82") == [{"seq": 0, "data": "ok"}]
    assert cursor.finish() == [{"seq": 2, "data": "\ufffd"}]


def test_a_gap_moves_the_offset_past_the_dropped_bytes() -> None:
    cursor = _StreamCursor("base64")
    assert cursor.feed(b"abc") == [{"seq": 0, "data": base64.b64encode(b"abc").decode()}]
    # The agent dropped bytes 3..9: the next chunk starts at offset 10.
    cursor.gaps.append((10, 7))
    assert cursor.feed(b"xyz") == [{"seq": 10, "data": base64.b64encode(b"xyz").decode()}]


def test_a_gap_flushes_a_pending_partial_character() -> None:
    cursor = _StreamCursor("utf8")
    assert cursor.feed(b"a\xe2") == [{"seq": 0, "data": "a"}]
    cursor.gaps.append((100, 98))
    assert cursor.feed(b"z") == [{"seq": 1, "data": "\ufffd"}, {"seq": 100, "data": "z"}]


def test_a_gap_announced_early_waits_for_the_bytes_before_it() -> None:
    cursor = _StreamCursor("utf8")
    cursor.gaps.append((20, 10))
    assert cursor.feed(b"0123456789") == [{"seq": 0, "data": "0123456789"}]
    assert cursor.feed(b"z") == [{"seq": 20, "data": "z"}]


def test_sse_frame_is_one_event_and_one_json_data_line() -> None:
    assert sse_frame("stdout", {"seq": 0, "data": "a\nb"}) == (
        b'event: stdout\ndata: {"seq":0,"data":"a\\nb"}\n\n'
    )


def test_incomplete_utf8_tail() -> None:
    euro = "€".encode()
    assert incomplete_utf8_tail(b"abc") == 0
    assert incomplete_utf8_tail(b"a" + euro) == 0
    assert incomplete_utf8_tail(b"a" + euro[:2]) == 2
    assert incomplete_utf8_tail(b"a" + euro[:1]) == 1
    assert incomplete_utf8_tail(b"\x80\x80\x80\x80") == 0
    assert incomplete_utf8_tail(b"\xff") == 0


def test_head_tail_counts_dropped_bytes_as_omitted_and_never_spans_the_hole() -> None:
    sink = HeadTail(8)
    sink.feed(b"ab")
    sink.skip(100)
    sink.feed(b"0123456789")
    assert sink.truncated and sink.total == 112
    assert (bytes(sink.head), bytes(sink.tail)) == (b"ab", b"6789")
    assert sink.render("utf8") == "ab\n[... 106 bytes omitted ...]\n6789"

"""Head-and-tail output capping of foreground execs (SPEC §3.4)."""

from __future__ import annotations

import base64

from scaigrid.modules.scaibunker.bunkers.exec import HeadTail


def test_small_output_is_kept_whole() -> None:
    sink = HeadTail(100)
    sink.feed(b"hello ")
    sink.feed(b"world")
    assert sink.render("utf8") == "hello world"
    assert not sink.truncated


def test_large_output_keeps_head_and_tail_with_marker() -> None:
    sink = HeadTail(10)
    for chunk in (b"0123456789", b"abcdefghij", b"KLMNOPQRST"):
        sink.feed(chunk)
    assert sink.truncated
    assert sink.render("utf8") == "01234\n[... 20 bytes omitted ...]\nPQRST"
    assert base64.b64decode(sink.render("base64")) == b"01234PQRST"


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    sink = HeadTail(100)
    sink.feed(b"ok \xff\xfe end")
    assert sink.render("utf8") == "ok \ufffd\ufffd end"
    assert base64.b64decode(sink.render("base64")) == b"ok \xff\xfe end"

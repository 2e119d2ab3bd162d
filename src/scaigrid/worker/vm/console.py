"""The serial console of a microVM, read from the VMM's stdout into a bounded tail.

The agent logs ``agent.ready`` on the console (its stderr is ``/dev/console``) once it
serves: that line ends a driver's boot wait. A failed boot is explained by the tail plus
the *key lines* (kernel panics, init errors) seen anywhere in the output, which a long
stack trace would otherwise push out of the tail. Lines are capped, control characters
removed: the console is guest output, hence hostile, and ends up in error messages.
"""

from __future__ import annotations

import asyncio
import collections
import re

#: Console line (from the agent's log) that ends the boot wait.
READY_MARKER = b"agent.ready"
TAIL_LINES = 40
LINE_MAX = 512
KEY_MARKERS = ("Kernel panic", "scaibunker-init:", "Traceback", "Error")
_CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")


def clean(raw: bytes) -> str:
    """``raw`` as text without control characters (tabs and newlines kept)."""
    return _CONTROL.sub(b"", raw).decode("utf-8", errors="replace")


class Console:
    """Bounded console tail of one VM, with the ready flag."""

    def __init__(self) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.key_lines: collections.deque[str] = collections.deque(maxlen=4)
        self.ready = asyncio.Event()

    async def read(self, stream: asyncio.StreamReader) -> None:
        """Consume ``stream`` until EOF (always reading, so the VMM never blocks on it)."""
        while True:
            try:
                line = await stream.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                line = exc.partial
                if not line:
                    return
            except asyncio.LimitOverrunError as exc:
                line = await stream.readexactly(exc.consumed)
            if READY_MARKER in line and not self.ready.is_set():
                self.ready.set()
            text = clean(line[:LINE_MAX]).rstrip()
            if any(marker in text for marker in KEY_MARKERS):
                self.key_lines.append(text)
            self.lines.append(text)

    def tail(self, lines: int = 8) -> str:
        """Key lines, then the last ``lines`` lines, joined by `` | ``."""
        last = list(self.lines)[-lines:]
        key = [line for line in self.key_lines if line not in last]
        return " | ".join([*key, *(["..."] if key else []), *last])

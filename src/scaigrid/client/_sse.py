"""Server-Sent Events framing for the streaming exec (SPEC §3.5; WHATWG HTML §9.2 event
stream format, restricted to what the server sends: ``event:`` and one ``data:`` line per
frame, ``:`` comment lines as keepalive).

An ``event: error`` frame carries the SPEC §1.5 error object; it becomes the typed
exception of its code.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from scaigrid.client.errors import ProtocolError, error_for


class SSEParser:
    """Feeds lines in, yields ``(event, data)`` once a frame is complete."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, dict[str, Any]] | None:
        """Take one line (without its end-of-line); return a complete frame, if any.

        Raises:
            ProtocolError: a frame's data is not a JSON object.
            ScaiGridAPIError: an ``error`` frame (typed by its code).
        """
        if line.startswith(":"):
            return None
        if line:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                self._event = value
            elif name == "data":
                self._data.append(value)
            return None
        if not self._data:
            self._event = ""
            return None
        event, raw = self._event or "message", "\n".join(self._data)
        self._event, self._data = "", []
        if raw == "[DONE]":
            return None
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ProtocolError(f"an event-stream frame is not JSON: {raw[:200]!r}") from exc
        if not isinstance(data, dict):
            raise ProtocolError(f"an event-stream frame is not a JSON object: {raw[:200]!r}")
        if event == "error":
            code = str(data.get("code", "INTERNAL_ERROR"))
            given = data.get("status_code")
            status = given if isinstance(given, int) else 500
            raise error_for(code, status)(
                code, str(data.get("message", "the stream failed")), status, data.get("details")
            )
        return event, data


def frames(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The frames of an event stream given as lines."""
    parser = SSEParser()
    for line in lines:
        frame = parser.feed(line)
        if frame is not None:
            yield frame


async def aframes(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """The frames of an event stream given as asynchronous lines."""
    parser = SSEParser()
    async for line in lines:
        frame = parser.feed(line)
        if frame is not None:
            yield frame

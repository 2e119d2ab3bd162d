"""Bounded per-stream output buffer addressed by absolute byte offset (SPEC §3.6).

A process's stdout and stderr are each drained into one :class:`RingBuffer` as soon as
they are readable, so the process never blocks on a full pipe. Readers ask for bytes
from an absolute stream offset; when the buffer has already overwritten that offset,
the read starts at the oldest byte still held and reports how many were dropped.
"""

from __future__ import annotations


class RingBuffer:
    """Keeps the last ``capacity`` bytes of a byte stream.

    Storage grows with the data up to ``capacity`` (small outputs cost little), then
    wraps. ``end`` counts every byte ever written.

    Args:
        capacity: bytes kept at most (> 0).
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.end = 0
        self._buf = bytearray()
        self._released = False

    @property
    def start(self) -> int:
        """Offset of the oldest byte still held."""
        if self._released:
            return self.end
        return max(0, self.end - self.capacity)

    @property
    def held_bytes(self) -> int:
        """Memory the buffer uses for data."""
        return len(self._buf)

    def write(self, data: bytes) -> None:
        """Append ``data``, overwriting the oldest bytes beyond ``capacity``."""
        size = len(data)
        if size == 0:
            return
        if self._released:
            self.end += size
            return
        cap = self.capacity
        if size > cap:
            self.end += size - cap
            data = data[-cap:]
            size = cap
        buf = self._buf
        if len(buf) < cap:
            if len(buf) == self.end and self.end + size <= cap:
                buf += data
                self.end += size
                return
            buf.extend(bytes(cap - len(buf)))
        pos = self.end % cap
        first = min(size, cap - pos)
        buf[pos : pos + first] = data[:first]
        if first < size:
            buf[: size - first] = data[first:]
        self.end += size

    def read(self, offset: int, max_bytes: int) -> tuple[int, bytes]:
        """Return ``(actual_offset, data)``: up to ``max_bytes`` from ``offset`` on.

        ``actual_offset`` is ``offset``, or :attr:`start` when those bytes were already
        overwritten (the caller computes ``dropped = actual_offset - offset``). Reading
        at or past :attr:`end` returns no data.
        """
        offset = min(max(offset, self.start), self.end)
        size = min(max_bytes, self.end - offset)
        if size <= 0:
            return offset, b""
        cap = self.capacity
        pos = offset % cap
        first = min(size, cap - pos)
        data = bytes(self._buf[pos : pos + first])
        if first < size:
            data += self._buf[: size - first]
        return offset, data

    def release(self) -> None:
        """Free the stored bytes; later reads see them as dropped, ``end`` keeps counting."""
        self._released = True
        self._buf = bytearray()

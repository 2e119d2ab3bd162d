"""Platform rate limits (SPEC §1.6): sliding 60-second windows per API key, user, tenant and
partner; every level is checked and the most restrictive one decides.

Two interchangeable backends behind :class:`RateLimiter`:

* :class:`MemoryRateLimiter` — in-process (the embedded default, one controller process).
* :class:`RedisRateLimiter` — one Lua script per request over Redis sorted sets, so several
  controller processes sharing one Redis count together. Time is Redis's own clock.

A request is counted at every level only when it is admitted: a rejected request does not
use up the window.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis

from scaigrid import errors

#: Length of the sliding window, in seconds.
WINDOW_S = 60


@dataclass(frozen=True, slots=True)
class Level:
    """One limit: ``key`` names the counter (e.g. ``user:usr_…``), ``limit`` per window."""

    key: str
    limit: int


@dataclass(frozen=True, slots=True)
class Decision:
    """Outcome of :meth:`RateLimiter.hit` for the most restrictive level.

    Attributes:
        allowed: the request may proceed.
        limit: that level's limit per window.
        remaining: requests left in that level's window after this one.
        reset_s: seconds until that level's oldest counted request leaves the window.
    """

    allowed: bool
    limit: int
    remaining: int
    reset_s: int

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The ``X-Scaigrid-Ratelimit-*`` response headers as raw ASGI header pairs
        (``Retry-After`` comes with the 429 error itself)."""
        return [
            (b"x-scaigrid-ratelimit-limit", str(self.limit).encode()),
            (b"x-scaigrid-ratelimit-remaining", str(self.remaining).encode()),
            (b"x-scaigrid-ratelimit-reset", str(self.reset_s).encode()),
        ]

    def raise_if_denied(self) -> None:
        """Raise 429 ``RATE_LIMITED`` (``retry_after`` = ``reset_s``) when not allowed."""
        if not self.allowed:
            raise errors.RateLimited(
                f"Rate limit of {self.limit} requests per {WINDOW_S} s reached",
                retry_after=self.reset_s,
            )


def _decide(
    counts: list[int], oldest_ms: list[float], levels: list[Level], now_ms: float
) -> Decision:
    """Pick the deciding level: a full one if any (the one freeing up last), else the one with
    the fewest requests left. ``counts`` include this request when it was admitted."""
    window_ms = WINDOW_S * 1000
    resets = [max(1, math.ceil((o + window_ms - now_ms) / 1000)) for o in oldest_ms]
    full = [i for i, level in enumerate(levels) if counts[i] > level.limit]
    if full:
        i = max(full, key=lambda j: resets[j])
        return Decision(False, levels[i].limit, 0, resets[i])
    i = min(range(len(levels)), key=lambda j: levels[j].limit - counts[j])
    return Decision(True, levels[i].limit, levels[i].limit - counts[i], resets[i])


class RateLimiter(Protocol):
    """A sliding-window counter shared by every request of the app."""

    async def hit(self, levels: list[Level]) -> Decision:
        """Count one request against every level when all have room; say what decided."""

    async def close(self) -> None:
        """Release connections."""


class MemoryRateLimiter:
    """In-process sliding windows (timestamps per counter key, monotonic clock)."""

    def __init__(self) -> None:
        self._hits: dict[str, deque[float]] = {}

    async def hit(self, levels: list[Level]) -> Decision:
        """See :meth:`RateLimiter.hit`; atomic because it never awaits."""
        now_ms = time.monotonic() * 1000
        horizon = now_ms - WINDOW_S * 1000
        windows = []
        for level in levels:
            window = self._hits.setdefault(level.key, deque())
            while window and window[0] <= horizon:
                window.popleft()
            windows.append(window)
        admitted = all(len(w) < level.limit for w, level in zip(windows, levels, strict=True))
        if admitted:
            for window in windows:
                window.append(now_ms)
        counts = [len(w) + (0 if admitted else 1) for w in windows]
        oldest = [w[0] if w else now_ms for w in windows]
        for key in [k for k, w in self._hits.items() if not w]:
            del self._hits[key]
        return _decide(counts, oldest, levels, now_ms)

    async def close(self) -> None:
        """Nothing to release."""


# KEYS: one sorted set per level. ARGV: window_ms, member, then one limit per key.
# Returns {now_ms, admitted, count_1, oldest_1, ...}; count_i includes this request (counted
# or, when refused, as if it had been), like MemoryRateLimiter.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local counts = {}
local admitted = 1
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  counts[i] = redis.call('ZCARD', key)
  if counts[i] >= tonumber(ARGV[2 + i]) then admitted = 0 end
end
local out = {now, admitted}
for i, key in ipairs(KEYS) do
  if admitted == 1 then
    redis.call('ZADD', key, now, ARGV[2])
    redis.call('PEXPIRE', key, window)
  end
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  out[#out + 1] = counts[i] + 1
  out[#out + 1] = tonumber(oldest[2] or now)
end
return out
"""


class RedisRateLimiter:
    """Sliding windows in Redis sorted sets under ``prefix`` (one Lua script per request).

    Args:
        url: ``redis://host:port/db``.
        prefix: prepended to every counter key (e.g. ``scaigrid:rl:``).
        timeout_s: socket timeout of each Redis call, in seconds.
    """

    def __init__(self, url: str, prefix: str, timeout_s: float = 2.0) -> None:
        self.prefix = prefix
        self._redis: Redis = Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._script = self._redis.register_script(_SCRIPT)

    async def hit(self, levels: list[Level]) -> Decision:
        """See :meth:`RateLimiter.hit`.

        Raises:
            redis.RedisError: Redis is unreachable or failed.
        """
        member = secrets.token_hex(8)
        keys = [self.prefix + level.key for level in levels]
        args: list[int | str] = [WINDOW_S * 1000, member, *(level.limit for level in levels)]
        out = [int(v) for v in await self._script(keys=keys, args=args)]
        # out[1] (admitted) is implied: a count past its limit means the request was refused.
        return _decide(out[2::2], [float(v) for v in out[3::2]], levels, float(out[0]))

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()

"""One leader across controller processes for the module's background loops (SPEC §10.6).

With Redis (``SCAIGRID_REDIS_URL``) the leader holds the key ``{redis_prefix}scaibunker:leader``
with a time-to-live; every pass of a loop renews it (or takes it over once the holder stopped
renewing for :attr:`Leadership.ttl_s` seconds). Without Redis the embedded deployment runs a
single controller process, which is the leader.
"""

from __future__ import annotations

import secrets
from typing import Final

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)

#: Keep the lock if we hold it, else take it if free; 1 = we lead.
_CLAIM: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
"""
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Leadership:
    """Leader election over one Redis key.

    Args:
        redis_url: ``redis://host:port/db``, or None for the single-process deployment.
        key: the lock key.
        ttl_s: seconds a leader keeps the lock without renewing it.
        timeout_s: socket timeout of each Redis call, in seconds.
    """

    def __init__(
        self, redis_url: str | None, key: str, ttl_s: float = 15.0, timeout_s: float = 2.0
    ) -> None:
        self.key = key
        self.ttl_s = ttl_s
        self.token = secrets.token_hex(16)
        self._redis: Redis | None = None
        if redis_url is not None:
            self._redis = Redis.from_url(
                redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
            )
        self._leading = self._redis is None

    async def claim(self) -> bool:
        """Renew or take the lock; return True while this process leads.

        A Redis failure counts as not leading (logged), so two processes never both act on
        a lock neither can see.
        """
        if self._redis is None:
            return True
        try:
            held = await self._redis.eval(_CLAIM, 1, self.key, self.token, int(self.ttl_s * 1000))
        except RedisError as exc:
            log.warning("leadership_unavailable", key=self.key, error=str(exc))
            held = 0
        leading = bool(held)
        if leading != self._leading:
            log.info("leadership_changed", key=self.key, leading=leading)
        self._leading = leading
        return leading

    async def close(self) -> None:
        """Give the lock up (if held) and close the Redis connection."""
        if self._redis is None:
            return
        try:
            await self._redis.eval(_RELEASE, 1, self.key, self.token)
        except RedisError as exc:
            log.warning("leadership_release_failed", key=self.key, error=str(exc))
        await self._redis.aclose()

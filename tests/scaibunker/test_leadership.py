"""Leader election of the background loops over a real Redis (SPEC §10.6)."""

from __future__ import annotations

import asyncio

from scaigrid.modules.scaibunker.leadership import Leadership


async def test_one_leader_and_takeover_after_the_ttl(redis_url: str, redis_prefix: str) -> None:
    key = f"{redis_prefix}scaibunker:leader"
    first = Leadership(redis_url, key, ttl_s=0.5)
    second = Leadership(redis_url, key, ttl_s=0.5)
    try:
        assert await first.claim() is True
        assert await second.claim() is False
        assert await first.claim() is True
        await asyncio.sleep(0.8)
        assert await second.claim() is True
        assert await first.claim() is False
    finally:
        await second.close()
        await first.close()


async def test_close_hands_the_lock_over_at_once(redis_url: str, redis_prefix: str) -> None:
    key = f"{redis_prefix}scaibunker:leader"
    first = Leadership(redis_url, key, ttl_s=30)
    second = Leadership(redis_url, key, ttl_s=30)
    try:
        assert await first.claim() is True
        await first.close()
        assert await second.claim() is True
    finally:
        await second.close()


async def test_without_redis_the_single_process_leads() -> None:
    alone = Leadership(None, "unused")
    assert await alone.claim() is True
    await alone.close()


async def test_unreachable_redis_means_not_leading() -> None:
    lost = Leadership("redis://127.0.0.1:1/0", "k", timeout_s=0.5)
    assert await lost.claim() is False
    await lost.close()

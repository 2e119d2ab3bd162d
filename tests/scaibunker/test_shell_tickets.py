"""Shell tickets and upgrade parameters (SPEC §5.1-5.2), controller side."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from scaigrid import errors
from scaigrid.modules.scaibunker.bunkers import shell
from scaigrid.modules.scaibunker.bunkers.shell import ShellRequest


class _Settings:
    def __init__(self, redis_url: str | None, redis_prefix: str = "") -> None:
        self.redis_url = redis_url
        self.redis_prefix = redis_prefix


class _State:
    """Stands for the module state: the ticket registry is keyed by it (weakly) and reads
    only its settings."""

    def __init__(self, redis_url: str | None = None, redis_prefix: str = "") -> None:
        self.settings = _Settings(redis_url, redis_prefix)


class _Principal:
    user_id = "usr_1"


async def _one_use_and_bound(state: Any) -> None:
    minted = await shell.mint_ticket(state, _Principal(), "bnk_a")  # type: ignore[arg-type]
    assert minted["ticket"].startswith("sbt_") and minted["expires_at"].endswith("Z")
    with pytest.raises(errors.AuthTokenInvalid):
        await shell.redeem_ticket(state, minted["ticket"], "bnk_other")
    # A refused redemption still consumes it: tickets are never tried twice.
    with pytest.raises(errors.AuthTokenInvalid):
        await shell.redeem_ticket(state, minted["ticket"], "bnk_a")
    fresh = await shell.mint_ticket(state, _Principal(), "bnk_a")  # type: ignore[arg-type]
    assert await shell.redeem_ticket(state, fresh["ticket"], "bnk_a") == "usr_1"
    with pytest.raises(errors.AuthTokenInvalid):
        await shell.redeem_ticket(state, fresh["ticket"], "bnk_a")
    with pytest.raises(errors.AuthTokenInvalid):
        await shell.redeem_ticket(state, "sbt_never-minted", "bnk_a")


async def test_ticket_in_memory_is_one_use_bound_and_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state: Any = _State()
    now = [1000.0]
    monkeypatch.setattr(shell.time, "monotonic", lambda: now[0])
    await _one_use_and_bound(state)
    late = await shell.mint_ticket(state, _Principal(), "bnk_a")  # type: ignore[arg-type]
    now[0] += shell.TICKET_TTL_S + 0.001
    with pytest.raises(errors.AuthTokenInvalid):
        await shell.redeem_ticket(state, late["ticket"], "bnk_a")
    stale = await shell.mint_ticket(state, _Principal(), "bnk_a")  # type: ignore[arg-type]
    now[0] += shell.TICKET_TTL_S + 0.001
    await shell.mint_ticket(state, _Principal(), "bnk_a")  # type: ignore[arg-type]
    assert stale["ticket"] not in shell.registry(state).tickets  # expired ones are swept


async def test_ticket_in_redis_is_one_use_bound_and_expires(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    state: Any = _State(redis_url, redis_prefix)
    registry = shell.registry(state)
    assert registry.redis is not None
    try:
        await _one_use_and_bound(state)
        assert not registry.tickets
        # Another replica (its own registry) redeems a ticket this one minted.
        other: Any = _State(redis_url, redis_prefix)
        minted = await shell.mint_ticket(state, _Principal(), "bnk_a")  # type: ignore[arg-type]
        assert await shell.redeem_ticket(other, minted["ticket"], "bnk_a") == "usr_1"
        await shell.registry(other).redis.aclose()  # type: ignore[union-attr]
        monkeypatch.setattr(shell, "TICKET_TTL_S", 0.2)
        late = await shell.mint_ticket(state, _Principal(), "bnk_a")  # type: ignore[arg-type]
        await asyncio.sleep(0.4)
        with pytest.raises(errors.AuthTokenInvalid):
            await shell.redeem_ticket(state, late["ticket"], "bnk_a")
    finally:
        await registry.redis.aclose()


def test_shell_request_parse() -> None:
    parsed = ShellRequest.parse({"cols": "120", "rows": "40", "session": "shs_01ABC"})
    assert (parsed.cols, parsed.rows, parsed.user, parsed.session) == (120, 40, "user", "shs_01ABC")
    for bad in (
        {"cols": "0"},
        {"rows": "1001"},
        {"cols": "-1"},
        {"user": "admin"},
        {"session": "bnk_1"},
        {"session": "shs_../x"},
        {"command": ""},
        {"offset": "x"},
    ):
        with pytest.raises(errors.ValidationFailed):
            ShellRequest.parse(bad)

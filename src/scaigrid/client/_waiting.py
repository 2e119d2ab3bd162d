"""Polling for ``bunkers.wait_running``, shared by the sync and async clients."""

from __future__ import annotations

from collections.abc import Iterator

from scaigrid.client.errors import BunkerStopped, WaitTimeout
from scaigrid.client.models import TERMINAL_STATES, Bunker

FIRST_POLL_S = 0.25
MAX_POLL_S = 2.0


def poll_delays(poll_interval_s: float | None) -> Iterator[float]:
    """Seconds to sleep between polls: ``poll_interval_s`` every time when given, else
    0.25 s growing by half each poll up to 2 s."""
    delay = poll_interval_s or FIRST_POLL_S
    while True:
        yield delay
        if poll_interval_s is None:
            delay = min(delay * 1.5, MAX_POLL_S)


def is_running(bunker: Bunker) -> bool:
    """True when ``bunker`` is ``running``; False while it may still get there.

    Raises:
        BunkerStopped: the bunker is ``stopping`` or terminal, so it never will.
    """
    if bunker.status == "running":
        return True
    if bunker.status == "stopping" or bunker.status in TERMINAL_STATES:
        reason = f" ({bunker.status_reason})" if bunker.status_reason else ""
        raise BunkerStopped(
            f"bunker {bunker.id} is {bunker.status}{reason} instead of running", bunker
        )
    return False


def timed_out(bunker: Bunker, timeout_s: float) -> WaitTimeout:
    """The error for a bunker still not ``running`` after ``timeout_s`` seconds."""
    return WaitTimeout(f"bunker {bunker.id} is still {bunker.status} after {timeout_s:g} s", bunker)

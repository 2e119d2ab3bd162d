"""Shell tickets and upgrade parameters (SPEC §5.1-5.2), controller side."""

from __future__ import annotations

from typing import Any

import pytest

from scaigrid import errors
from scaigrid.modules.scaibunker.bunkers import shell
from scaigrid.modules.scaibunker.bunkers.shell import ShellRequest


class _State:
    """Stands for the module state: the ticket registry is keyed by it (weakly)."""


class _Principal:
    user_id = "usr_1"


def test_ticket_is_one_use_bound_and_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    state: Any = _State()
    now = [1000.0]
    monkeypatch.setattr(shell.time, "monotonic", lambda: now[0])
    minted = shell.mint_ticket(state, _Principal(), "bnk_a")  # type: ignore[arg-type]
    assert minted["ticket"].startswith("sbt_") and minted["expires_at"].endswith("Z")
    with pytest.raises(errors.AuthTokenInvalid):
        shell.redeem_ticket(state, minted["ticket"], "bnk_other")
    # A refused redemption still consumes it: tickets are never tried twice.
    with pytest.raises(errors.AuthTokenInvalid):
        shell.redeem_ticket(state, minted["ticket"], "bnk_a")
    fresh = shell.mint_ticket(state, _Principal(), "bnk_a")  # type: ignore[arg-type]
    assert shell.redeem_ticket(state, fresh["ticket"], "bnk_a") == "usr_1"
    with pytest.raises(errors.AuthTokenInvalid):
        shell.redeem_ticket(state, fresh["ticket"], "bnk_a")
    late = shell.mint_ticket(state, _Principal(), "bnk_a")  # type: ignore[arg-type]
    now[0] += shell.TICKET_TTL_S + 0.001
    with pytest.raises(errors.AuthTokenInvalid):
        shell.redeem_ticket(state, late["ticket"], "bnk_a")
    shell.mint_ticket(state, _Principal(), "bnk_a")  # type: ignore[arg-type]
    assert late["ticket"] not in shell.registry(state).tickets  # expired ones are swept


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

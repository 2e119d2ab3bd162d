"""The bunker state machine (SPEC §2.4)."""

from __future__ import annotations

import itertools

import pytest

from scaigrid.modules.scaibunker.bunkers.states import ALLOWED, TERMINAL, IllegalTransition


def test_terminal_states_have_no_way_out() -> None:
    assert not [pair for pair in ALLOWED if pair[0] in TERMINAL]


@pytest.mark.parametrize(
    ("frm", "to"),
    [
        ("pending", "running"),
        ("terminated", "running"),
        ("stopping", "running"),
        ("failed", "pending"),
    ],
)
def test_illegal_transitions_are_not_allowed(frm: str, to: str) -> None:
    assert (frm, to) not in ALLOWED


def test_happy_path_is_allowed() -> None:
    path = ["pending", "provisioning", "running", "stopping", "terminated"]
    assert all(pair in ALLOWED for pair in itertools.pairwise(path))


def test_illegal_transition_is_a_409() -> None:
    assert IllegalTransition.status_code == 409

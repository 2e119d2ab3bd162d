"""The bunker state machine (SPEC §2.4): legal transitions, stored with reason and time."""

from __future__ import annotations

import asyncio
import weakref
from datetime import datetime
from typing import Final

from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.modules.scaibunker.bunkers.models import Bunker, BunkerStatusEvent
from scaigrid.platform.db import utcnow
from scaigrid.platform.events.service import emit

TERMINAL: Final = frozenset({"terminated", "failed", "expired"})
EXEC_READY: Final = frozenset({"running"})
_LIVE: Final = ("pending", "provisioning", "running", "paused")

ALLOWED: Final[frozenset[tuple[str, str]]] = frozenset(
    {
        ("pending", "provisioning"),
        ("provisioning", "running"),
        ("running", "paused"),
        ("paused", "running"),
        *((state, "stopping") for state in _LIVE),
        ("stopping", "terminated"),
        ("stopping", "expired"),
        *((state, "failed") for state in _LIVE),
        ("provisioning", "pending"),
        ("running", "pending"),
        ("paused", "pending"),
    }
)


_LOCKS: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


def bunker_lock(bunker_id: str) -> asyncio.Lock:
    """The in-process lock of one bunker's state.

    Hold it around read-check-transition-commit so two tasks of this process (a provision
    step and a terminate, say) cannot both act on the same stale state; callers re-read the
    bunker inside it. Between controller processes on PostgreSQL or MariaDB the row lock
    taken by re-reading ``with_for_update`` does the same.
    """
    lock = _LOCKS.get(bunker_id)
    if lock is None:
        lock = asyncio.Lock()
        _LOCKS[bunker_id] = lock
    return lock


class IllegalTransition(errors.Conflict):
    """A state change the machine does not allow (409)."""

    code = "BUNKER_NOT_RUNNING"


def transition(
    session: AsyncSession,
    bunker: Bunker,
    to: str,
    reason: str,
    *,
    message: str | None = None,
    at: datetime | None = None,
) -> None:
    """Move ``bunker`` to state ``to`` and record ``{from, to, reason, at}``.

    The caller commits the session.

    Raises:
        IllegalTransition: ``(bunker.status, to)`` is not in :data:`ALLOWED`.
    """
    if (bunker.status, to) not in ALLOWED:
        raise IllegalTransition(
            f"bunker {bunker.id} cannot go from {bunker.status} to {to}",
            details={"from": bunker.status, "to": to},
        )
    when = at or utcnow()
    session.add(
        BunkerStatusEvent(
            bunker_id=bunker.id,
            from_status=bunker.status,
            to_status=to,
            reason=reason,
            message=message,
            at=when,
        )
    )
    _emit_state_changed(session, bunker, bunker.status, to, reason, when)
    bunker.status = to
    bunker.status_reason = reason
    bunker.status_message = message
    bunker.status_changed_at = when
    if to == "running" and bunker.started_at is None:
        bunker.started_at = when
    if to in TERMINAL:
        bunker.ended_at = when


def _emit_state_changed(
    session: AsyncSession, bunker: Bunker, from_: str | None, to: str, reason: str, at: datetime
) -> None:
    """Emit ``scaibunker.bunker.state_changed`` (SPEC §1.8) with the transition."""
    emit(
        session,
        "scaibunker.bunker.state_changed",
        bunker.tenant_id,
        {
            "bunker_id": bunker.id,
            "tenant_id": bunker.tenant_id,
            "owner_user_id": bunker.owner_user_id,
            "from": from_,
            "to": to,
            "reason": reason,
            "at": at.isoformat().replace("+00:00", "Z"),
        },
        source="scaibunker",
    )


def record_creation(session: AsyncSession, bunker: Bunker) -> None:
    """Record the initial ``— → pending`` change of a new bunker."""
    session.add(
        BunkerStatusEvent(
            bunker_id=bunker.id,
            from_status=None,
            to_status="pending",
            reason="created",
            at=bunker.created_at,
        )
    )
    _emit_state_changed(session, bunker, None, "pending", "created", bunker.created_at or utcnow())

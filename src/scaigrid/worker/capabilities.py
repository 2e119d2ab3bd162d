"""Storage capabilities the worker holds, renewed before they expire (SPEC §10.4, §10.6).

A capability arrives in a task's params or, when the worker has none or the one it holds
expires within :data:`REFRESH_MARGIN_S`, through ``capability_request`` /
``capability_grant`` on the link (:meth:`~scaigrid.worker.link.client.LinkClient.
request_capability`). :class:`CapabilityBroker` caches one grant per ``(purpose, id)`` so a
long upload, or a stream of audit batches, never starts with a token about to run out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from scaigrid.worker.link.tasks import TaskFailed

#: A grant expiring within this many seconds is renewed before use.
REFRESH_MARGIN_S: Final = 120.0


class Requester(Protocol):
    """Sends ``capability_request`` and returns the grant (``LinkClient.request_capability``)."""

    def __call__(
        self,
        purpose: str,
        *,
        bunker_id: str | None = None,
        image_id: str | None = None,
        snapshot_id: str | None = None,
    ) -> Awaitable[dict[str, Any]]: ...


@dataclass(frozen=True)
class Grant:
    """A capability ``token`` valid until ``expires_at`` (unix seconds) at ``storage_url``."""

    token: str
    expires_at: float
    storage_url: str

    def fresh(self, margin_s: float) -> bool:
        """True while the grant is valid for at least ``margin_s`` more seconds."""
        return self.expires_at - time.time() > margin_s


class CapabilityBroker:
    """Cache of grants per ``(purpose, bunker_id or image_id)``.

    Args:
        requester: asks the controller for a grant; ``None`` until the link exists (set
            :attr:`requester` later), in which case only offered grants are usable.
        margin_s: renew grants that expire within this many seconds.
    """

    def __init__(
        self, requester: Requester | None = None, *, margin_s: float = REFRESH_MARGIN_S
    ) -> None:
        self.requester = requester
        self.margin_s = margin_s
        self._grants: dict[tuple[str, str], Grant] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def offer(self, purpose: str, subject: str, grant: Mapping[str, Any]) -> None:
        """Keep a grant that came with a task (``{capability, expires_at, storage_url}``);
        ignored when incomplete."""
        token, expires = grant.get("capability"), grant.get("expires_at")
        url = grant.get("storage_url")
        if isinstance(token, str) and isinstance(expires, int | float) and isinstance(url, str):
            self._grants[(purpose, subject)] = Grant(token, float(expires), url)

    async def get(self, purpose: str, subject: str, *, force: bool = False) -> Grant:
        """A grant for ``purpose`` on ``subject`` valid for at least ``margin_s`` seconds.

        Args:
            purpose: ``audit`` (subject: bunker id), ``image_artifact`` (subject: image id)
                or ``snapshot_layer`` / ``snapshot_manifest`` (subject: snapshot id).
            subject: the bunker, image or snapshot id.
            force: ask for a new grant even if the cached one looks fresh (it was refused).

        Raises:
            TaskFailed: no requester and no fresh grant (``OBJECT_STORE_UNAVAILABLE``), or
                the controller refused or did not answer.
        """
        key = (purpose, subject)
        async with self._locks.setdefault(key, asyncio.Lock()):
            cached = self._grants.get(key)
            if cached is not None and not force and cached.fresh(self.margin_s):
                return cached
            if self.requester is None:
                raise TaskFailed("OBJECT_STORE_UNAVAILABLE", f"no {purpose} capability held")
            if purpose == "audit":
                ids = {"bunker_id": subject}
            elif purpose.startswith("snapshot_"):
                ids = {"snapshot_id": subject}
            else:
                ids = {"image_id": subject}
            answer = await self.requester(purpose, **ids)
            grant = Grant(
                str(answer["capability"]), float(answer["expires_at"]), str(answer["storage_url"])
            )
            self._grants[key] = grant
            return grant

    def refresher(self, purpose: str, subject: str) -> Callable[[], Awaitable[str]]:
        """A callable answering a newly requested token (``ObjectClient``'s ``refresh``)."""

        async def refresh() -> str:
            return (await self.get(purpose, subject, force=True)).token

        return refresh

    def forget(self, purpose: str, subject: str) -> None:
        """Drop the cached grant of ``(purpose, subject)`` (e.g. a bunker that is gone)."""
        self._grants.pop((purpose, subject), None)
        self._locks.pop((purpose, subject), None)

"""Emitting events and delivering them to webhooks (SPEC §1.8).

* :func:`emit` adds an :class:`Event` to the caller's session, so an event exists exactly
  when the change that caused it is committed (a transactional outbox).
* :class:`WebhookDispatcher` (one background task per controller) fans new events out into
  one :class:`WebhookDelivery` per matching webhook of the event's tenant and posts each one:
  JSON envelope body, HMAC-SHA256 signature, 10 s timeout, a 2xx answer within it counts as
  delivered; otherwise retried after ``retry_base_s * 2**(attempt-1)`` seconds, at most
  ``max_retries`` times, then ``failed``. Delivery is at least once: receivers de-duplicate
  on ``event_id``.

Signature (header ``X-Scaigrid-Signature``): ``t=<unix seconds>,v1=<hex>`` where ``hex`` is
HMAC-SHA256 of ``f"{t}.".encode() + body`` keyed with the webhook secret (the scheme Stripe
uses: the timestamp lets receivers refuse replays).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import socket
import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.platform.db import Database, utcnow
from scaigrid.platform.events.models import Event, Webhook, WebhookDelivery
from scaigrid.platform.tenancy.models import Tenant

log = structlog.get_logger(__name__)

#: Seconds a receiver has to answer (SPEC §1.8).
DELIVERY_TIMEOUT_S = 10.0
SIGNATURE_HEADER = "X-Scaigrid-Signature"
#: Deliveries attempted per dispatcher pass.
BATCH = 100


def emit(
    session: AsyncSession,
    event_type: str,
    tenant_id: str,
    payload: dict[str, Any],
    source: str = "scaigrid",
) -> Event:
    """Record an event in ``session`` (delivered after the caller commits)."""
    event = Event(
        event_type=event_type, source=source, tenant_id=tenant_id, payload=payload, fanned_out=False
    )
    session.add(event)
    return event


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Scaigrid-Signature`` value for ``body`` sent at ``timestamp`` (unix s)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def envelope(event: Event, partner_id: str | None) -> dict[str, Any]:
    """The SPEC §1.8 event envelope."""
    return {
        "event_type": event.event_type,
        "event_id": event.id,
        "source": event.source,
        "tenant_id": event.tenant_id,
        "partner_id": partner_id,
        "payload": event.payload,
        "timestamp": event.timestamp.isoformat().replace("+00:00", "Z"),
    }


async def check_target(url: str, allow_private: bool) -> None:
    """Refuse webhook URLs that are not http(s) or that resolve to loopback, private,
    link-local or otherwise internal addresses (unless ``allow_private``).

    Raises:
        ValidationFailed: bad scheme, no host, unresolvable or internal address (422).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.ValidationFailed(
            "Webhook URLs must be http(s) with a host",
            details=[{"field": "url", "message": "http:// or https:// URL"}],
        )
    if allow_private:
        return
    try:
        infos = await asyncio.to_thread(socket.getaddrinfo, parts.hostname, parts.port or 443)
    except OSError as exc:
        raise errors.ValidationFailed(
            "Webhook host does not resolve", details=[{"field": "url", "message": str(exc)}]
        ) from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise errors.ValidationFailed(
                "Webhook URLs must not point at internal addresses",
                details=[{"field": "url", "message": f"{address} is not a public address"}],
            )


class WebhookDispatcher:
    """Background fan-out and delivery of events (``app.state.webhooks``).

    Args:
        db: the controller database.
        retry_base_s: first retry delay in seconds (doubling per attempt).
        allow_private: deliver to internal addresses too (tests, private deployments).
        poll_interval_s: seconds between passes.
    """

    def __init__(
        self,
        db: Database,
        retry_base_s: float,
        allow_private: bool,
        poll_interval_s: float = 0.5,
    ) -> None:
        self.db = db
        self.retry_base_s = retry_base_s
        self.allow_private = allow_private
        self.poll_interval_s = poll_interval_s
        self._client = httpx.AsyncClient(timeout=DELIVERY_TIMEOUT_S, follow_redirects=False)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the background loop."""
        self._task = asyncio.create_task(self._loop(), name="webhook-dispatcher")

    async def close(self) -> None:
        """Stop the loop and close the HTTP client."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.aclose()

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:
                # One bad pass (database hiccup) must not end deliveries for good.
                log.exception("webhooks.pass_failed")
            await asyncio.sleep(self.poll_interval_s)

    async def run_once(self) -> int:
        """Fan out new events and attempt every due delivery; return attempts made."""
        await self._fan_out()
        async with self.db.sessionmaker() as session:
            due = list(
                await session.scalars(
                    select(WebhookDelivery.id)
                    .where(
                        WebhookDelivery.status == "pending",
                        WebhookDelivery.next_attempt_at <= utcnow(),
                    )
                    .order_by(WebhookDelivery.next_attempt_at)
                    .limit(BATCH)
                )
            )
        await asyncio.gather(*(self._attempt(delivery_id) for delivery_id in due))
        return len(due)

    async def _fan_out(self) -> None:
        async with self.db.sessionmaker() as session:
            events = list(
                await session.scalars(
                    select(Event).where(Event.fanned_out.is_(False)).order_by(Event.id).limit(BATCH)
                )
            )
            for event in events:
                hooks = await session.scalars(
                    select(Webhook).where(
                        Webhook.tenant_id == event.tenant_id, Webhook.active.is_(True)
                    )
                )
                for hook in hooks:
                    if not hook.event_types or event.event_type in hook.event_types:
                        session.add(
                            WebhookDelivery(webhook_id=hook.id, event_id=event.id, status="pending")
                        )
                event.fanned_out = True
            await session.commit()

    async def _attempt(self, delivery_id: str) -> None:
        async with self.db.sessionmaker() as session:
            delivery = await session.get(WebhookDelivery, delivery_id)
            if delivery is None or delivery.status != "pending":
                return
            hook = await session.get(Webhook, delivery.webhook_id)
            event = await session.get(Event, delivery.event_id)
            if hook is None or event is None:
                return
            partner_id = await session.scalar(
                select(Tenant.partner_id).where(Tenant.id == event.tenant_id)
            )
            body = json.dumps(envelope(event, partner_id), separators=(",", ":")).encode()
            headers = {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(hook.secret, int(time.time()), body),
                "X-Scaigrid-Event-Id": event.id,
                "X-Scaigrid-Event-Type": event.event_type,
                "X-Scaigrid-Delivery-Id": delivery.id,
            }
            delivery.attempts += 1
            try:
                await check_target(hook.url, self.allow_private)
                response = await self._client.post(hook.url, content=body, headers=headers)
                delivery.last_status_code = response.status_code
                ok = 200 <= response.status_code < 300
                delivery.last_error = None if ok else f"HTTP {response.status_code}"
            except (httpx.HTTPError, errors.ValidationFailed) as exc:
                ok = False
                delivery.last_error = f"{type(exc).__name__}: {exc}"[:1000]
            if ok:
                delivery.status = "delivered"
                delivery.delivered_at = utcnow()
            elif delivery.attempts > hook.max_retries:
                delivery.status = "failed"
            else:
                delay = self.retry_base_s * 2 ** (delivery.attempts - 1)
                delivery.next_attempt_at = utcnow() + timedelta(seconds=delay)
            await session.commit()
            log.info(
                "webhooks.attempt",
                delivery_id=delivery.id,
                webhook_id=hook.id,
                event_id=event.id,
                attempt=delivery.attempts,
                status=delivery.status,
                status_code=delivery.last_status_code,
            )

"""ORM models of events (an outbox), webhook subscriptions and their delivery log."""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from scaigrid.ids import new_id
from scaigrid.platform.db import ID_LENGTH, Base, UTCDateTime, utcnow


class Event(Base):
    """One emitted event (the SPEC §1.8 envelope). Id ``evt_…``. ``fanned_out`` turns true
    once a delivery row exists for every matching webhook."""

    __tablename__ = "events"

    id: Mapped[str] = mapped_column(
        String(ID_LENGTH), primary_key=True, default=partial(new_id, "evt")
    )
    event_type: Mapped[str] = mapped_column(String(100))
    source: Mapped[str] = mapped_column(String(64))
    tenant_id: Mapped[str] = mapped_column(String(ID_LENGTH), index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    timestamp: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    fanned_out: Mapped[bool] = mapped_column(Boolean, default=False, index=True)


class Webhook(Base):
    """A tenant's subscription. Id ``whk_…``. ``event_types`` empty means every type.
    ``secret`` keys the HMAC-SHA256 signature (it must be kept to sign)."""

    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(
        String(ID_LENGTH), primary_key=True, default=partial(new_id, "whk")
    )
    tenant_id: Mapped[str] = mapped_column(String(ID_LENGTH), ForeignKey("tenants.id"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(128))
    event_types: Mapped[list[Any]] = mapped_column(JSON)
    max_retries: Mapped[int] = mapped_column(Integer, default=5)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookDelivery(Base):
    """One event to one webhook. Id ``dlv_…``. ``status``: ``pending`` (waiting for
    ``next_attempt_at``), ``delivered`` or ``failed`` (retries exhausted)."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(
        String(ID_LENGTH), primary_key=True, default=partial(new_id, "dlv")
    )
    webhook_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("webhooks.id", ondelete="CASCADE"), index=True
    )
    event_id: Mapped[str] = mapped_column(String(ID_LENGTH), ForeignKey("events.id"))
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

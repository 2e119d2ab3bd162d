"""Webhook subscriptions and their delivery log under ``/v1/webhooks`` (SPEC §1.8).

Managed by administrators of the tenant (see
:func:`scaigrid.platform.tenancy.router.administered_tenant`); others' webhooks are 404.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid.ids import new_secret
from scaigrid.platform.auth import CurrentPrincipal, Principal
from scaigrid.platform.db import get_session
from scaigrid.platform.envelope import ok, ok_list
from scaigrid.platform.events.models import Webhook, WebhookDelivery
from scaigrid.platform.events.service import check_target
from scaigrid.platform.pagination import Limit, id_cursor, page
from scaigrid.platform.tenancy.router import (
    administered_page,
    administered_row,
    administered_tenant,
)

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
Session = Annotated[AsyncSession, Depends(get_session)]


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=2048)
    event_types: list[Annotated[str, Field(max_length=100)]] = Field(
        default_factory=list, max_length=100
    )
    max_retries: int = Field(default=5, ge=0, le=20)
    secret: str | None = Field(default=None, min_length=16, max_length=128)
    tenant_id: str | None = Field(default=None, max_length=32)


def _out(hook: Webhook) -> dict[str, object]:
    return {
        "id": hook.id,
        "tenant_id": hook.tenant_id,
        "url": hook.url,
        "event_types": hook.event_types,
        "max_retries": hook.max_retries,
        "active": hook.active,
        "created_at": hook.created_at,
    }


def _delivery_out(d: WebhookDelivery) -> dict[str, object]:
    return {
        "id": d.id,
        "webhook_id": d.webhook_id,
        "event_id": d.event_id,
        "status": d.status,
        "attempts": d.attempts,
        "next_attempt_at": d.next_attempt_at,
        "last_status_code": d.last_status_code,
        "last_error": d.last_error,
        "delivered_at": d.delivered_at,
        "created_at": d.created_at,
    }


async def _hook(session: AsyncSession, principal: Principal, webhook_id: str) -> Webhook:
    return await administered_row(session, principal, Webhook, webhook_id, "webhook")


@router.post("", status_code=201)
async def create_webhook(
    request: Request, body: WebhookIn, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """Subscribe ``url`` to ``event_types`` (empty: all) of ``tenant_id`` (default: the
    caller's). ``data.secret`` (given or generated) is shown only in this answer."""
    tenant = await administered_tenant(session, principal, body.tenant_id or principal.tenant_id)
    await check_target(body.url, request.app.state.settings.webhook_allow_private)
    secret = body.secret or new_secret("whsec")
    hook = Webhook(
        tenant_id=tenant.id,
        url=body.url,
        secret=secret,
        event_types=sorted(set(body.event_types)),
        max_retries=body.max_retries,
        active=True,
    )
    session.add(hook)
    await session.commit()
    return ok({**_out(hook), "secret": secret}, 201)


@router.get("")
async def list_webhooks(
    principal: CurrentPrincipal,
    session: Session,
    tenant_id: str | None = None,
    limit: Limit = 100,
    cursor: Annotated[str | None, id_cursor("whk")] = None,
) -> JSONResponse:
    """Webhooks of ``tenant_id`` (default: the caller's), without secrets."""
    rows, nxt = await administered_page(session, principal, Webhook, tenant_id, limit, cursor)
    return ok_list([_out(h) for h in rows], nxt)


@router.get("/{webhook_id}")
async def get_webhook(
    webhook_id: str, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """One webhook (without its secret)."""
    return ok(_out(await _hook(session, principal, webhook_id)))


@router.delete("/{webhook_id}")
async def delete_webhook(
    webhook_id: str, principal: CurrentPrincipal, session: Session
) -> JSONResponse:
    """Delete a webhook and its delivery log."""
    hook = await _hook(session, principal, webhook_id)
    await session.delete(hook)
    await session.commit()
    return ok({"id": webhook_id, "deleted": True})


@router.get("/{webhook_id}/deliveries")
async def list_deliveries(
    webhook_id: str,
    principal: CurrentPrincipal,
    session: Session,
    limit: Limit = 100,
    cursor: Annotated[str | None, id_cursor("dlv")] = None,
) -> JSONResponse:
    """The webhook's delivery log, newest first."""
    hook = await _hook(session, principal, webhook_id)
    query = select(WebhookDelivery).where(WebhookDelivery.webhook_id == hook.id)
    rows, nxt = await page(session, query, WebhookDelivery.id, limit, cursor)
    return ok_list([_delivery_out(d) for d in rows], nxt)

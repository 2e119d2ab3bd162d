"""``POST /storage/capabilities`` (SPEC §11.2): capabilities minted for users, controller only.

A caller with ``scaibunker:images:manage`` may get ``GET``/``HEAD`` capabilities, for at most
3600 s, on keys (or a prefix) under ``scaibunker/images/{image_id}/`` of an image it may
manage. Every other capability is minted internally for workers. A standalone proxy does not
serve this route (404; the load balancer sends it to the controller).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.modules.scaibunker.images.models import Image
from scaigrid.modules.scaibunker.images.service import may_manage
from scaigrid.modules.scaibunker.storage.capabilities import MAX_TTL_S, validate_key
from scaigrid.modules.scaibunker.storage.service import StorageService
from scaigrid.platform.auth import Principal, require
from scaigrid.platform.db import get_session
from scaigrid.platform.envelope import ok

router = APIRouter(prefix="/storage", tags=["storage"])

ManagerDep = Annotated[Principal, Depends(require("scaibunker:images:manage"))]
SessionDep = Annotated[AsyncSession, Depends(get_session)]


class CapabilityRequest(BaseModel):
    """``{methods, key | prefix, expires_in_s}``."""

    model_config = ConfigDict(extra="forbid")

    methods: list[Literal["GET", "HEAD"]] = Field(min_length=1, max_length=2)
    key: str | None = Field(default=None, max_length=1024)
    prefix: str | None = Field(default=None, max_length=1024)
    expires_in_s: int = Field(default=900, ge=1, le=MAX_TTL_S)

    @model_validator(mode="after")
    def _one_target(self) -> CapabilityRequest:
        if (self.key is None) == (self.prefix is None):
            raise ValueError("give exactly one of key and prefix")
        return self


def _image_id(target: str, *, prefix: bool) -> str:
    validate_key(target, prefix=prefix)
    parts = target.split("/")
    if len(parts) < 4 or parts[1] != "images" or not parts[2]:
        raise errors.ValidationFailed(
            "capabilities may only name keys under scaibunker/images/{image_id}/",
            details=[{"field": "prefix" if prefix else "key", "message": "not an image key"}],
        )
    return parts[2]


@router.post("/capabilities", status_code=201)
async def mint_capability(
    body: CapabilityRequest, request: Request, principal: ManagerDep, session: SessionDep
) -> JSONResponse:
    """201 ``{capability, expires_at}``; 403 for an image the caller may not manage."""
    target = body.key if body.key is not None else body.prefix
    assert target is not None
    image_id = _image_id(target, prefix=body.prefix is not None)
    image = await session.get(Image, image_id)
    if image is None or not may_manage(principal, image):
        raise errors.AuthzPermissionDenied(f"you may not manage image {image_id}")
    storage: StorageService = request.app.state.scaibunker_storage
    minted = storage.mint(
        sorted(set(body.methods)), key=body.key, prefix=body.prefix, ttl_s=body.expires_in_s
    )
    expires_at = datetime.fromtimestamp(int(str(minted["expires_at"])), tz=UTC)
    return ok({"capability": minted["capability"], "expires_at": expires_at}, status_code=201)

"""ORM model of per-scope module administration (SPEC §1.10)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, String
from sqlalchemy.orm import Mapped, mapped_column

from scaigrid.platform.db import ID_LENGTH, Base, UTCDateTime, utcnow


class ModuleScope(Base):
    """A module's state in one scope: ``scope_type`` ``tenant`` or ``partner``, ``scope_id``
    its id. No row means enabled with no overrides. ``config`` holds only the overridden
    keys."""

    __tablename__ = "module_scopes"

    module: Mapped[str] = mapped_column(String(64), primary_key=True)
    scope_type: Mapped[str] = mapped_column(String(16), primary_key=True)
    scope_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

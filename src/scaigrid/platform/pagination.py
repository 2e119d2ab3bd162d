"""Cursor pagination over id-ordered tables (SPEC §1.4): newest first, ``limit`` 1 to 1000
(default 100), the cursor is the last id of the previous page (ULID ids sort by creation)."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from fastapi import Query
from sqlalchemy import Select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

T = TypeVar("T")

Limit = Annotated[int, Query(ge=1, le=1000)]
Cursor = Annotated[str | None, Query(max_length=64)]


async def page(
    session: AsyncSession,
    query: Select[Any],
    id_column: InstrumentedAttribute[str],
    limit: int,
    cursor: str | None,
) -> tuple[list[Any], str | None]:
    """Run ``query`` (which selects one entity) newest first from ``cursor``; return up to
    ``limit`` rows and the next cursor (None on the last page)."""
    query = query.order_by(id_column.desc())
    if cursor is not None:
        query = query.where(id_column < cursor)
    rows = list((await session.scalars(query.limit(limit + 1))).all())
    if len(rows) > limit:
        return rows[:limit], str(getattr(rows[limit - 1], id_column.key))
    return rows, None

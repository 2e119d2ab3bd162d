"""Cursor pagination over id-ordered tables (SPEC §1.4): newest first, ``limit`` 1 to 1000
(default 100), the cursor is the last id of the previous page (ULID ids sort by creation).

Cursors are opaque to callers but not to us: a cursor this server could never have issued
(wrong shape, another resource's id prefix) fails request validation, 422
``VALIDATION_ERROR`` with a ``query.cursor`` detail, instead of silently paging from
somewhere. Declare the parameter with the annotated types below, e.g.
``cursor: Annotated[str | None, id_cursor("bnk")] = None`` or ``cursor: UuidCursor = None``.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, TypeVar

from fastapi import Query
from pydantic import AfterValidator
from sqlalchemy import Select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from scaigrid.ids import is_id

T = TypeVar("T")

Limit = Annotated[int, Query(ge=1, le=1000)]

#: Message of the ``query.cursor`` detail for a cursor this listing never issues.
NOT_A_CURSOR = "not a cursor of this listing; pass a next_cursor as received"


def id_cursor(prefix: str) -> AfterValidator:
    """Validation for a ``cursor`` that is an id with ``prefix`` (``"bnk"`` → ``bnk_`` +
    ULID, SPEC §1.12): ``Annotated[str | None, id_cursor("bnk")]``.

    Returns:
        pydantic metadata; any other string (empty, another prefix, not a ULID) raises
        ``ValueError``, which FastAPI answers as 422 ``VALIDATION_ERROR`` naming
        ``query.cursor``.
    """

    def check(value: str | None) -> str | None:
        if value is not None and not is_id(value, prefix):
            raise ValueError(NOT_A_CURSOR)
        return value

    return AfterValidator(check)


def _check_uuid(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        canonical = str(uuid.UUID(value))
    except ValueError:
        canonical = None
    if canonical != value:
        raise ValueError(NOT_A_CURSOR)
    return value


#: A ``cursor`` that is a UUID id in canonical lowercase form (quota profiles, assignments).
UuidCursor = Annotated[str | None, AfterValidator(_check_uuid)]


async def page(
    session: AsyncSession,
    query: Select[Any],
    id_column: InstrumentedAttribute[str],
    limit: int,
    cursor: str | None,
) -> tuple[list[Any], str | None]:
    """Run ``query`` (which selects one entity) newest first from ``cursor`` (an id already
    validated by :func:`id_cursor`); return up to ``limit`` rows and the next cursor (None
    on the last page)."""
    query = query.order_by(id_column.desc())
    if cursor is not None:
        query = query.where(id_column < cursor)
    rows = list((await session.scalars(query.limit(limit + 1))).all())
    if len(rows) > limit:
        return rows[:limit], str(getattr(rows[limit - 1], id_column.key))
    return rows, None

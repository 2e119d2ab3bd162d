"""Alembic environment: runs revisions on the connection handed over by
:mod:`scaigrid.platform.migrate` (``config.attributes["connection"]``).

Every model module is imported first so autogenerate sees the whole schema. SQLite runs in
batch mode (table rebuilds), because it cannot alter most constraints in place.
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy.engine import Connection

from scaigrid.platform.db import Base, UTCDateTime
from scaigrid.platform.models_registry import import_all_models

import_all_models()


def render_item(kind: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Render :class:`UTCDateTime` columns as ``UTCDateTime()`` with their import."""
    if kind == "type" and isinstance(obj, UTCDateTime):
        autogen_context.imports.add("from scaigrid.platform.db import UTCDateTime")
        return "UTCDateTime()"
    return False


connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("run migrations through `scaigrid migrate` (scaigrid.platform.migrate)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
    render_item=render_item,
)
with context.begin_transaction():
    context.run_migrations()

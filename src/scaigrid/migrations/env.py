"""Alembic environment: runs revisions on the connection handed over by
:mod:`scaigrid.platform.migrate` (``config.attributes["connection"]``).

Every model module is imported first so autogenerate sees the whole schema. SQLite runs in
batch mode (table rebuilds), because it cannot alter most constraints in place.
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from alembic.operations import ops
from alembic.runtime.migration import MigrationContext
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


def drop_tables_with_their_indexes(
    _context: MigrationContext, _revision: Any, directives: list[Any]
) -> None:
    """Autogenerate writes ``drop_index`` before ``drop_table``; MariaDB refuses to drop an
    index that backs a foreign key, and dropping a table drops its indexes on every dialect,
    so index drops of tables that are dropped anyway are removed."""
    for script in directives:
        for downgrade in script.downgrade_ops_list:
            dropped = {op.table_name for op in downgrade.ops if isinstance(op, ops.DropTableOp)}
            kept: list[ops.MigrateOperation] = []
            for op in downgrade.ops:
                if isinstance(op, ops.DropIndexOp) and op.table_name in dropped:
                    continue
                if isinstance(op, ops.ModifyTableOps) and op.table_name in dropped:
                    op.ops = [o for o in op.ops if not isinstance(o, ops.DropIndexOp)]
                    if not op.ops:
                        continue
                kept.append(op)
            downgrade.ops = kept


connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("run migrations through `scaigrid migrate` (scaigrid.platform.migrate)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
    render_item=render_item,
    process_revision_directives=drop_tables_with_their_indexes,
)
with context.begin_transaction():
    context.run_migrations()

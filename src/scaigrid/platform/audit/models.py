"""ORM models of the audit log (SPEC §1.7): a hash-chained list of records."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from scaigrid.platform.db import ID_LENGTH, Base, UTCDateTime

#: Hex SHA-256 of the chain's first ``prev_hash``.
GENESIS_HASH = "0" * 64


class AuditRecord(Base):
    """One audited request. ``seq`` orders the chain (1, 2, …, no gaps).

    ``prev_hash`` is the ``record_hash`` of record ``seq - 1`` (:data:`GENESIS_HASH` for the
    first); ``record_hash`` is the SHA-256 of this record's canonical form (see
    :func:`scaigrid.platform.audit.service.canonical`), which includes ``prev_hash``, so
    changing, inserting or deleting any record breaks every later link.
    """

    __tablename__ = "audit_records"

    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    request_id: Mapped[str] = mapped_column(String(64))
    actor_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), index=True)
    actor_type: Mapped[str] = mapped_column(String(16))
    tenant_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), index=True)
    partner_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), index=True)
    action: Mapped[str] = mapped_column(String(300))
    resource_type: Mapped[str | None] = mapped_column(String(64))
    resource_id: Mapped[str | None] = mapped_column(String(300))
    ip_address: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(500))
    outcome: Mapped[str] = mapped_column(String(16))
    status_code: Mapped[int] = mapped_column(Integer)
    prev_hash: Mapped[str] = mapped_column(String(64))
    record_hash: Mapped[str] = mapped_column(String(64))

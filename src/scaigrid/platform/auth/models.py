"""ORM model of API keys (SPEC §1.2): bearer ``sgk_…`` secrets stored only as SHA-256."""

from __future__ import annotations

from datetime import datetime
from functools import partial

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from scaigrid.ids import new_id
from scaigrid.platform.db import ID_LENGTH, Base, UTCDateTime, utcnow

#: Characters of the secret kept in clear (``sgk_`` + 8), shown in key lists.
KEY_PREFIX_LENGTH = 12


class ApiKey(Base):
    """An API key of one user in one tenant. Id ``key_…``.

    ``key_hash`` is the lowercase hex SHA-256 of the whole secret; the secret itself is
    shown once at creation and never stored. ``revoked_at`` set means the key is dead.
    """

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(
        String(ID_LENGTH), primary_key=True, default=partial(new_id, "key")
    )
    user_id: Mapped[str] = mapped_column(String(ID_LENGTH), ForeignKey("users.id"), index=True)
    tenant_id: Mapped[str] = mapped_column(String(ID_LENGTH), ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(KEY_PREFIX_LENGTH))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)

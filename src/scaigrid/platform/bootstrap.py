"""First start: a partner, the ``default`` tenant, a ``super_admin`` and their API key.

The key is written to ``Settings.admin_key_file`` (mode 0600, directory created 0700) and is
never logged; only the file's path is. Idempotent: once a ``super_admin`` exists nothing is
done, also when several replicas start at the same time (the loser of the race sees a
uniqueness conflict and stands down).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import structlog
from sqlalchemy.exc import IntegrityError

from scaigrid import errors
from scaigrid.platform.auth.service import create_api_key
from scaigrid.platform.db import Database
from scaigrid.platform.permissions import Role
from scaigrid.platform.tenancy.service import (
    count_users,
    create_partner,
    create_tenant,
    create_user,
)
from scaigrid.settings import Settings

log = structlog.get_logger(__name__)

DEFAULT_TENANT_SLUG = "default"


def _write_secret(path: Path, secret: str) -> Path:
    """Write ``secret`` to a 0600 temporary file beside ``path``; return the temporary path."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    return temporary


async def bootstrap(db: Database, settings: Settings) -> Path | None:
    """Create the first administrator if there is none.

    Returns:
        The path of the admin key file when it was written, None when the platform was
        already bootstrapped.
    """
    async with db.sessionmaker() as session:
        if await count_users(session, Role.SUPER_ADMIN):
            log.debug("bootstrap.skipped")
            return None
        try:
            partner = await create_partner(session, "Default partner")
            tenant = await create_tenant(session, partner.id, "Default", DEFAULT_TENANT_SLUG)
            user = await create_user(
                session, tenant.id, settings.admin_email, Role.SUPER_ADMIN, "Administrator"
            )
            key, secret = await create_api_key(session, user, "bootstrap")
        except (errors.SlugConflict, IntegrityError):
            log.info("bootstrap.concurrent_start_detected")
            return None
        temporary = await asyncio.to_thread(_write_secret, settings.admin_key_file, secret)
        try:
            await session.commit()
        except IntegrityError:
            temporary.unlink(missing_ok=True)
            log.info("bootstrap.concurrent_start_detected")
            return None
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    temporary.replace(settings.admin_key_file)
    log.info(
        "bootstrap.done",
        admin_key_file=str(settings.admin_key_file),
        tenant_id=tenant.id,
        user_id=user.id,
        api_key_id=key.id,
    )
    return settings.admin_key_file

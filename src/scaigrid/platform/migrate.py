"""Running Alembic from code: ``scaigrid migrate``, the app's start-up and the tests.

Layout (one history, several branches, all upgraded together with ``upgrade heads``):

* ``scaigrid/migrations/versions/`` — platform revisions, branch label ``platform``.
* ``scaigrid/modules/<name>/migrations/versions/`` — a module's revisions, branch label
  ``<name>``; its first revision has ``down_revision = None`` and ``depends_on`` the platform
  revision whose tables it references. :func:`make_revision` creates such files.

The Alembic :class:`~alembic.config.Config` is built here, with ``script_location`` inside the
installed package, so no ``alembic.ini`` is needed.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from scaigrid.platform.db import create_engine
from scaigrid.platform.modules.loader import KNOWN_MODULES, module_file_exists
from scaigrid.settings import Settings

log = structlog.get_logger(__name__)

#: Branch label of the platform's own revisions.
PLATFORM_BRANCH = "platform"


class DatabaseNotMigrated(RuntimeError):
    """The database is not at the latest revision and the app may not migrate it."""


def _migrations_dir() -> Path:
    return Path(str(files("scaigrid.migrations")))


def module_versions_dir(module: str) -> Path | None:
    """Return ``scaigrid/modules/<module>/migrations/versions`` or None when it is absent."""
    if not module_file_exists(f"scaigrid.modules.{module}.migrations.versions"):
        return None
    return Path(str(files(f"scaigrid.modules.{module}.migrations.versions")))


def alembic_config(connection: Connection | None = None) -> Config:
    """Build the Alembic config: script location in the package, every version directory.

    Args:
        connection: the synchronous connection ``env.py`` runs revisions on; needed by every
            command that touches the database.
    """
    root = _migrations_dir()
    locations = [root / "versions"]
    locations += [path for name in KNOWN_MODULES if (path := module_versions_dir(name))]
    config = Config()
    config.set_main_option("script_location", str(root))
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", os.pathsep.join(str(p) for p in locations))
    config.attributes["connection"] = connection
    return config


async def run_alembic(database_url: str, action: Callable[[Config], None]) -> None:
    """Run one Alembic command (``action(config)``) on ``database_url`` in one transaction.

    SQLite connections run with ``foreign_keys=OFF`` so batch table rebuilds can work.
    """
    engine = create_engine(database_url, foreign_keys=False)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(lambda sync: action(alembic_config(sync)))
    finally:
        await engine.dispose()


async def migrate(settings: Settings) -> None:
    """Upgrade ``settings.database_url`` to the head of every branch (idempotent)."""
    await run_alembic(settings.database_url, lambda config: command.upgrade(config, "heads"))
    log.info("db.migrated")


async def is_at_head(settings: Settings) -> bool:
    """Return True when every branch head (and so everything below it) is applied.

    The version table lists only the newest applied revisions: a revision another one
    ``depends_on`` is not listed, so heads are checked against everything reachable from it.
    """
    script = ScriptDirectory.from_config(alembic_config())
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as connection:
            current = await connection.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_heads()
            )
    finally:
        await engine.dispose()
    applied = (
        {revision.revision for revision in script.iterate_revisions(current, "base")}
        if current
        else set()
    )
    return set(script.get_heads()) <= applied


async def prepare_schema(settings: Settings) -> None:
    """Bring the schema to head when ``settings.migrate_on_start``, else require it.

    Raises:
        DatabaseNotMigrated: ``migrate_on_start`` is off and revisions are pending.
    """
    if settings.migrate_on_start:
        await migrate(settings)
    elif not await is_at_head(settings):
        raise DatabaseNotMigrated("database is not at the latest revision: run `scaigrid migrate`")


def _branch_revisions(script: ScriptDirectory, branch: str) -> int:
    return sum(branch in revision.branch_labels for revision in script.walk_revisions())


async def make_revision(
    settings: Settings, message: str, branch: str, *, autogenerate: bool
) -> Path:
    """Write a new revision file on ``branch`` and return its path.

    Revision ids are ``<branch>_<NNNN>`` (``scaibunker_0001``, ``scaibunker_0002``, …).
    A module's first revision starts its branch in the module's own ``migrations/versions``
    (created with its ``__init__.py`` files) and depends on the platform head. With
    ``autogenerate`` the database at ``settings.database_url`` must be at head; the
    generated operations must be reviewed before committing.

    Raises:
        ValueError: ``branch`` is neither ``platform`` nor a known module.
    """
    if branch != PLATFORM_BRANCH and branch not in KNOWN_MODULES:
        raise ValueError(f"unknown branch {branch!r}")
    if branch != PLATFORM_BRANCH and module_versions_dir(branch) is None:
        package = Path(str(files(f"scaigrid.modules.{branch}")))
        (package / "migrations" / "versions").mkdir(parents=True, exist_ok=True)
        for folder in (package / "migrations", package / "migrations" / "versions"):
            (folder / "__init__.py").touch()
        importlib.invalidate_caches()
    written: list[Path] = []

    def action(config: Config) -> None:
        script = ScriptDirectory.from_config(config)
        existing = _branch_revisions(script, branch)
        rev_id = f"{branch}_{existing + 1:04d}"
        if existing:
            result = command.revision(
                config,
                message=message,
                autogenerate=autogenerate,
                head=f"{branch}@head",
                rev_id=rev_id,
            )
        else:
            versions = module_versions_dir(branch)
            platform_head = script.get_revision(f"{PLATFORM_BRANCH}@head")
            result = command.revision(
                config,
                message=message,
                autogenerate=autogenerate,
                head="base",
                rev_id=rev_id,
                branch_label=branch,
                version_path=str(versions),
                depends_on=platform_head.revision if platform_head else None,
            )
        scripts = result if isinstance(result, list) else [result]
        written.extend(Path(s.path) for s in scripts if s is not None)

    await run_alembic(settings.database_url, action)
    return written[0]

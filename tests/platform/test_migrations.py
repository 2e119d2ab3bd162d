"""One migration history on SQLite, PostgreSQL and MariaDB: the whole history upgrades and
agrees with every model; the platform branch alone upgrades and downgrades; the platform runs
on the migrated database."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select

from scaigrid.platform.app import create_app
from scaigrid.platform.auth.models import ApiKey
from scaigrid.platform.db import Base, create_engine
from scaigrid.platform.migrate import DatabaseNotMigrated, is_at_head, migrate, run_alembic
from scaigrid.platform.models_registry import PLATFORM_MODEL_MODULES, import_all_models
from scaigrid.settings import Settings

SettingsFor = Callable[..., Settings]


def _platform_tables() -> set[str]:
    import_all_models()
    return {
        table.name
        for mapper in Base.registry.mappers
        if mapper.class_.__module__ in PLATFORM_MODEL_MODULES
        for table in mapper.tables
    }


def _only_tables(tables: set[str]) -> Callable[..., bool]:
    def include(obj: Any, name: str | None, kind: str, reflected: bool, other: Any) -> bool:
        table = name if kind == "table" else getattr(getattr(obj, "table", None), "name", None)
        return table in tables

    return include


async def _schema_state(url: str, tables: set[str] | None = None) -> tuple[set[str], list[Any]]:
    """Tables present, and the differences between the models and the schema (restricted to
    ``tables`` when given)."""
    opts: dict[str, Any] = {"compare_type": True}
    if tables is not None:
        opts["include_object"] = _only_tables(tables)
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:

            def inspect_sync(sync: Any) -> tuple[set[str], list[Any]]:
                context = MigrationContext.configure(sync, opts=opts)
                return set(inspect(sync).get_table_names()), compare_metadata(
                    context, Base.metadata
                )

            return await connection.run_sync(inspect_sync)
    finally:
        await engine.dispose()


def _platform_branch_only(action: Callable[[Config], None]) -> Callable[[Config], None]:
    """Run ``action`` on a history holding only the platform revisions (no modules)."""

    def run(config: Config) -> None:
        script_location = Path(config.get_main_option("script_location") or "")
        config.set_main_option("version_locations", str(script_location / "versions"))
        action(config)

    return run


async def test_full_history_upgrades_and_matches_every_model(
    empty_database_url: str, settings_for: SettingsFor, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, database_url=empty_database_url)
    assert not await is_at_head(settings)
    await migrate(settings)
    assert await is_at_head(settings)
    import_all_models()
    present, diff = await _schema_state(empty_database_url)
    assert set(Base.metadata.tables) <= present
    assert diff == []
    await migrate(settings)  # a second upgrade is a no-op
    assert await is_at_head(settings)


async def test_platform_branch_alone_upgrades_and_downgrades(empty_database_url: str) -> None:
    platform = _platform_tables()
    assert platform == {
        "partners",
        "tenants",
        "users",
        "api_keys",
        "audit_records",
        "user_permissions",
        "custom_roles",
        "user_roles",
        "groups",
        "group_members",
        "role_mappings",
        "module_scopes",
        "events",
        "webhooks",
        "webhook_deliveries",
    }
    upgrade = _platform_branch_only(lambda config: command.upgrade(config, "heads"))
    downgrade = _platform_branch_only(lambda config: command.downgrade(config, "base"))

    await run_alembic(empty_database_url, upgrade)
    present, diff = await _schema_state(empty_database_url, platform)
    assert present - {"alembic_version"} == platform
    assert diff == []
    await run_alembic(empty_database_url, downgrade)
    present, _ = await _schema_state(empty_database_url, platform)
    assert present & platform == set()
    await run_alembic(empty_database_url, upgrade)
    assert platform <= (await _schema_state(empty_database_url, platform))[0]


async def test_platform_runs_on_the_migrated_database(
    empty_database_url: str, settings_for: SettingsFor, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, database_url=empty_database_url)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        key = settings.admin_key_file.read_text().strip()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            ok = await client.get("/v1/modules", headers={"Authorization": f"Bearer {key}"})
            missing = await client.get("/v1/modules")
        async with app.state.db.sessionmaker() as session:
            stored = await session.scalar(select(ApiKey))
    assert ok.status_code == 200
    assert missing.json()["error"]["code"] == "AUTH_TOKEN_MISSING"
    assert stored is not None and stored.last_used_at is not None
    assert stored.last_used_at.utcoffset() is not None
    assert stored.created_at <= stored.last_used_at


async def test_without_migrate_on_start_an_old_schema_stops_the_app(
    settings_for: SettingsFor, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, migrate_on_start=False)
    app = create_app(settings)
    with pytest.raises(DatabaseNotMigrated, match="scaigrid migrate"):
        async with app.router.lifespan_context(app):
            pass
    await migrate(settings)
    async with app.router.lifespan_context(app):
        assert settings.admin_key_file.exists()

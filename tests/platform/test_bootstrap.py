"""First start: admin key file 0600 in a 0700 directory, never logged, idempotent."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import httpx
from structlog.testing import capture_logs

from scaigrid.platform.app import create_app
from scaigrid.platform.bootstrap import bootstrap
from scaigrid.platform.db import Database
from scaigrid.platform.logging import configure_logging
from scaigrid.platform.migrate import migrate
from scaigrid.settings import Settings

SettingsFor = Callable[..., Settings]


async def test_first_start_writes_a_private_key_file_and_second_start_does_nothing(
    tmp_path: Path, settings_for: SettingsFor
) -> None:
    data_dir = tmp_path / "fresh" / "data"
    settings = settings_for(data_dir, log_level="INFO")
    configure_logging(settings.log_level)
    await migrate(settings)
    db = Database(settings.database_url)
    try:
        with capture_logs() as logs:
            written = await bootstrap(db, settings)
        assert written == settings.admin_key_file
        key = written.read_text().strip()
        assert key.startswith("sgk_") and len(key) >= 36
        assert stat.S_IMODE(written.stat().st_mode) == 0o600
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        assert not list(data_dir.glob(".*.tmp"))

        assert await bootstrap(db, settings) is None
        assert written.read_text().strip() == key
    finally:
        await db.dispose()
    assert key not in repr(logs)
    [done] = [entry for entry in logs if entry["event"] == "bootstrap.done"]
    assert done["admin_key_file"] == str(settings.admin_key_file)


async def test_bootstrap_key_is_a_working_super_admin_key(
    tmp_path: Path, settings_for: SettingsFor
) -> None:
    settings = settings_for(tmp_path)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        key = settings.admin_key_file.read_text().strip()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/v1/modules", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200
    # A second start of the same data dir keeps the key and does not write a new one.
    mtime = settings.admin_key_file.stat().st_mtime_ns
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        pass
    assert settings.admin_key_file.stat().st_mtime_ns == mtime
    assert settings.admin_key_file.read_text().strip() == key

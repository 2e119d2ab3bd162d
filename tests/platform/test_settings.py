"""Settings: one documented list, derived defaults, SCAIGRID_ environment variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from scaigrid.settings import Settings


def test_describe_lists_every_setting_with_a_description() -> None:
    rows = Settings.describe()
    assert [name for name, _, _ in rows] == [
        f"SCAIGRID_{field.upper()}" for field in Settings.model_fields
    ]
    assert all(description for _, _, description in rows)
    defaults = {name: default for name, default, _ in rows}
    assert defaults["SCAIGRID_DATABASE_URL"] == "sqlite+aiosqlite:///<data_dir>/scaigrid.db"
    assert defaults["SCAIGRID_PORT"] == "8080"
    assert defaults["SCAIGRID_MAX_BODY_BYTES"] == str(1024 * 1024)


def test_derived_defaults_follow_data_dir_and_port(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SCAIGRID_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SCAIGRID_PORT", "9123")
    monkeypatch.delenv("SCAIGRID_DATABASE_URL", raising=False)
    monkeypatch.delenv("SCAIGRID_PUBLIC_URL", raising=False)
    monkeypatch.delenv("SCAIGRID_ADMIN_KEY_FILE", raising=False)
    settings = Settings()
    assert settings.data_dir == (tmp_path / "data").resolve()
    assert settings.database_url == f"sqlite+aiosqlite:///{tmp_path / 'data' / 'scaigrid.db'}"
    assert settings.admin_key_file == tmp_path / "data" / "admin-api-key"
    assert settings.public_url == "http://127.0.0.1:9123"


def test_relative_data_dir_is_resolved(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SCAIGRID_DATA_DIR", raising=False)
    assert Settings().data_dir == tmp_path / "var"
    assert Settings(data_dir=Path("rel")).data_dir == tmp_path / "rel"


def test_invalid_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        Settings(mode="sideways")

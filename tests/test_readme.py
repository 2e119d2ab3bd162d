"""The README documents every setting the code reads."""

from __future__ import annotations

from pathlib import Path

from scaigrid.settings import Settings
from scaigrid.worker.settings import WorkerSettings

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_every_controller_setting_is_in_the_readme() -> None:
    missing = [name for name, _, _ in Settings.describe() if f"`{name}`" not in README]
    assert not missing


def test_every_worker_setting_is_in_the_readme() -> None:
    names = [f"SCAIBUNKER_{field.upper()}" for field in WorkerSettings.model_fields]
    missing = [name for name in names if f"`{name}`" not in README]
    assert not missing

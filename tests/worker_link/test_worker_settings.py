"""Worker settings: environment variables, flag overrides, list and label parsing."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
from click.testing import CliRunner

from scaigrid.worker import main as worker_main
from scaigrid.worker.settings import WorkerSettings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONTROLLER_URL", "JOIN_TOKEN", "DATA_DIR", "DRIVERS", "LABELS", "CGROUP_PARENT"):
        monkeypatch.delenv(f"SCAIBUNKER_{name}", raising=False)


def test_environment_is_read_with_the_scaibunker_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCAIBUNKER_CONTROLLER_URL", "https://grid.example.com/")
    monkeypatch.setenv("SCAIBUNKER_JOIN_TOKEN", "sbj_abc")
    monkeypatch.setenv("SCAIBUNKER_DATA_DIR", "/srv/worker")
    monkeypatch.setenv("SCAIBUNKER_DRIVERS", "qemu, container")
    monkeypatch.setenv("SCAIBUNKER_LABELS", "zone=eu-1,gpu=none")
    monkeypatch.setenv("SCAIBUNKER_RESERVED_MEMORY_MB", "512")

    settings = WorkerSettings()

    assert settings.controller_url == "https://grid.example.com"
    assert settings.connect_url() == "wss://grid.example.com/v1/modules/scaibunker/workers/connect"
    assert settings.join_token == "sbj_abc"
    assert settings.data_dir == Path("/srv/worker")
    assert settings.credential_path == Path("/srv/worker/credential")
    assert settings.drivers == ["qemu", "container"]
    assert settings.labels == {"zone": "eu-1", "gpu": "none"}
    assert settings.reserved_memory_mb == 512
    assert settings.reserved_cpu_millicores == 0


def test_defaults_and_plain_http_url(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = WorkerSettings(controller_url="http://127.0.0.1:8080")
    assert settings.connect_url() == "ws://127.0.0.1:8080/v1/modules/scaibunker/workers/connect"
    assert settings.data_dir == Path("/var/lib/scaibunker")
    assert settings.drivers == [] and settings.labels == {} and settings.join_token is None
    parent = settings.bunker_cgroup_parent()
    assert parent.startswith("scaibunker-") and len(parent) == len("scaibunker-") + 12
    other = WorkerSettings(controller_url="http://x", data_dir=Path("/srv/other"))
    assert other.bunker_cgroup_parent() != parent, "workers sharing a host get their own"


INVALID = [{"controller_url": "grid.example.com"}, {"labels": "novalue"}, {"cgroup_parent": "../x"}]


@pytest.mark.parametrize("field", INVALID)
def test_invalid_values_are_refused(field: dict[str, str]) -> None:
    with pytest.raises(pydantic.ValidationError):
        WorkerSettings(**{"controller_url": "http://x", **field})


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SCAIBUNKER_CONTROLLER_URL", "http://from-env:1")
    monkeypatch.setenv("SCAIBUNKER_JOIN_TOKEN", "sbj_env")
    seen: list[WorkerSettings] = []

    async def fake_serve(settings: WorkerSettings) -> int:
        seen.append(settings)
        return 0

    monkeypatch.setattr(worker_main, "serve", fake_serve)
    monkeypatch.setattr(worker_main, "configure_logging", lambda level: None)
    result = CliRunner().invoke(
        worker_main.main,
        ["--controller", "http://from-flag:2", "--data-dir", str(tmp_path), "--labels", "a=b"],
    )
    assert result.exit_code == 0, result.output
    (settings,) = seen
    assert settings.controller_url == "http://from-flag:2"
    assert settings.join_token == "sbj_env"
    assert settings.data_dir == tmp_path
    assert settings.labels == {"a": "b"}


def test_missing_controller_url_is_a_usage_error() -> None:
    result = CliRunner().invoke(worker_main.main, [])
    assert result.exit_code == 2
    assert "SCAIBUNKER_CONTROLLER_URL" in result.output

"""Trivy report parsing on the real reports in ../shared/data, and the missing-scanner path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from scaigrid.worker.scan import ScanReportError, parse_trivy_report, scan_tree

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def _report(name: str) -> bytes:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path.read_bytes()


def test_debian_report_counts_and_findings() -> None:
    result = parse_trivy_report(_report("trivy-report-debian-buster.json"))
    assert result.status == "done"
    assert result.counts == {"critical": 1, "high": 0, "medium": 0, "low": 1, "unknown": 0}
    by_id = {f["vulnerability_id"]: f for f in result.findings}
    assert by_id["CVE-2019-18276"]["pkg_name"] == "bash"
    assert by_id["CVE-2019-18276"]["installed_version"] == "5.0-4"
    assert set(result.findings[0]) == {
        "vulnerability_id",
        "pkg_name",
        "installed_version",
        "fixed_version",
        "severity",
        "title",
    }
    assert result.scanner_version == "dev"


def test_alpine_report_has_fixed_versions() -> None:
    result = parse_trivy_report(_report("trivy-report-alpine-310.json"))
    assert result.counts["medium"] == 4 and sum(result.counts.values()) == 4
    assert all(f["fixed_version"] for f in result.findings)
    assert all(f["severity"] == "medium" for f in result.findings)


def test_odd_severity_counts_as_unknown_and_duplicates_once() -> None:
    vuln = {
        "VulnerabilityID": "CVE-1",
        "PkgName": "p",
        "InstalledVersion": "1",
        "Severity": "WEIRD",
    }
    report = {
        "SchemaVersion": 2,
        "Results": [
            {"Target": "a", "Vulnerabilities": [vuln]},
            {"Target": "b", "Vulnerabilities": [vuln]},
            {"Target": "c", "Vulnerabilities": None},
        ],
    }
    result = parse_trivy_report(json.dumps(report))
    assert result.counts["unknown"] == 1 and len(result.findings) == 1


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[]",
        json.dumps({"SchemaVersion": 1, "Results": []}),
        json.dumps({"SchemaVersion": 2, "Results": [{"Vulnerabilities": [{"PkgName": "x"}]}]}),
    ],
)
def test_bad_reports_are_refused(raw: str) -> None:
    with pytest.raises(ScanReportError):
        parse_trivy_report(raw)


async def test_missing_trivy_is_scanner_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    result = await scan_tree(tmp_path)
    assert result.status == "scanner_unavailable"
    assert result.to_dict()["scanner"] == "trivy"


async def test_failing_trivy_is_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "trivy"
    fake.write_text("#!/bin/sh\necho 'FATAL rootfs scan error' >&2\nexit 1\n")
    os.chmod(fake, 0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    result = await scan_tree(tmp_path)
    assert result.status == "failed" and "FATAL rootfs scan error" in (result.error or "")


async def test_trivy_output_is_parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = tmp_path / "report.json"
    report.write_bytes(_report("trivy-report-debian-buster.json"))
    fake = tmp_path / "trivy"
    fake.write_text(f'#!/bin/sh\n[ "$1 $2 $3" = "rootfs --format json" ] && exec cat {report}\n')
    os.chmod(fake, 0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    result = await scan_tree(tmp_path)
    assert result.status == "done" and result.counts["critical"] == 1

"""Vulnerability scan of an image tree with Trivy (SPEC §7.7).

``trivy rootfs --format json --quiet <tree>`` writes a report in Trivy's JSON format (schema
version 2: ``{"SchemaVersion": 2, "Trivy": {"Version"}, "Results": [{"Target",
"Vulnerabilities": [{"VulnerabilityID", "PkgName", "InstalledVersion", "FixedVersion",
"Severity", "Title"}]}]}``). :func:`parse_trivy_report` validates it with pydantic and turns it
into severity counts and findings. When ``trivy`` is not on ``PATH`` the scan's status is
``scanner_unavailable``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from scaigrid.worker.rootfs.commands import CommandError, run_command

log = structlog.get_logger(__name__)

SEVERITIES = ("critical", "high", "medium", "low", "unknown")
#: Findings kept per scan; a report with more is cut here (counts stay exact).
MAX_FINDINGS = 20000
_TEXT_LIMIT = 512


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class _Vulnerability(_Lenient):
    vulnerability_id: str = Field(alias="VulnerabilityID", max_length=256)
    pkg_name: str = Field(default="", alias="PkgName")
    installed_version: str = Field(default="", alias="InstalledVersion")
    fixed_version: str | None = Field(default=None, alias="FixedVersion")
    severity: str = Field(default="UNKNOWN", alias="Severity")
    title: str | None = Field(default=None, alias="Title")


class _Result(_Lenient):
    target: str = Field(default="", alias="Target")
    vulnerabilities: list[_Vulnerability] | None = Field(default=None, alias="Vulnerabilities")


class _Scanner(_Lenient):
    version: str = Field(default="", alias="Version")


class _Report(_Lenient):
    schema_version: int = Field(alias="SchemaVersion")
    trivy: _Scanner = Field(default_factory=_Scanner, alias="Trivy")
    results: list[_Result] | None = Field(default=None, alias="Results")


class ScanReportError(Exception):
    """The scanner's output is not a Trivy JSON report of schema version 2."""


@dataclass
class ScanResult:
    """Outcome of one scan.

    Attributes:
        status: ``done``, ``failed`` or ``scanner_unavailable``.
        scanner_version: Trivy's version (``None`` unless ``done``).
        counts: findings per severity (keys :data:`SEVERITIES`).
        findings: ``[{vulnerability_id, pkg_name, installed_version, fixed_version,
            severity, title}]`` (severity lower-case), at most :data:`MAX_FINDINGS`.
        error: why the scan failed (``failed`` only).
    """

    status: str
    scanner_version: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SEVERITIES, 0))
    findings: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``image.scan`` task result."""
        return {
            "status": self.status,
            "scanner": "trivy",
            "scanner_version": self.scanner_version,
            "counts": self.counts,
            "findings": self.findings,
            "error": self.error,
        }


def _clip(text: str | None) -> str | None:
    return None if text is None else text[:_TEXT_LIMIT]


def parse_trivy_report(raw: bytes | str) -> ScanResult:
    """Turn Trivy's JSON report into counts and findings (status ``done``).

    Severities other than CRITICAL/HIGH/MEDIUM/LOW count as ``unknown``. Duplicate findings
    (one vulnerability of one package version reported for several targets) count once.

    Raises:
        ScanReportError: not JSON, not schema version 2, or malformed entries.
    """
    try:
        report = _Report.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        raise ScanReportError(f"not a Trivy JSON report: {str(exc)[:300]}") from exc
    if report.schema_version != 2:
        raise ScanReportError(f"unsupported Trivy report schema {report.schema_version}")
    result = ScanResult(status="done", scanner_version=report.trivy.version or None)
    seen: set[tuple[str, str, str]] = set()
    for target in report.results or []:
        for vuln in target.vulnerabilities or []:
            key = (vuln.vulnerability_id, vuln.pkg_name, vuln.installed_version)
            if key in seen:
                continue
            seen.add(key)
            severity = vuln.severity.lower()
            if severity not in SEVERITIES:
                severity = "unknown"
            result.counts[severity] += 1
            if len(result.findings) < MAX_FINDINGS:
                result.findings.append(
                    {
                        "vulnerability_id": vuln.vulnerability_id,
                        "pkg_name": _clip(vuln.pkg_name),
                        "installed_version": _clip(vuln.installed_version),
                        "fixed_version": _clip(vuln.fixed_version),
                        "severity": severity,
                        "title": _clip(vuln.title),
                    }
                )
    return result


async def scan_tree(tree: Path, *, timeout_s: float = 900.0) -> ScanResult:
    """Scan ``tree`` with ``trivy rootfs``.

    Returns:
        ``done`` with counts and findings; ``scanner_unavailable`` when ``trivy`` is not on
        ``PATH``; ``failed`` (with ``error``) when Trivy fails, runs past ``timeout_s`` or
        writes something that is not a report.
    """
    trivy = shutil.which("trivy")
    if trivy is None:
        return ScanResult(status="scanner_unavailable")
    try:
        run = await run_command(
            trivy, "rootfs", "--format", "json", "--quiet", str(tree), timeout_s=timeout_s
        )
        result = parse_trivy_report(run.stdout)
    except (CommandError, ScanReportError) as exc:
        log.warning("image_scan_failed", tree=str(tree), error=str(exc))
        return ScanResult(status="failed", error=str(exc)[:500])
    log.info("image_scanned", tree=str(tree), **result.counts)
    return result

"""Network settings of the module (SPEC §8.3, §8.7), from the controller's environment.

- ``registry_hosts`` (``SCAIBUNKER_REGISTRY_HOSTS``, comma separated, default the SPEC §8.3
  table): the names ``registry`` bunkers may resolve; allowlist syntax.
- ``dns_upstreams`` (``SCAIBUNKER_DNS_UPSTREAMS``, comma separated ``ip[:port]``, default
  none): resolvers the workers' per-bunker DNS resolvers ask. With none, every allowed lookup
  answers ``SERVFAIL``.
- ``egress_audit`` (``SCAIBUNKER_EGRESS_AUDIT``, default ``true``): workers record DNS lookups
  and denied flows of bunkers with egress (SPEC §8.7).
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Annotated, Any, Final

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from scaigrid.modules.scaibunker.network.allowlist import dedupe, normalize_entry

DEFAULT_REGISTRY_HOSTS: Final = (
    "pypi.org",
    "files.pythonhosted.org",
    "registry.npmjs.org",
    "crates.io",
    "static.crates.io",
    "index.crates.io",
    "repo.maven.apache.org",
    "repo1.maven.org",
    "rubygems.org",
    "index.rubygems.org",
    "huggingface.co",
    "cdn-lfs.huggingface.co",
    "cdn-lfs.hf.co",
    "deb.debian.org",
    "security.debian.org",
    "archive.ubuntu.com",
    "security.ubuntu.com",
    "ports.ubuntu.com",
    "dl-cdn.alpinelinux.org",
)


def _split(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class NetworkConfig(BaseSettings):
    """See the module docstring."""

    model_config = SettingsConfigDict(env_prefix="SCAIBUNKER_", extra="ignore")

    registry_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_REGISTRY_HOSTS), min_length=1
    )
    dns_upstreams: Annotated[list[str], NoDecode] = Field(default_factory=list)
    egress_audit: bool = True

    @field_validator("registry_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("registry_hosts")
    @classmethod
    def _check_hosts(cls, value: list[str]) -> list[str]:
        return dedupe(normalize_entry(v) for v in value)

    @field_validator("dns_upstreams", mode="before")
    @classmethod
    def _split_upstreams(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("dns_upstreams")
    @classmethod
    def _check_upstreams(cls, value: list[str]) -> list[str]:
        for spec in value:
            host, _, port = spec.partition(":")
            ipaddress.IPv4Address(host)
            if port and not (port.isdigit() and 1 <= int(port) <= 65535):
                raise ValueError(f"bad port in {spec!r}")
        return value


@functools.cache
def network_config() -> NetworkConfig:
    """The controller's :class:`NetworkConfig`, read from the environment once."""
    return NetworkConfig()

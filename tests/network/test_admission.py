"""Allowlist validation at the API edge and profile permissions (SPEC §8.1, §8.4, §8.6)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from scaigrid import errors
from scaigrid.modules.scaibunker.bunkers.schemas import CreateBunkerRequest
from scaigrid.modules.scaibunker.network import admission
from scaigrid.modules.scaibunker.network.config import NetworkConfig
from scaigrid.platform.auth.principal import Principal
from scaigrid.platform.handlers import field_path
from scaigrid.platform.permissions import Role
from scaigrid.worker.net.policy import NamePolicy


def _create(allowlist: list[str]) -> CreateBunkerRequest:
    return CreateBunkerRequest(
        image="debian-12", network_profile="allowlisted", network_allowlist=allowlist
    )


@pytest.mark.parametrize(
    "bad",
    [
        "https://x.com",
        "x.com/a",
        "x.com:443",
        "10.0.0.1",
        "[::1]",
        "**.foo.com",
        "foo*.example.com",
        "a.*.com",
        "*.com",
        "-a.com",
        "a-.com",
        "a_b.com",
        "a" * 64 + ".com",
        ".".join(["abcdefghi"] * 26),
        "",
        "a..com",
    ],
)
def test_bad_entries_are_rejected_naming_the_entry(bad: str) -> None:
    with pytest.raises(ValidationError) as caught:
        _create(["good.example.com", bad])
    fields = {field_path(e["loc"]) for e in caught.value.errors()}
    assert fields == {"network_allowlist[1]"}


def test_entries_are_normalised_and_deduplicated() -> None:
    request = _create(["GitHub.com.", "github.com", "*.Example.com", "pypi.org"])
    assert request.network_allowlist == ["github.com", "*.example.com", "pypi.org"]


def test_list_size_limits() -> None:
    with pytest.raises(ValidationError):
        _create([])
    with pytest.raises(ValidationError):
        _create([f"h{i}.example.com" for i in range(257)])
    assert len(_create([f"h{i}.example.com" for i in range(256)]).network_allowlist or []) == 256


def test_wildcard_matching() -> None:
    policy = NamePolicy(["*.example.com", "pypi.org"])
    assert policy.allows("api.example.com")
    assert policy.allows("API.Example.com.")
    assert not policy.allows("example.com")
    assert not policy.allows("a.b.example.com")
    assert policy.allows("pypi.org")
    assert not policy.allows("files.pypi.org")
    assert NamePolicy(None).allows("anything.at.all")


def _principal(*permissions: str) -> Principal:
    return Principal("usr_1", "ten_1", "ptn_1", Role.TENANT_USER, None, frozenset(permissions))


@pytest.mark.parametrize("profile", ["registry", "allowlisted", "unrestricted"])
def test_each_profile_needs_its_permission(profile: str) -> None:
    with pytest.raises(errors.NetworkProfileDenied):
        admission.check_profile(_principal("scaibunker:create"), profile, None)
    admission.check_profile(_principal(f"scaibunker:network:{profile}"), profile, None)
    admission.check_profile(_principal(), "isolated", None)


def test_interfaces_rules() -> None:
    transit = _principal("scaibunker:network:transit")
    with pytest.raises(errors.TransitMissingInterfaces):
        admission.check_profile(transit, "transit", None)
    with pytest.raises(errors.InterfacesNotAllowed):
        admission.check_profile(_principal(), "isolated", [{"if_name": "x"}])


def test_worker_gets_the_registry_hosts_for_registry() -> None:
    config = NetworkConfig(registry_hosts="PyPI.org,mirror.internal.example", dns_upstreams="")
    assert admission.worker_allowlist(config, "registry", None) == [
        "pypi.org",
        "mirror.internal.example",
    ]
    assert admission.worker_allowlist(config, "allowlisted", ["a.example"]) == ["a.example"]
    assert admission.worker_allowlist(config, "unrestricted", None) is None
    with pytest.raises(ValidationError):
        NetworkConfig(registry_hosts="https://bad", dns_upstreams="")
    with pytest.raises(ValidationError):
        NetworkConfig(dns_upstreams="not-an-ip")

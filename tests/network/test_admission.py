"""Allowlist validation at the API edge and profile permissions (SPEC §8.1, §8.4, §8.6)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from scaigrid import errors
from scaigrid.modules.scaibunker.bunkers.schemas import CreateBunkerRequest
from scaigrid.modules.scaibunker.network import admission
from scaigrid.modules.scaibunker.network.config import NetworkConfig
from scaigrid.modules.scaibunker.network.interfaces import InterfaceSpec, generated_mac
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
    one = [InterfaceSpec(if_name="net1", bridge_name="lan")]
    with pytest.raises(errors.TransitMissingInterfaces):
        admission.check_profile(transit, "transit", None)
    with pytest.raises(errors.TransitMissingInterfaces):
        admission.check_profile(transit, "transit", [])
    for profile in ("isolated", "unrestricted"):
        with pytest.raises(errors.InterfacesNotAllowed):
            admission.check_profile(_principal("scaibunker:network:unrestricted"), profile, one)
    with pytest.raises(errors.InterfacesNotAllowed):
        admission.check_profile(_principal(), "isolated", [])
    with pytest.raises(errors.NetworkProfileDenied):
        admission.check_profile(_principal("scaibunker:create"), "transit", one)
    admission.check_profile(transit, "transit", one)


def test_spoof_guard_off_needs_l2_transparency() -> None:
    open_port = [InterfaceSpec(if_name="net1", bridge_name="lan", spoof_guard=False)]
    with pytest.raises(errors.AuthzPermissionDenied) as denied:
        admission.check_profile(_principal("scaibunker:network:transit"), "transit", open_port)
    assert denied.value.details == {"permission": "scaibunker:l2_transparency"}
    granted = _principal("scaibunker:network:transit", "scaibunker:l2_transparency")
    admission.check_profile(granted, "transit", open_port)


@pytest.mark.parametrize(
    ("element", "field"),
    [
        ({"if_name": "eth0", "bridge_name": "lan"}, "if_name"),
        ({"if_name": "lo", "bridge_name": "lan"}, "if_name"),
        ({"if_name": "Net1", "bridge_name": "lan"}, "if_name"),
        ({"if_name": "a" * 16, "bridge_name": "lan"}, "if_name"),
        ({"if_name": "net1", "bridge_name": "LAN"}, "bridge_name"),
        ({"if_name": "net1", "bridge_name": "lan", "mac": "01:00:5e:00:00:01"}, "mac"),
        ({"if_name": "net1", "bridge_name": "lan", "mac": "02:00:00:00:00"}, "mac"),
        ({"if_name": "net1"}, "bridge_name"),
        ({"if_name": "net1", "bridge_name": "lan", "vlan": 3}, "vlan"),
    ],
)
def test_bad_interface_elements_are_422_naming_the_field(
    element: dict[str, object], field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        CreateBunkerRequest(image="x", network_profile="transit", interfaces=[element])
    fields = {field_path(e["loc"]) for e in caught.value.errors()}
    assert fields == {f"interfaces[0].{field}"}, fields


def test_interface_list_rules() -> None:
    ok = CreateBunkerRequest(
        image="x",
        network_profile="transit",
        interfaces=[{"if_name": "net1", "bridge_name": "lan", "mac": "02:AB:00:00:00:01"}],
    )
    assert ok.interfaces is not None and ok.interfaces[0].mac == "02:ab:00:00:00:01"
    assert ok.interfaces[0].spoof_guard is True
    same = {"if_name": "net1", "bridge_name": "lan"}
    with pytest.raises(ValidationError):
        CreateBunkerRequest(image="x", network_profile="transit", interfaces=[same, same])
    many = [{"if_name": f"n{i}", "bridge_name": "lan"} for i in range(9)]
    with pytest.raises(ValidationError):
        CreateBunkerRequest(image="x", network_profile="transit", interfaces=many)
    mac = generated_mac()
    assert int(mac[:2], 16) & 0b11 == 0b10 and len(mac) == 17


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

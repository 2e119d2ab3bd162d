"""The firecracker driver's API use, checked against Firecracker's own OpenAPI schema
(v1.16.1, ``/work/shared/data/firecracker-swagger.yaml``), through a fake ``firecracker``
binary (and jailer) serving that API on a unix socket. The real binary is tried only when
it is installed and KVM runs guests (never on our CI machines)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from scaigrid.worker.drivers.base import DriverError
from scaigrid.worker.drivers.firecracker import FirecrackerDriver, vcpu_count, vsock_connect
from scaigrid.worker.rootfs.mounts import mounts_under
from tests.vm.conftest import SpecFactory

SWAGGER = Path(__file__).resolve().parents[3] / "shared" / "data" / "firecracker-swagger.yaml"
HERE = Path(__file__).resolve().parent


def _closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object with properties, so
    a misspelt field fails validation instead of being ignored."""
    if isinstance(schema, dict):
        out = {key: _closed(value) for key, value in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def swagger() -> dict[str, Any]:
    if not SWAGGER.is_file():
        pytest.skip(f"{SWAGGER} is missing")
    spec: dict[str, Any] = yaml.safe_load(SWAGGER.read_text())
    assert spec["info"]["version"] == "1.16.1"
    return spec


def validate_call(spec: dict[str, Any], method: str, path: str, body: Any) -> None:
    """Validate ``body`` against the body parameter schema of ``method path`` in ``spec``."""
    operation = None
    for template, item in spec["paths"].items():
        parts, actual = template.strip("/").split("/"), path.strip("/").split("/")
        if len(parts) == len(actual) and all(
            p == a or (p.startswith("{") and p.endswith("}"))
            for p, a in zip(parts, actual, strict=True)
        ):
            operation = item.get(method.lower())
            if operation is not None:
                break
    assert operation is not None, f"{method} {path} is not in the Firecracker API"
    (schema,) = [p["schema"] for p in operation["parameters"] if p["in"] == "body"]
    root = {**_closed(schema), "definitions": _closed(copy.deepcopy(spec["definitions"]))}
    jsonschema.Draft4Validator(root).validate(body)


@pytest.fixture
def fake_bin(tmp_path: Path) -> Iterator[Path]:
    """A directory with ``firecracker`` and ``jailer`` wrappers running the fakes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in (("firecracker", "fake_firecracker.py"), ("jailer", "fake_jailer.py")):
        wrapper = bin_dir / name
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {HERE / script} "$@"\n')
        wrapper.chmod(0o755)
    yield bin_dir


@pytest.fixture
def fc_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_FC_LOG", str(log))
    return log


def calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def fake_driver(fake_bin: Path, data: Path, **kwargs: Any) -> FirecrackerDriver:
    return FirecrackerDriver(
        data, binary=str(fake_bin / "firecracker"), require_kvm=False, **kwargs
    )


@pytest.fixture
def fc_data(vm_host_ready: None) -> Iterator[Path]:
    data = Path("/var/tmp/scaibunker-vm-test")
    data.mkdir(mode=0o700, exist_ok=True)
    yield data


def test_vcpu_counts_are_one_or_even() -> None:
    assert [vcpu_count(m) for m in (100, 1000, 1001, 2000, 2500, 64000)] == [1, 1, 2, 2, 4, 32]


async def test_boot_sends_schema_valid_calls_in_order_and_connects_over_vsock(
    swagger: dict[str, Any], fake_bin: Path, fc_log: Path, fc_data: Path, make_spec: SpecFactory
) -> None:
    driver = fake_driver(fake_bin, fc_data)
    spec = make_spec()
    handle = await driver.start(spec)
    try:
        api = [c for c in calls(fc_log) if "method" in c]
        assert [(c["method"], c["path"]) for c in api] == [
            ("PUT", "/machine-config"),
            ("PUT", "/boot-source"),
            ("PUT", "/drives/rootfs"),
            ("PUT", "/drives/scratch"),
            ("PUT", "/drives/runtime"),
            ("PUT", "/vsock"),
            ("PUT", "/actions"),
        ]
        for call in api:
            validate_call(swagger, call["method"], call["path"], call["body"])
        by_path = {c["path"]: c["body"] for c in api}
        assert "tsc_early_khz=" in by_path["/boot-source"]["boot_args"]
        assert by_path["/drives/rootfs"]["is_read_only"] is True
        assert by_path["/drives/scratch"]["is_read_only"] is False
        assert Path(by_path["/drives/scratch"]["path_on_host"]).stat().st_size == 64 << 20
        assert by_path["/machine-config"] == {"vcpu_count": 1, "mem_size_mib": 384, "smt": False}
        assert by_path["/actions"] == {"action_type": "InstanceStart"}

        reader, writer = await handle.open_agent_stream()
        writer.write(b"ping over vsock")
        await writer.drain()
        assert await reader.readexactly(15) == b"ping over vsock"
        writer.close()

        await driver.pause(handle)
        await driver.resume(handle)
        patches = [c for c in calls(fc_log) if c.get("method") == "PATCH"]
        assert [c["body"] for c in patches] == [{"state": "Paused"}, {"state": "Resumed"}]
        for call in patches:
            validate_call(swagger, call["method"], call["path"], call["body"])
    finally:
        await driver.stop(spec.bunker_id)
    assert handle.process.returncode is not None
    assert not (fc_data / "firecracker" / spec.bunker_id).exists()


def test_the_validator_catches_bad_bodies(swagger: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate_call(swagger, "PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 1})
    with pytest.raises(jsonschema.ValidationError):
        validate_call(
            swagger,
            "PUT",
            "/drives/x",
            {"drive_id": "x", "is_root_device": False, "path_on_hots": "/x"},
        )
    with pytest.raises(jsonschema.ValidationError):
        validate_call(swagger, "PATCH", "/vm", {"state": "Frozen"})


async def test_an_api_refusal_fails_the_boot_and_leaves_nothing(
    fake_bin: Path,
    fc_log: Path,
    fc_data: Path,
    make_spec: SpecFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_FC_FAIL", "PUT /drives/scratch")
    driver = fake_driver(fake_bin, fc_data)
    spec = make_spec()
    with pytest.raises(DriverError, match="answered 400: fake refusal of /drives/scratch"):
        await driver.start(spec)
    assert not (fc_data / "firecracker" / spec.bunker_id).exists()
    assert await driver.list_leftovers() == []


async def test_a_guest_panic_fails_the_boot_with_the_console(
    fake_bin: Path,
    fc_log: Path,
    fc_data: Path,
    make_spec: SpecFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_FC_PANIC", "1")
    driver = fake_driver(fake_bin, fc_data)
    spec = make_spec()
    with pytest.raises(DriverError, match=r"exited during boot.*Kernel panic"):
        await driver.start(spec)
    assert not (fc_data / "firecracker" / spec.bunker_id).exists()


async def test_the_jailer_gets_a_staged_chroot_and_relative_paths(
    swagger: dict[str, Any], fake_bin: Path, fc_log: Path, fc_data: Path, make_spec: SpecFactory
) -> None:
    driver = fake_driver(fake_bin, fc_data, jailer=str(fake_bin / "jailer"))
    spec = make_spec()
    handle = await driver.start(spec)
    try:
        entries = calls(fc_log)
        (jail,) = [e for e in entries if "jailer_argv" in e]
        argv = jail["jailer_argv"]
        assert argv[argv.index("--id") + 1] == spec.bunker_id
        assert argv[argv.index("--uid") + 1] == "65534"
        assert argv[argv.index("--") + 1 :] == ["--api-sock", "/api.sock"]
        root = Path(jail["root"])
        assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".sock")) == [
            "initramfs",
            "kernel",
            "rootfs",
            "runtime",
            "scratch",
        ]
        assert (root / "scratch").stat().st_uid == 65534
        api = [e for e in entries if "method" in e]
        for call in api:
            validate_call(swagger, call["method"], call["path"], call["body"])
        by_path = {c["path"]: c["body"] for c in api}
        assert by_path["/boot-source"]["kernel_image_path"] == "/kernel"
        assert by_path["/drives/rootfs"]["path_on_host"] == "/rootfs"
        assert by_path["/vsock"]["uds_path"] == "/vsock.sock"
        reader, writer = await handle.open_agent_stream()
        writer.write(b"jailed")
        assert await reader.readexactly(6) == b"jailed"
        writer.close()
    finally:
        await driver.stop(spec.bunker_id)
    assert not (fc_data / "firecracker" / spec.bunker_id).exists()
    assert not root.exists()


async def test_a_restored_layer_lands_on_the_jailed_scratch_disk_and_reads_back(
    fake_bin: Path, fc_log: Path, fc_data: Path, make_spec: SpecFactory
) -> None:
    """Snapshot plumbing without a guest: ``populate_upper`` fills the scratch disk the
    (jailed) VMM is given, and ``frozen_layer`` reads that disk's upper back with the guest's
    ids, then leaves nothing mounted."""

    def populate(upper: Path) -> None:
        (upper / "data").mkdir()
        (upper / "data" / "f").write_text("restored\n")
        os.chown(upper / "data" / "f", 1000, 50)
        os.mknod(upper / "gone", 0o600 | stat.S_IFCHR, 0)  # an overlay whiteout

    driver = fake_driver(fake_bin, fc_data, jailer=str(fake_bin / "jailer"))
    assert driver.layer_id_base == 0
    spec = make_spec(populate_upper=populate)
    handle = await driver.start(spec)
    state_dir = fc_data / "firecracker" / spec.bunker_id
    try:
        assert handle.scratch_disk.parent.name == "root"  # the chroot's disk
        await driver.pause(handle)
        async with driver.frozen_layer(spec.bunker_id) as upper:
            data = upper / "data" / "f"
            assert data.read_text() == "restored\n"
            assert (data.stat().st_uid, data.stat().st_gid) == (1000, 50)
            gone = (upper / "gone").lstat()
            assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
            assert mounts_under(state_dir) == [str(state_dir / "layer")]
        assert mounts_under(state_dir) == []
        assert sorted(p.name for p in state_dir.iterdir() if p.name.startswith("layer")) == []
    finally:
        await driver.stop(spec.bunker_id)


async def test_vsock_connect_refusal_is_a_connection_error(tmp_path: Path) -> None:
    import asyncio

    path = tmp_path / "v.sock"

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"NOPE\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(refuse, path=str(path))
    try:
        with pytest.raises(ConnectionError, match="refused"):
            await vsock_connect(path, 1024)
    finally:
        server.close()


def _kvm_runs_guests() -> str | None:
    if shutil.which("firecracker") is None:
        return "no firecracker binary installed"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no accessible /dev/kvm"
    from scaigrid.worker.drivers.qemu import probe_accel
    from scaigrid.worker.vm.artifacts import ensure_vm_artifacts

    artifacts = ensure_vm_artifacts(Path("/var/tmp/scaibunker-vm-test/vm-cache"))
    if probe_accel(artifacts) != "kvm":
        return "KVM does not run guests on this host"
    return None


async def test_real_firecracker_boots_the_agent(fc_data: Path, make_spec: SpecFactory) -> None:
    reason = _kvm_runs_guests()
    if reason is not None:
        print(f"skipping the real-Firecracker test: {reason}")
        pytest.skip(reason)
    from scaigrid.protocol.agent import AgentClient

    driver = FirecrackerDriver(fc_data)
    spec = make_spec()
    handle = await driver.start(spec)
    try:
        reader, writer = await handle.open_agent_stream()
        client = await AgentClient.connect(reader, writer, timeout_s=10)
        await client.ping(timeout_s=10)
        await driver.pause(handle)
        await driver.resume(handle)
        await client.ping(timeout_s=10)
        await client.close()
    finally:
        await driver.stop(spec.bunker_id)


@pytest.fixture
def bunker_netns() -> Iterator[str]:
    """A namespace shaped like the network manager's: ``eth0`` (a veth whose peer stays in
    the root namespace) with 10.254.254.2/30 and a default route via .1."""
    import uuid

    from pyroute2 import netns

    from scaigrid.worker.net.manager import create_netns, ipr_in

    name = f"sbvmfc-{uuid.uuid4().hex[:8]}"
    peer = f"sbvp{uuid.uuid4().hex[:8]}"
    create_netns(name)

    def outside(ipr: Any) -> None:
        ipr.link("add", ifname=peer, kind="veth", peer={"ifname": "eth0", "net_ns_fd": name})

    def inside(ipr: Any) -> None:
        index = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=index, address="10.254.254.2", prefixlen=30)
        ipr.link("set", index=index, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway="10.254.254.1")

    try:
        ipr_in(None, outside)
        ipr_in(name, inside)
        yield f"/var/run/netns/{name}"
    finally:
        netns.remove(name)


async def test_a_network_gets_a_tap_nic_and_the_vmm_runs_in_the_namespace(
    swagger: dict[str, Any],
    fake_bin: Path,
    fc_log: Path,
    fc_data: Path,
    make_spec: SpecFactory,
    bunker_netns: str,
) -> None:
    from scaigrid.worker.net.manager import ipr_in
    from scaigrid.worker.vm.network import BRIDGE, TAP, guest_mac

    driver = fake_driver(fake_bin, fc_data)
    spec = make_spec(netns_path=bunker_netns)
    handle = await driver.start(spec)
    try:
        api = [c for c in calls(fc_log) if "method" in c]
        for call in api:
            validate_call(swagger, call["method"], call["path"], call["body"])
        by_path = {c["path"]: c["body"] for c in api}
        assert by_path["/network-interfaces/eth0"] == {
            "iface_id": "eth0",
            "host_dev_name": TAP,
            "guest_mac": guest_mac(spec.bunker_id),
        }
        vmm_netns = os.readlink(f"/proc/{handle.process.pid}/ns/net")
        assert vmm_netns != os.readlink("/proc/self/ns/net")

        def links(ipr: Any) -> dict[str, Any]:
            return {
                link.get_attr("IFLA_IFNAME"): link.get_attr("IFLA_MASTER")
                for link in ipr.get_links()
            }

        found = ipr_in(os.path.basename(bunker_netns), links)
        bridge_index = ipr_in(
            os.path.basename(bunker_netns), lambda ipr: ipr.link_lookup(ifname=BRIDGE)[0]
        )
        assert found["eth0"] == bridge_index and found[TAP] == bridge_index
    finally:
        await driver.stop(spec.bunker_id)

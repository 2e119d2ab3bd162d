"""A container bunker that joins a network namespace owned by its own user namespace
(``transit`` bunkers, :mod:`scaigrid.worker.net.userns`) configures its interfaces as root;
one that joins a worker-owned namespace cannot. Runs once per OCI runtime."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator

import pytest
from pyroute2 import netns

from scaigrid.worker.drivers.container import ContainerDriver
from scaigrid.worker.net.userns import (
    OWNER_UID_BASE,
    OWNER_UID_COUNT,
    create_owned_netns,
    owner_leases,
    owner_uid,
    remove_userns,
    userns_leftovers,
    userns_path,
)
from tests.worker.conftest import StartBunker
from tests.worker.helpers import agent_exec

NET_CAPS = ("CAP_NET_ADMIN", "CAP_NET_RAW")
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13


@pytest.fixture
def owned(driver: ContainerDriver) -> Iterator[str]:
    """An owned network namespace (with a veth pair) mapped to the driver's id range."""
    name = f"sbt-{secrets.token_hex(4)}"
    create_owned_netns(name, driver.id_base, 65536)
    subprocess.run(
        ["ip", "-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
        check=True,
    )
    yield name
    netns.remove(name)
    remove_userns(name)
    assert name not in userns_leftovers("sbt-")
    assert not os.path.exists(f"/run/netns/{name}")


def _cap_eff(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    raise AssertionError("no CapEff line")


def test_owned_netns_maps_the_id_range() -> None:
    name = f"sbt-{secrets.token_hex(4)}"
    create_owned_netns(name, 0x1F0000, 65536)
    try:
        out = subprocess.run(
            ["nsenter", f"--user={userns_path(name)}", "--", "cat", "/proc/self/uid_map"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert out == ["0", str(0x1F0000), "65536"]
        # Owned by a uid of its own, not root: the bunker's per-user counters are its own.
        owner = owner_uid(userns_path(name))
        assert OWNER_UID_BASE <= owner < OWNER_UID_BASE + OWNER_UID_COUNT
        assert owner_leases()[owner] == str(userns_path(name))
    finally:
        netns.remove(name)
        assert remove_userns(name)
    assert owner not in owner_leases()
    assert not remove_userns(name)


async def test_root_in_a_bunker_configures_an_owned_namespace(
    start_bunker: StartBunker, owned: str
) -> None:
    handle = await start_bunker(
        netns_path=f"/run/netns/{owned}",
        userns_path=str(userns_path(owned)),
        extra_capabilities=NET_CAPS,
    )
    pid = await handle.init_pid()
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{owned}").st_ino
    assert os.stat(f"/proc/{pid}/ns/user").st_ino == os.stat(userns_path(owned)).st_ino
    caps = _cap_eff(pid)
    assert caps >> CAP_NET_ADMIN & 1 and caps >> CAP_NET_RAW & 1
    script = (
        "ip link set lo up && ip link set v0 address 02:00:00:00:00:07 && ip link set v0 up"
        " && ip addr add 192.0.2.7/24 dev v0 && ip -o addr show dev v0 && ip -o link show v0"
    )
    code, out = await agent_exec(handle, script)
    assert code == 0, out
    assert "192.0.2.7/24" in out and "02:00:00:00:00:07" in out
    # The host sees what the bunker did: it is the namespace the worker created.
    seen = subprocess.run(
        ["ip", "-n", owned, "-o", "addr", "show", "dev", "v0"], capture_output=True, text=True
    )
    assert "192.0.2.7/24" in seen.stdout


async def test_a_worker_owned_namespace_stays_read_only(start_bunker: StartBunker) -> None:
    name = f"sbt-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        handle = await start_bunker(netns_path=f"/run/netns/{name}")
        pid = await handle.init_pid()
        assert not _cap_eff(pid) >> CAP_NET_ADMIN & 1
        code, out = await agent_exec(handle, "ip link set lo up")
        assert code != 0, out
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)

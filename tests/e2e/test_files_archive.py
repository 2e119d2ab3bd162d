"""Tar archives over the HTTP API and the SDK against a real bunker (SPEC §4.1, §4.3)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from scaigrid.client import Client, ValidationError
from scaigrid.client.errors import FileConflict
from tests.e2e.conftest import create_bunker
from tests.fixtures.stack import BASE, Stack

pytestmark = pytest.mark.e2e


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def info(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.mode = 0o644
    for key, value in attrs.items():
        setattr(member, key, value)
    return member


def test_sdk_round_trip_of_a_local_tree(
    stack: Stack, busybox_image: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    local = Path(tmp_path_factory.mktemp("archive", numbered=True)) / "proj"
    (local / "src/pkg").mkdir(parents=True)
    (local / "src/pkg/mod.py").write_text("print('hi')\n")
    (local / "run.sh").write_text("#!/bin/sh\necho run\n")
    (local / "run.sh").chmod(0o751)
    (local / "big.bin").write_bytes(os.urandom(5 * 1024 * 1024))
    (local / "latest").symlink_to("src/pkg/mod.py")
    bunker = create_bunker(stack, busybox_image)
    with Client(stack.url, stack.admin_key) as client:
        result = client.files.upload_archive(bunker["id"], "proj", local)
        assert result["path"] == "/home/user/proj"
        assert result["entries"] == 6 and result["bytes"] == 5 * 1024 * 1024 + 12 + 19
        run = client.files.stat(bunker["id"], "proj/run.sh")
        assert (run["mode"], run["uid"], run["gid"]) == ("0751", 1000, 1000)
        latest = client.files.stat(bunker["id"], "proj/latest")
        assert (latest["type"], latest["symlink_target"]) == ("symlink", "src/pkg/mod.py")
        ran = client.bunkers.exec(bunker["id"], "./proj/run.sh && cat proj/latest")
        assert ran.stdout == b"run\nprint('hi')\n"

        sink = io.BytesIO()
        written = client.files.download_archive(bunker["id"], "proj", sink)
        assert written == len(sink.getvalue()) > 5 * 1024 * 1024
        sink.seek(0)
        with tarfile.open(fileobj=sink) as tar:
            members = {m.name: m for m in tar.getmembers()}
            assert set(members) == {
                "big.bin",
                "latest",
                "run.sh",
                "src",
                "src/pkg",
                "src/pkg/mod.py",
            }
            assert members["latest"].issym() and members["latest"].linkname == "src/pkg/mod.py"
            assert members["run.sh"].mode == 0o751 and members["run.sh"].uid == 1000
            big = tar.extractfile("big.bin")
            assert big is not None and big.read() == (local / "big.bin").read_bytes()

        with pytest.raises(FileConflict):
            client.files.download_archive(bunker["id"], "proj/run.sh", io.BytesIO())
        client.bunkers.terminate(bunker["id"])


@pytest.mark.parametrize(
    ("members", "named", "outside"),
    [
        ([(info("../escaped"), b"x")], "../escaped", "/home/user/escaped"),
        ([(info("/etc/escaped"), b"x")], "/etc/escaped", "/etc/escaped"),
        (
            [(info("l", tarfile.SYMTYPE, linkname="/etc"), None), (info("l/escaped"), b"x")],
            "l",
            "/etc/escaped",
        ),
        ([(info("zero", tarfile.CHRTYPE, devmajor=1, devminor=5), None)], "zero", None),
    ],
)
def test_escaping_and_device_members_are_refused_as_root_too(
    stack: Stack,
    busybox_image: str,
    members: list[tuple[tarfile.TarInfo, bytes | None]],
    named: str,
    outside: str | None,
) -> None:
    bunker = create_bunker(stack, busybox_image)
    url = f"{BASE}/bunkers/{bunker['id']}/files/archive"
    with stack.client() as client:
        for user in ("user", "root"):
            response = client.put(
                url, params={"path": f"in-{user}", "user": user}, content=tar_of(*members)
            )
            assert response.status_code == 422, response.text
            error = response.json()["error"]
            assert error["code"] == "VALIDATION_ERROR" and named in error["message"]
        if outside is not None:
            stat_url = f"{BASE}/bunkers/{bunker['id']}/files/stat"
            check = client.get(stat_url, params={"path": outside})
            assert check.status_code == 404, check.text
        client.delete(f"{BASE}/bunkers/{bunker['id']}")


def test_owners_as_user_and_as_root(stack: Stack, busybox_image: str) -> None:
    bunker = create_bunker(stack, busybox_image)
    body = tar_of((info("owned", uid=4242, gid=4343), b"data"))
    with Client(stack.url, stack.admin_key) as client:
        client.files.upload_archive(bunker["id"], "as-user", body)
        entry = client.files.stat(bunker["id"], "as-user/owned")
        assert (entry["uid"], entry["gid"]) == (1000, 1000)
        client.files.upload_archive(bunker["id"], "/opt/as-root", body, user="root")
        entry = client.files.stat(bunker["id"], "/opt/as-root/owned")
        assert (entry["uid"], entry["gid"]) == (4242, 4343)
        with pytest.raises(ValidationError):
            client.files.upload_archive(bunker["id"], "junk", b"not a tar at all" * 64)
        client.bunkers.terminate(bunker["id"])


def test_cli_tar_in_and_out(
    stack: Stack, busybox_image: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from click.testing import CliRunner

    from scaigrid.client.cli import cli

    local = Path(tmp_path_factory.mktemp("cli-tar", numbered=True))
    (local / "tree/inner").mkdir(parents=True)
    (local / "tree/inner/a.txt").write_text("alpha\n")
    bunker = create_bunker(stack, busybox_image)
    base = ["--host", stack.url, "--api-key", stack.admin_key]
    put = CliRunner().invoke(cli, [*base, "tar", str(local / "tree"), f"{bunker['id']}:copied"])
    assert put.exit_code == 0, put.output
    assert "2 entries, 6 bytes extracted to /home/user/copied" in put.output
    out = local / "back.tar"
    got = CliRunner().invoke(cli, [*base, "tar", f"{bunker['id']}:copied", str(out)])
    assert got.exit_code == 0, got.output
    with tarfile.open(out) as tar:
        assert tar.getnames() == ["inner", "inner/a.txt"]
    with Client(stack.url, stack.admin_key) as client:
        client.bunkers.terminate(bunker["id"])


async def test_async_sdk_round_trip_to_a_local_tar_file(
    stack: Stack, busybox_image: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from scaigrid.client import AsyncClient

    local = Path(tmp_path_factory.mktemp("async-tar", numbered=True))
    (local / "src/a").mkdir(parents=True)
    (local / "src/a/one.txt").write_text("one\n")
    (local / "src/two.txt").write_text("two\n")
    bunker = create_bunker(stack, busybox_image)
    async with AsyncClient(stack.url, stack.admin_key) as client:
        result = await client.files.upload_archive(bunker["id"], "async-dir", local / "src")
        assert (result["entries"], result["bytes"]) == (3, 8)
        out = local / "back.tar"
        written = await client.files.download_archive(bunker["id"], "async-dir", out)
        assert written == out.stat().st_size
        with tarfile.open(out) as tar:
            assert tar.getnames() == ["a", "a/one.txt", "two.txt"]
        await client.bunkers.terminate(bunker["id"])

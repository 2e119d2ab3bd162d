"""Tar archive download and extracting upload through the real agent (SPEC §4.1, §4.3),
checked against the bunker's root on the host."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from scaigrid.protocol.agent import AgentClient, AgentConnectionLost, AgentError
from tests.agent.conftest import AgentProcess, read_all


def make_tar(*members: tuple[tarfile.TarInfo, bytes | None], compress: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    raw = buffer.getvalue()
    return gzip.compress(raw) if compress else raw


def member(name: str, kind: bytes = tarfile.REGTYPE, **attrs: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = attrs.pop("mode", 0o644)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


async def put_archive(
    client: AgentClient, path: str, body: bytes | AsyncIterator[bytes], **args: Any
) -> dict[str, Any]:
    response = await client.request(
        "PUT", "/v1/files/archive", {"path": path, **args}, body, timeout_s=60
    )
    result: dict[str, Any] = await response.json()
    return result


async def put_error(client: AgentClient, path: str, body: bytes, **args: Any) -> AgentError:
    with pytest.raises(AgentError) as caught:
        await put_archive(client, path, body, **args)
    return caught.value


async def get_archive(client: AgentClient, path: str, **args: Any) -> tuple[bytes, dict[str, Any]]:
    response = await client.request(
        "GET", "/v1/files/archive", {"path": path, **args}, timeout_s=60
    )
    assert response.headers["content-type"] == "application/x-tar"
    body = await read_all(response)
    trailers = await response.trailers()
    return body, json.loads(trailers["x-result"])


def chown_tree(root: Path, uid: int = 1000) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), uid, uid)
    os.lchown(root, uid, uid)


async def test_round_trip_keeps_modes_symlinks_hard_links_and_times(
    agent: AgentProcess, client: AgentClient
) -> None:
    src = agent.root / "home/user/tree"
    (src / "sub/deeper").mkdir(parents=True)
    (src / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o750)
    (src / "secret").write_bytes(b"s" * 1000)
    (src / "secret").chmod(0o600)
    (src / "sub/deeper/blob").write_bytes(os.urandom(200_000))
    (src / "sub").chmod(0o700)
    (src / "link").symlink_to("sub/deeper/blob")
    (src / "dangling").symlink_to("nowhere")
    os.link(src / "secret", src / "secret-again")
    chown_tree(src)
    os.utime(src / "secret", (1_600_000_000, 1_600_000_000))

    body, result = await get_archive(client, "tree")
    assert result["entries"] == 8 and result["skipped"] == 0
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert sorted(members) == [
            "dangling",
            "link",
            "run.sh",
            "secret",
            "secret-again",
            "sub",
            "sub/deeper",
            "sub/deeper/blob",
        ]
        assert members["link"].issym() and members["link"].linkname == "sub/deeper/blob"
        assert members["secret-again"].islnk()
        assert members["run.sh"].mode == 0o750 and members["sub"].mode == 0o700
        assert (members["secret"].uid, members["secret"].mtime) == (1000, 1_600_000_000)
        blob = tar.extractfile("sub/deeper/blob")
        assert blob is not None and blob.read() == (src / "sub/deeper/blob").read_bytes()

    result = await put_archive(client, "copy", body)
    assert result == {"path": "/home/user/copy", "entries": 8, "bytes": 18 + 1000 + 200_000}
    dst = agent.root / "home/user/copy"
    assert (dst / "run.sh").stat().st_mode & 0o7777 == 0o750
    assert (dst / "sub").stat().st_mode & 0o7777 == 0o700
    assert os.readlink(dst / "link") == "sub/deeper/blob"
    assert (dst / "link").read_bytes() == (src / "sub/deeper/blob").read_bytes()
    assert (dst / "secret").stat().st_ino == (dst / "secret-again").stat().st_ino
    assert (dst / "secret").stat().st_mtime == 1_600_000_000
    for path in (dst, dst / "run.sh", dst / "sub/deeper/blob"):
        assert (path.lstat().st_uid, path.lstat().st_gid) == (1000, 1000)


async def test_upload_as_user_owns_the_files_and_as_root_keeps_the_archived_owners(
    agent: AgentProcess, client: AgentClient
) -> None:
    body = make_tar(
        (member("d", tarfile.DIRTYPE, mode=0o755, uid=0, gid=0), None),
        (member("d/f", uid=0, gid=0, mode=0o4755), b"root's"),
        (member("g", uid=1234, gid=4321), b"other"),
    )
    await put_archive(client, "as-user", body)
    base = agent.root / "home/user/as-user"
    for name in ("d", "d/f", "g"):
        st = (base / name).stat()
        assert (st.st_uid, st.st_gid) == (1000, 1000), name
    assert (base / "d/f").stat().st_mode & 0o7777 == 0o4755  # its own file: allowed

    await put_archive(client, "/srv/as-root", body, user="root")
    base = agent.root / "srv/as-root"
    assert ((base / "d/f").stat().st_uid, (base / "g").stat().st_uid) == (0, 1234)
    assert (base / "g").stat().st_gid == 4321
    assert (base / "d/f").stat().st_mode & 0o7777 == 0o4755

    error = await put_error(client, "/root/nope", body)
    assert error.code == "FILE_ACCESS_DENIED"
    assert not (agent.root / "root/nope").exists()


@pytest.mark.parametrize(
    ("members", "named", "outside"),
    [
        ([(member("../escaped"), b"x")], "../escaped", "home/user/escaped"),
        ([(member("ok/../../escaped2"), b"x")], "ok/../../escaped2", "home/user/escaped2"),
        ([(member("/etc/escaped"), b"x")], "/etc/escaped", "etc/escaped"),
        (
            [
                (member("l", tarfile.SYMTYPE, linkname="/etc"), None),
                (member("l/escaped3"), b"x"),
            ],
            "l",
            "etc/escaped3",
        ),
        (
            [
                (member("l", tarfile.SYMTYPE, linkname="../../../etc"), None),
                (member("l/escaped4"), b"x"),
            ],
            "l",
            "etc/escaped4",
        ),
        (
            [
                (member("d", tarfile.DIRTYPE, mode=0o755), None),
                (member("d/up", tarfile.SYMTYPE, linkname=".."), None),
                (member("d/up/up", tarfile.SYMTYPE, linkname=".."), None),
                (member("d/up/up/escaped5"), b"x"),
            ],
            "d/up/up",
            "home/user/escaped5",
        ),
        ([(member("h", tarfile.LNKTYPE, linkname="../../../etc/passwd"), None)], "h", None),
        ([(member("h", tarfile.LNKTYPE, linkname="/etc/passwd"), None)], "h", None),
        ([(member("null", tarfile.CHRTYPE, devmajor=1, devminor=3), None)], "null", None),
        ([(member("disk", tarfile.BLKTYPE, devmajor=8, devminor=0), None)], "disk", None),
        ([(member("fifo", tarfile.FIFOTYPE), None)], "fifo", None),
    ],
)
@pytest.mark.parametrize("user", ["user", "root"])
async def test_escaping_and_special_members_are_refused(
    agent: AgentProcess,
    client: AgentClient,
    members: list[tuple[tarfile.TarInfo, bytes | None]],
    named: str,
    outside: str | None,
    user: str,
) -> None:
    target = f"/home/user/refuse-{os.urandom(4).hex()}"
    body = make_tar((member("first"), b"kept"), *members)
    error = await put_error(client, target, body, user=user)
    assert error.code == "VALIDATION_ERROR"
    assert named in error.message
    assert error.details and error.details[0]["field"] == "archive"
    # Extraction is streamed, not atomic (SPEC §4.3): the member before the refused one stays.
    assert (agent.root / target.lstrip("/") / "first").read_bytes() == b"kept"
    if outside is not None:
        assert not (agent.root / outside).exists()
    assert not os.path.lexists(agent.root / target.lstrip("/") / named.lstrip("/"))
    assert (agent.root / "etc/passwd").read_text().startswith("root:x:0:0")


async def test_writes_through_an_existing_symlink_leading_outside_are_refused(
    agent: AgentProcess, client: AgentClient
) -> None:
    dest = agent.root / "home/user/has-links"
    dest.mkdir()
    (dest / "to-etc").symlink_to("/etc")
    (dest / "to-passwd").symlink_to("/etc/passwd")
    chown_tree(dest)
    before = (agent.root / "etc/passwd").read_bytes()
    for name in ("to-etc/planted", "to-passwd"):
        error = await put_error(
            client,
            str(dest).removeprefix(str(agent.root)),
            make_tar((member(name), b"owned")),
            user="root",
        )
        assert (error.code, name in error.message) == ("VALIDATION_ERROR", True)
    assert not (agent.root / "etc/planted").exists()
    assert (agent.root / "etc/passwd").read_bytes() == before


async def test_compressed_and_streamed_uploads_and_bad_bodies(
    agent: AgentProcess, client: AgentClient
) -> None:
    content = os.urandom(12 * 1024 * 1024 + 7)
    body = make_tar((member("big.bin"), content), compress=True)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 100_000):
            yield body[start : start + 100_000]

    result = await put_archive(client, "gz", chunks())
    assert result == {"path": "/home/user/gz", "entries": 1, "bytes": len(content)}
    on_host = (agent.root / "home/user/gz/big.bin").read_bytes()
    assert hashlib.sha256(on_host).digest() == hashlib.sha256(content).digest()

    for mode in ("w:bz2", "w:xz"):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode=mode) as tar:  # type: ignore[call-overload]
            info = member("small.txt")
            info.size = 5
            tar.addfile(info, io.BytesIO(b"hello"))
        result = await put_archive(client, f"compressed-{mode[2:]}", buffer.getvalue())
        assert result["entries"] == 1
        assert (agent.root / f"home/user/compressed-{mode[2:]}/small.txt").read_bytes() == b"hello"

    error = await put_error(client, "garbage", b"this is not a tar archive" * 100)
    assert error.code == "VALIDATION_ERROR"
    truncated = make_tar((member("cut.bin"), os.urandom(100_000)))[:50_000]
    error = await put_error(client, "truncated", truncated)
    assert error.code == "VALIDATION_ERROR"
    (agent.root / "home/user/plain-file").write_bytes(b"x")
    error = await put_error(client, "plain-file", make_tar((member("a"), b"a")))
    assert error.code == "FILE_CONFLICT"


async def test_download_errors_and_unreadable_entries(
    agent: AgentProcess, client: AgentClient
) -> None:
    for path, code in (("missing-dir", "FILE_NOT_FOUND"), ("/etc/passwd", "FILE_CONFLICT")):
        with pytest.raises(AgentError) as caught:
            await client.request("GET", "/v1/files/archive", {"path": path}, timeout_s=10)
        assert caught.value.code == code
    with pytest.raises(AgentError) as caught:
        await client.request("GET", "/v1/files/archive", {"path": "/root"}, timeout_s=10)
    assert caught.value.code == "FILE_ACCESS_DENIED"

    mixed = agent.root / "home/user/mixed"
    mixed.mkdir()
    (mixed / "readable").write_bytes(b"r")
    (mixed / "private").write_bytes(b"p")
    chown_tree(mixed)
    os.chown(mixed / "private", 0, 0)
    (mixed / "private").chmod(0o600)
    body, result = await get_archive(client, "mixed")
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        assert tar.getnames() == ["readable"]
    assert (result["entries"], result["skipped"]) == (1, 1)
    body, result = await get_archive(client, "mixed", user="root")
    assert (result["entries"], result["skipped"]) == (2, 0)


async def test_a_client_reset_mid_upload_stops_the_extraction(
    agent: AgentProcess, client: AgentClient
) -> None:
    body = make_tar((member("huge.bin"), os.urandom(8 * 1024 * 1024)))

    class Broken(Exception):
        pass

    async def chunks() -> AsyncIterator[bytes]:
        yield body[: 1024 * 1024]
        raise Broken

    with pytest.raises((Broken, AgentConnectionLost)):
        await put_archive(client, "reset", chunks())
    # The agent still serves requests, and no archive child is left running.
    await client.ping()


async def test_a_tree_deeper_than_pythons_recursion_limit_is_archived(
    agent: AgentProcess, client: AgentClient
) -> None:
    deep = agent.root / "home/user/deep"
    deep.mkdir()
    os.chown(deep, 1000, 1000)
    fd = os.open(deep, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(1100):  # relative to an fd: no host path gets near PATH_MAX
            os.mkdir("d", dir_fd=fd)
            os.chown("d", 1000, 1000, dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf = os.open("bottom.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"found")
        os.close(leaf)
        os.chown("bottom.txt", 1000, 1000, dir_fd=fd)
    finally:
        os.close(fd)
    try:
        body, result = await get_archive(client, "deep")
        assert (result["entries"], result["skipped"]) == (1101, 0)
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            bottom = tar.extractfile("/".join(["d"] * 1100) + "/bottom.txt")
            assert bottom is not None and bottom.read() == b"found"
    finally:
        # rm(1) walks any depth; shutil.rmtree (pytest's clean-up of old temporary
        # directories included) would hit the recursion limit on this tree.
        subprocess.run(["rm", "-rf", "--one-file-system", str(deep)], check=True)

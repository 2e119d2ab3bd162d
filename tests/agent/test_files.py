"""File operations through the real agent, checked against the bunker's root on the host."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from scaigrid.agent.files import os_error
from scaigrid.protocol.agent import AgentClient, AgentError
from tests.agent.conftest import AgentProcess, read_all, run_exec


async def put(client: AgentClient, path: str, body: bytes, **args: Any) -> dict[str, Any]:
    response = await client.request("PUT", "/v1/files", {"path": path, **args}, body, timeout_s=30)
    result: dict[str, Any] = await response.json()
    return result


async def get(client: AgentClient, path: str, **args: Any) -> tuple[dict[str, Any], bytes]:
    response = await client.request("GET", "/v1/files", {"path": path, **args}, timeout_s=30)
    return json.loads(response.headers["x-meta"]), await read_all(response)


async def call(client: AgentClient, method: str, route: str, /, **args: Any) -> Any:
    return await (await client.request(method, route, args, timeout_s=10)).json()


async def error_of(client: AgentClient, method: str, route: str, /, **args: Any) -> AgentError:
    with pytest.raises(AgentError) as caught:
        await client.request(method, route, args, timeout_s=10)
    return caught.value


async def test_write_then_read_is_byte_identical_with_its_sha256(
    agent: AgentProcess, client: AgentClient
) -> None:
    content = os.urandom(3 * 1024 * 1024 + 5)
    result = await put(client, "data/blob.bin", content)
    assert result == {
        "path": "/home/user/data/blob.bin",
        "size": len(content),
        "sha256": hashlib.sha256(content).hexdigest(),
        "mode": "0644",
    }
    meta, data = await get(client, "/home/user/data/blob.bin")
    assert meta == {"size": len(content), "offset": 0, "length": len(content)}
    assert data == content
    on_host = agent.root / "home/user/data/blob.bin"
    assert on_host.read_bytes() == content
    st = on_host.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1000, 1000, 0o644)
    meta, data = await get(client, "data/blob.bin", offset=1000, length=10)
    assert (meta["offset"], meta["length"], data) == (1000, 10, content[1000:1010])
    error = await error_of(
        client, "GET", "/v1/files", path="data/blob.bin", offset=len(content) + 1
    )
    assert (error.code, error.status) == ("VALIDATION_ERROR", 416)


async def test_write_streams_an_iterator_body_and_sets_the_mode(client: AgentClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(20):
            yield bytes([i]) * 50_000

    response = await client.request(
        "PUT",
        "/v1/files",
        {"path": "/tmp/streamed", "mode": 0o600, "user": "root"},
        chunks(),
        timeout_s=10,
    )
    result = await response.json()
    assert (result["size"], result["mode"]) == (1_000_000, "0600")
    entry = await call(client, "GET", "/v1/files/stat", path="/tmp/streamed")
    assert (entry["mode"], entry["uid"], entry["type"]) == ("0600", 0, "file")


async def test_an_aborted_upload_leaves_no_temp_file_and_the_old_content(
    agent: AgentProcess, client: AgentClient
) -> None:
    await put(client, "keep/file.txt", b"old content")

    class Broken(Exception):
        pass

    async def failing() -> AsyncIterator[bytes]:
        yield b"x" * 300_000
        await asyncio.sleep(0.1)
        raise Broken

    with pytest.raises(Broken):
        await client.request("PUT", "/v1/files", {"path": "keep/file.txt"}, failing(), timeout_s=10)
    directory = agent.root / "home/user/keep"
    for _ in range(100):
        if sorted(os.listdir(directory)) == ["file.txt"]:
            break
        await asyncio.sleep(0.02)
    assert sorted(os.listdir(directory)) == ["file.txt"]
    assert (directory / "file.txt").read_bytes() == b"old content"


async def test_a_full_disk_is_reported_and_cleaned_up(client: AgentClient) -> None:
    error = await error_of_put(client, "/small/big", os.urandom(2 * 1024 * 1024), user="root")
    assert (error.code, error.status) == ("BUNKER_DISK_FULL", 507)
    assert await call(client, "GET", "/v1/files/list", path="/small", user="root") == []


async def error_of_put(client: AgentClient, path: str, body: bytes, **args: Any) -> AgentError:
    with pytest.raises(AgentError) as caught:
        await put(client, path, body, **args)
    return caught.value


async def test_write_errors_for_a_directory_or_a_missing_parent(client: AgentClient) -> None:
    await call(client, "POST", "/v1/files/mkdir", path="adir")
    assert (await error_of_put(client, "adir", b"x")).code == "FILE_CONFLICT"
    error = await error_of_put(client, "missing/parent/f", b"x", parents=False)
    assert (error.code, error.status) == ("FILE_NOT_FOUND", 404)
    result = await put(client, "made/on/demand/f", b"x")
    assert result["path"] == "/home/user/made/on/demand/f"


async def test_writing_follows_a_symlink_at_the_path(
    agent: AgentProcess, client: AgentClient
) -> None:
    await put(client, "real.txt", b"1")
    await run_exec(client, "ln -sf real.txt link.txt")
    await put(client, "link.txt", b"through the link")
    assert (agent.root / "home/user/real.txt").read_bytes() == b"through the link"
    assert (agent.root / "home/user/link.txt").is_symlink()


async def test_dotdot_and_symlinks_stay_inside_the_bunker_root(
    agent: AgentProcess, client: AgentClient
) -> None:
    result = await put(client, "../../../../../../../etc/escape-test", b"inside", user="root")
    assert result["path"] == "/etc/escape-test"
    assert (agent.root / "etc/escape-test").read_bytes() == b"inside"
    assert not os.path.exists("/etc/escape-test")
    (agent.root / "etc/marker").write_text("bunker root")
    await run_exec(client, "ln -s / toroot; ln -s /work toworkdir")
    _, data = await get(client, "toroot/etc/marker")
    assert data == b"bunker root"
    _, data = await get(client, "toroot/../../etc/marker")
    assert data == b"bunker root"
    error = await error_of(client, "GET", "/v1/files", path="toworkdir/main/pyproject.toml")
    assert error.code == "FILE_NOT_FOUND"


async def test_list_stat_mkdir_move_and_delete(client: AgentClient) -> None:
    root = "/home/user/tree"
    entry = await call(client, "POST", "/v1/files/mkdir", path=root)
    assert (entry["type"], entry["mode"], entry["uid"]) == ("dir", "0755", 1000)
    await call(client, "POST", "/v1/files/mkdir", path=f"{root}/a/b", parents=True, mode=0o700)
    await put(client, f"{root}/a/b/c.txt", b"ccc")
    await put(client, f"{root}/z.txt", b"zz")
    await run_exec(client, f"ln -s a/b/c.txt {root}/link")

    listing = await call(client, "GET", "/v1/files/list", path=root, depth=3)
    assert [e["path"] for e in listing] == [
        f"{root}/a",
        f"{root}/a/b",
        f"{root}/a/b/c.txt",
        f"{root}/link",
        f"{root}/z.txt",
    ]
    by_name = {e["name"]: e for e in listing}
    assert by_name["b"]["mode"] == "0700"
    assert (by_name["c.txt"]["type"], by_name["c.txt"]["size"]) == ("file", 3)
    assert (by_name["link"]["type"], by_name["link"]["symlink_target"]) == ("symlink", "a/b/c.txt")
    assert by_name["z.txt"]["mtime"].endswith("Z")
    shallow = await call(client, "GET", "/v1/files/list", path=root)
    assert [e["name"] for e in shallow] == ["a", "link", "z.txt"]

    stat = await call(client, "GET", "/v1/files/stat", path=f"{root}/link")
    assert stat["type"] == "symlink"
    assert (await error_of(client, "GET", "/v1/files/stat", path=f"{root}/nope")).code == (
        "FILE_NOT_FOUND"
    )
    assert (await error_of(client, "GET", "/v1/files/list", path=f"{root}/z.txt")).code == (
        "FILE_CONFLICT"
    )
    assert (await error_of(client, "GET", "/v1/files", path=root)).code == "FILE_CONFLICT"
    assert (await error_of(client, "POST", "/v1/files/mkdir", path=f"{root}/a")).code == (
        "FILE_CONFLICT"
    )
    assert (await error_of(client, "POST", "/v1/files/mkdir", path=f"{root}/x/y")).code == (
        "FILE_NOT_FOUND"
    )

    moved = await call(client, "POST", "/v1/files/move", src=f"{root}/z.txt", dst=f"{root}/y.txt")
    assert (moved["path"], moved["size"]) == (f"{root}/y.txt", 2)
    await put(client, f"{root}/w.txt", b"w")
    error = await error_of(
        client, "POST", "/v1/files/move", src=f"{root}/w.txt", dst=f"{root}/y.txt"
    )
    assert error.code == "FILE_CONFLICT"
    await call(
        client, "POST", "/v1/files/move", src=f"{root}/w.txt", dst=f"{root}/y.txt", overwrite=True
    )
    _, data = await get(client, f"{root}/y.txt")
    assert data == b"w"
    error = await error_of(client, "POST", "/v1/files/move", src=f"{root}/gone", dst=f"{root}/q")
    assert error.code == "FILE_NOT_FOUND"

    assert (await error_of(client, "DELETE", "/v1/files", path=f"{root}/a")).code == (
        "FILE_CONFLICT"
    )
    assert await call(client, "DELETE", "/v1/files", path=f"{root}/link") == {
        "path": f"{root}/link",
        "deleted": True,
    }
    await call(client, "DELETE", "/v1/files", path=root, recursive=True)
    assert (await error_of(client, "DELETE", "/v1/files", path=root)).code == "FILE_NOT_FOUND"


async def test_permissions_are_checked_as_the_acting_user(
    agent: AgentProcess, client: AgentClient
) -> None:
    await put(client, "/root/secret", b"top secret", user="root", mode=0o600)
    await put(client, "/etc/root-only", b"x", user="root", mode=0o600)
    error = await error_of(client, "GET", "/v1/files", path="/etc/root-only")
    assert (error.code, error.status) == ("FILE_ACCESS_DENIED", 403)
    assert (await error_of(client, "GET", "/v1/files", path="/root/secret")).code == (
        "FILE_ACCESS_DENIED"
    )
    assert (await error_of(client, "GET", "/v1/files/list", path="/root")).code == (
        "FILE_ACCESS_DENIED"
    )
    assert (await error_of_put(client, "/etc/user-file", b"x")).code == "FILE_ACCESS_DENIED"
    assert not (agent.root / "etc/user-file").exists()
    assert (await error_of(client, "DELETE", "/v1/files", path="/etc/root-only")).code == (
        "FILE_ACCESS_DENIED"
    )
    _, data = await get(client, "/root/secret", user="root")
    assert data == b"top secret"
    # The agent's own ids are back to root after acting as the user.
    _, out, _ = await run_exec(
        client, "cat /proc/1/status | grep -E '^(Uid|Gid|Groups)'", user="root"
    )
    assert b"Uid:\t0\t0\t0\t0" in out and b"Gid:\t0\t0\t0\t0" in out


@pytest.mark.parametrize("path", ["", "a\x00b", "x" * 4097, 7])
async def test_invalid_paths_are_validation_errors(client: AgentClient, path: object) -> None:
    error = await error_of(client, "GET", "/v1/files/stat", path=path)
    assert (error.code, error.status) == ("VALIDATION_ERROR", 422)


async def test_deleting_dot_or_dotdot_is_refused_before_anything_is_removed(
    client: AgentClient,
) -> None:
    await call(client, "POST", "/v1/files/mkdir", path="/home/user/keep/d", parents=True)
    await put(client, "/home/user/keep/d/f", b"f")
    for path in (".", "keep/d/.", "keep/d/..", "keep/d/./"):
        error = await error_of(client, "DELETE", "/v1/files", path=path, recursive=True)
        assert error.code == "FILE_CONFLICT", path
    _, data = await get(client, "/home/user/keep/d/f")
    assert data == b"f"


async def test_file_names_that_are_not_utf8_are_listed_with_replacement_characters(
    client: AgentClient,
) -> None:
    await run_exec(
        client,
        "mkdir -p /home/user/odd && cd /home/user/odd && printf x > \"$(printf 'bad\\377')\" "
        "&& ln -s \"$(printf 'to\\376')\" link",
    )
    listing = await call(client, "GET", "/v1/files/list", path="/home/user/odd")
    assert sorted(e["name"] for e in listing) == ["bad\ufffd", "link"]
    link = await call(client, "GET", "/v1/files/stat", path="/home/user/odd/link")
    assert link["symlink_target"] == "to\ufffd"


def test_special_files_that_cannot_be_read_are_conflicts_not_server_faults() -> None:
    for number in (errno.ENXIO, errno.ENODEV, errno.ESPIPE):
        error = os_error(OSError(number, os.strerror(number)), "/dev/tty")
        assert error.code == "FILE_CONFLICT", number
    assert os_error(OSError(errno.EIO, "I/O error"), "/x").code == "INTERNAL_ERROR"

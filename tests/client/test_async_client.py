"""The async client has the blocking client's surface (against the stand-in over HTTP)."""

from __future__ import annotations

import inspect
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from scaigrid.client import AsyncClient, BunkerNotFound, BunkerStopped, Client
from scaigrid.client import _io as client_io
from scaigrid.client.async_client import AsyncBunkers, AsyncFiles, AsyncImages
from scaigrid.client.client import Bunkers, Files, Images
from tests.client.standin import StandinState


@pytest.mark.parametrize(
    ("sync_cls", "async_cls"),
    [(Bunkers, AsyncBunkers), (Files, AsyncFiles), (Images, AsyncImages), (Client, AsyncClient)],
)
def test_the_async_surface_matches_the_sync_one(sync_cls: type, async_cls: type) -> None:
    public = {name for name in vars(sync_cls) if not name.startswith("_")}
    assert public <= set(vars(async_cls))
    for name in public - {"base_url", "close"}:
        sync_params = inspect.signature(getattr(sync_cls, name)).parameters
        async_params = inspect.signature(getattr(async_cls, name)).parameters
        assert list(sync_params) == list(async_params), name


async def test_create_wait_get_list_terminate(aclient: AsyncClient, standin: StandinState) -> None:
    created = await aclient.bunkers.create(image="debian-12", name="a", memory_mb=256)
    running = await aclient.bunkers.wait_running(created.id, timeout_s=5, poll_interval_s=0.01)
    assert running.status == "running"
    for index in range(3):
        standin.add_bunker(name=f"n{index}")
    names = [b.name async for b in aclient.bunkers.list()]
    assert names == ["n2", "n1", "n0", "a"]
    assert [b.name async for b in aclient.bunkers.list(limit=1)] == ["n2"]
    assert (await aclient.bunkers.terminate(created.id)).status == "stopping"
    with pytest.raises(BunkerNotFound):
        await aclient.bunkers.get("bnk_missing")


async def test_wait_running_raises_when_the_bunker_fails(aclient: AsyncClient) -> None:
    created = await aclient.bunkers.create(image="debian-12", name="doomed")
    with pytest.raises(BunkerStopped):
        await aclient.bunkers.wait_running(created.id, timeout_s=5, poll_interval_s=0.01)


async def test_exec_returns_bytes(aclient: AsyncClient, standin: StandinState) -> None:
    bunker_id = standin.add_bunker()["id"]
    result = await aclient.bunkers.exec(bunker_id, "binary")
    assert result.stdout == bytes(range(256))
    piped = await aclient.bunkers.exec(bunker_id, ["cat"], stdin=b"\x00in")
    assert piped.stdout == b"\x00in"


async def test_uploads_stream_from_async_iterables_files_and_paths(
    aclient: AsyncClient, standin: StandinState, tmp_path: Path
) -> None:
    bunker_id = standin.add_bunker()["id"]

    async def chunks() -> AsyncIterator[bytes]:
        for index in range(5):
            yield bytes([index]) * 70_000

    await aclient.files.write(bunker_id, "gen.bin", chunks())
    assert standin.uploads[-1].data == b"".join(bytes([i]) * 70_000 for i in range(5))
    assert standin.uploads[-1].headers["transfer-encoding"] == "chunked"

    data = os.urandom(client_io.CHUNK_BYTES * 3 + 1)
    await aclient.files.write(bunker_id, "file.bin", io.BytesIO(data))
    assert standin.uploads[-1].data == data
    assert standin.uploads[-1].headers["transfer-encoding"] == "chunked"

    local = tmp_path / "local.bin"
    local.write_bytes(data[::-1])
    written = await aclient.files.write(bunker_id, "path.bin", local, mode=0o640)
    assert standin.uploads[-1].data == data[::-1]
    assert written["size"] == len(data)


async def test_downloads_and_file_calls(
    aclient: AsyncClient, standin: StandinState, tmp_path: Path
) -> None:
    bunker_id = standin.add_bunker()["id"]
    data = os.urandom(500_000)
    standin.files[bunker_id]["/home/user/d.bin"] = data
    dest = tmp_path / "d.bin"
    assert await aclient.files.download(bunker_id, "d.bin", dest) == len(data)
    assert dest.read_bytes() == data
    sink = io.BytesIO()
    await aclient.files.download(bunker_id, "d.bin", sink)
    assert sink.getvalue() == data
    assert await aclient.files.read(bunker_id, "d.bin") == data
    await aclient.files.mkdir(bunker_id, "sub")
    await aclient.files.move(bunker_id, "d.bin", "sub/e.bin")
    assert [e["name"] for e in await aclient.files.list(bunker_id, "sub")] == ["e.bin"]
    assert (await aclient.files.stat(bunker_id, "sub/e.bin"))["size"] == len(data)
    assert (await aclient.files.delete(bunker_id, "sub", recursive=True))["deleted"] is True


async def test_images(aclient: AsyncClient) -> None:
    image = await aclient.images.register("extra", {"kind": "tar", "path": "/srv/root.tar"})
    assert (await aclient.images.get(image.id)).name == "extra"
    assert [i.name async for i in aclient.images.list()] == ["extra", "debian-12"]

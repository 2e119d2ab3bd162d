"""The blocking client's files calls: uploads and downloads stream (SPEC §4)."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from scaigrid.client import APIConnectionError, Client, ConflictError
from scaigrid.client import _io as client_io
from scaigrid.client.errors import BunkerFileNotFound, FileConflict
from tests.client.standin import StandinState

MIB = 1024 * 1024


class SpyReader:
    """A binary file that records every ``read`` size it is asked for."""

    def __init__(self, data: bytes) -> None:
        self._file = io.BytesIO(data)
        self.sizes: list[int | None] = []

    def read(self, size: int | None = -1) -> bytes:
        self.sizes.append(size)
        return self._file.read(size)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SpyReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SpyWriter:
    """A binary file that records every write."""

    def __init__(self) -> None:
        self.writes: list[int] = []
        self.buffer = bytearray()

    def write(self, data: bytes) -> int:
        self.writes.append(len(data))
        self.buffer += data
        return len(data)


@pytest.fixture
def bunker_id(standin: StandinState) -> str:
    """A running bunker of the stand-in."""
    return str(standin.add_bunker()["id"])


def _assert_streamed(upload_headers: dict[str, str], chunk_sizes: list[int]) -> None:
    assert upload_headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in upload_headers
    assert upload_headers["content-type"] == "application/octet-stream"
    assert len(chunk_sizes) > 1


def test_a_file_object_is_streamed_in_sized_reads(
    client: Client, standin: StandinState, bunker_id: str
) -> None:
    data = os.urandom(3 * MIB + 17)
    spy = SpyReader(data)
    written = client.files.write(bunker_id, "big.bin", spy, mode=0o600)
    upload = standin.uploads[-1]
    assert upload.data == data
    _assert_streamed(upload.headers, upload.chunk_sizes)
    assert spy.sizes and all(size == client_io.CHUNK_BYTES for size in spy.sizes)
    assert written == {
        "path": "/home/user/big.bin",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "mode": 0o600,
    }
    assert ("PUT", f"/v1/modules/scaibunker/bunkers/{bunker_id}/files") == standin.requests[-1][:2]
    assert standin.requests[-1][2] == "path=big.bin&mode=0600&parents=true&user=user"


def test_a_local_path_is_opened_and_streamed_without_reading_it_whole(
    client: Client,
    standin: StandinState,
    bunker_id: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = os.urandom(2 * MIB)
    local = tmp_path / "local.bin"
    local.write_bytes(data)
    spies: list[SpyReader] = []

    def open_spy(path: os.PathLike[str]) -> SpyReader:
        spies.append(SpyReader(Path(path).read_bytes()))
        return spies[-1]

    monkeypatch.setattr(client_io, "_open_read", open_spy)
    client.files.write(bunker_id, "copy.bin", local)
    assert standin.uploads[-1].data == data
    _assert_streamed(standin.uploads[-1].headers, standin.uploads[-1].chunk_sizes)
    assert all(size == client_io.CHUNK_BYTES for size in spies[0].sizes)


def test_a_real_file_path_round_trips(
    client: Client, standin: StandinState, bunker_id: str, tmp_path: Path
) -> None:
    local = tmp_path / "report.csv"
    local.write_bytes(b"a,b\n1,2\n" * 50_000)
    client.files.write(bunker_id, "out/report.csv", local)
    assert client.files.read(bunker_id, "out/report.csv") == local.read_bytes()


def test_a_generator_of_chunks_is_streamed(
    client: Client, standin: StandinState, bunker_id: str
) -> None:
    def chunks() -> Iterator[bytes]:
        for index in range(8):
            yield bytes([index]) * 100_000

    client.files.write(bunker_id, "gen.bin", chunks())
    upload = standin.uploads[-1]
    assert upload.data == b"".join(bytes([i]) * 100_000 for i in range(8))
    _assert_streamed(upload.headers, upload.chunk_sizes)


def test_bytes_and_text_are_sent_with_a_length(
    client: Client, standin: StandinState, bunker_id: str
) -> None:
    client.files.write(bunker_id, "a.txt", "héllo\n")
    assert standin.uploads[-1].data == "héllo\n".encode()
    assert standin.uploads[-1].headers["content-length"] == str(len("héllo\n".encode()))
    client.files.write(bunker_id, "b.bin", b"\x00\xff")
    assert client.files.read(bunker_id, "b.bin") == b"\x00\xff"


def test_text_mode_files_and_unknown_types_are_refused(
    client: Client, bunker_id: str, tmp_path: Path
) -> None:
    local = tmp_path / "t.txt"
    local.write_text("text")
    with local.open() as text_file, pytest.raises(TypeError, match="bytes"):
        client.files.write(bunker_id, "t.txt", text_file)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        client.files.write(bunker_id, "n", 42)  # type: ignore[arg-type]


def test_a_missing_local_file_fails_before_any_request(
    client: Client, standin: StandinState, bunker_id: str, tmp_path: Path
) -> None:
    before = len(standin.requests)
    with pytest.raises(FileNotFoundError):
        client.files.write(bunker_id, "x", tmp_path / "missing")
    assert len(standin.requests) == before


def test_upload_errors_are_typed(client: Client, bunker_id: str) -> None:
    with pytest.raises(BunkerFileNotFound):
        client.files.write(bunker_id, "no/parent/x", b"x", parents=False)
    client.files.mkdir(bunker_id, "d")
    with pytest.raises(ConflictError):
        client.files.write(bunker_id, "d", b"x")


def test_download_streams_into_a_file_object(
    client: Client, standin: StandinState, bunker_id: str
) -> None:
    data = os.urandom(MIB + 5)
    standin.files[bunker_id]["/home/user/dl.bin"] = data
    sink = SpyWriter()
    assert client.files.download(bunker_id, "dl.bin", sink) == len(data)
    assert bytes(sink.buffer) == data
    assert len(sink.writes) > 1 and max(sink.writes) <= client_io.CHUNK_BYTES


def test_download_to_a_path_replaces_it_when_complete(
    client: Client, standin: StandinState, bunker_id: str, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    standin.files[bunker_id]["/home/user/dl.bin"] = data
    dest = tmp_path / "dl.bin"
    dest.write_bytes(b"old")
    assert client.files.download(bunker_id, "/home/user/dl.bin", str(dest)) == len(data)
    assert dest.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl.bin"]


def test_a_download_into_a_fifo_writes_through_it_and_keeps_it(
    client: Client, standin: StandinState, bunker_id: str, tmp_path: Path
) -> None:
    """Like ``cp x /dev/null``: a special destination is written in place, never replaced."""
    data = os.urandom(300_000)
    standin.files[bunker_id]["/home/user/dl.bin"] = data
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = bytearray()

    def drain() -> None:
        with open(fifo, "rb") as reader:
            while chunk := reader.read(65536):
                received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    assert client.files.download(bunker_id, "dl.bin", fifo) == len(data)
    reader.join(10)
    assert bytes(received) == data
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_a_download_through_a_symlink_keeps_the_link(
    client: Client, standin: StandinState, bunker_id: str, tmp_path: Path
) -> None:
    data = os.urandom(1000)
    standin.files[bunker_id]["/home/user/dl.bin"] = data
    real = tmp_path / "real.bin"
    real.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    client.files.download(bunker_id, "dl.bin", link)
    assert link.is_symlink() and real.read_bytes() == data


def test_a_broken_download_leaves_the_destination_untouched(
    client: Client, standin: StandinState, bunker_id: str, tmp_path: Path
) -> None:
    standin.files[bunker_id]["/home/user/broken"] = os.urandom(200_000)
    dest = tmp_path / "keep.bin"
    dest.write_bytes(b"previous")
    with pytest.raises(APIConnectionError):
        client.files.download(bunker_id, "broken", dest)
    assert dest.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.bin"]


def test_download_errors_are_typed_and_write_nothing(
    client: Client, bunker_id: str, tmp_path: Path
) -> None:
    dest = tmp_path / "never"
    with pytest.raises(BunkerFileNotFound):
        client.files.download(bunker_id, "missing", dest)
    assert not dest.exists()
    with pytest.raises(IsADirectoryError):
        client.files.download(bunker_id, "missing", tmp_path)


def test_list_stat_mkdir_move_delete(client: Client, standin: StandinState, bunker_id: str) -> None:
    for name in ("a", "b", "c"):
        client.files.write(bunker_id, f"dir/{name}.txt", name)
    entry = client.files.mkdir(bunker_id, "dir/sub", mode=0o700)
    assert (entry["type"], entry["mode"]) == ("dir", "0700")
    with pytest.raises(FileConflict):
        client.files.mkdir(bunker_id, "dir/sub")
    names = [e["name"] for e in client.files.list(bunker_id, "dir")]
    assert names == ["a.txt", "b.txt", "c.txt", "sub"]
    assert sum("cursor=" in q for _, _, q in standin.requests) == 1
    assert client.files.stat(bunker_id, "dir/a.txt")["size"] == 1
    moved = client.files.move(bunker_id, "dir/a.txt", "dir/z.txt")
    assert moved["path"] == "/home/user/dir/z.txt"
    with pytest.raises(FileConflict):
        client.files.move(bunker_id, "dir/b.txt", "dir/c.txt")
    client.files.move(bunker_id, "dir/b.txt", "dir/c.txt", overwrite=True)
    assert client.files.read(bunker_id, "dir/c.txt") == b"b"
    with pytest.raises(FileConflict):
        client.files.delete(bunker_id, "dir")
    assert client.files.delete(bunker_id, "dir", recursive=True) == {
        "path": "/home/user/dir",
        "deleted": True,
    }
    with pytest.raises(BunkerFileNotFound):
        client.files.stat(bunker_id, "dir")


def test_modes_outside_the_permission_bits_are_refused(client: Client, bunker_id: str) -> None:
    with pytest.raises(ValueError, match="mode"):
        client.files.write(bunker_id, "x", b"", mode=0o10000)

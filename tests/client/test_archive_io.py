"""The SDK's on-the-fly tar of a local directory (``files.upload_archive`` of a path)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from scaigrid.client._io import DirectoryTar, archive_content, iter_chunks


def test_a_directory_is_packed_with_relative_names_links_and_modes(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "sub/data.bin").write_bytes(bytes(range(256)) * 4096)
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o750)
    (root / "link").symlink_to("sub/data.bin")
    with archive_content(root) as content:
        assert not isinstance(content, bytes)
        body = b"".join(content)
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert sorted(members) == ["link", "run.sh", "sub", "sub/data.bin"]
        assert members["link"].issym() and members["link"].linkname == "sub/data.bin"
        assert members["run.sh"].mode == 0o750
        data = tar.extractfile("sub/data.bin")
        assert data is not None and data.read() == (root / "sub/data.bin").read_bytes()


def test_a_tar_file_path_is_sent_as_is_and_a_file_is_not_a_directory(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("x")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with archive_content(archive) as content:
        assert not isinstance(content, bytes)
        assert b"".join(content) == archive.read_bytes()
    with pytest.raises(NotADirectoryError):
        DirectoryTar(archive)


def test_closing_early_stops_the_packing_thread(tmp_path: Path) -> None:
    root = tmp_path / "big"
    root.mkdir()
    (root / "blob").write_bytes(b"\0" * (8 << 20))
    source = DirectoryTar(root)
    first = next(iter_chunks(source))
    assert first
    source.close()  # returns once the thread has ended (its writes now fail)

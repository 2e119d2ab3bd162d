"""The ``scaibunker`` CLI: argument parsing, output and exit codes (CliRunner and ``main``)."""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from click.testing import CliRunner, Result

from scaigrid.client.cli import cli, main
from tests.client.standin import StandinState

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

Run = Callable[..., Result]


@pytest.fixture
def run(standin: StandinState) -> Run:
    """``run(*args, input=None)`` → the CliRunner result, with the stand-in configured."""
    runner = CliRunner()

    def invoke(*args: str, input: bytes | None = None) -> Result:
        return runner.invoke(cli, list(args), input=input, catch_exceptions=False)

    return invoke


@pytest.fixture
def bunker_id(standin: StandinState) -> str:
    """A running bunker."""
    return str(standin.add_bunker(name="box")["id"])


def test_create_prints_the_id_after_waiting_for_running(run: Run, standin: StandinState) -> None:
    standin.polls_until_running = 2
    result = run(
        "create",
        "--name",
        "web",
        "--cpu",
        "2000",
        "--memory",
        "1024",
        "--disk",
        "2048",
        "--env",
        "A=1",
        "--env",
        "B=x=y",
        "--label",
        "team=data",
    )
    assert result.exit_code == 0, result.stderr
    bunker_id = result.stdout.strip()
    assert bunker_id in standin.bunkers
    assert standin.bunkers[bunker_id]["status"] == "running"
    assert standin.bunkers[bunker_id]["request"] == {
        "image": "debian-12",
        "name": "web",
        "cpu_millicores": 2000,
        "memory_mb": 1024,
        "disk_mb": 2048,
        "env_vars": {"A": "1", "B": "x=y"},
        "label_set": {"team": "data"},
    }
    assert ("POST", "/v1/modules/scaibunker/bunkers", "wait_s=30") in standin.requests


def test_create_no_wait_json_prints_the_whole_object(run: Run, standin: StandinState) -> None:
    result = run("create", "--image", "debian-12", "--no-wait", "--json")
    assert result.exit_code == 0
    body = json.loads(result.stdout)
    assert body["status"] == "pending"
    assert all("wait_s" not in query for _, _, query in standin.requests)


def test_create_that_fails_to_boot_exits_1(run: Run) -> None:
    result = run("create", "--name", "doomed")
    assert result.exit_code == 1
    assert result.stderr.startswith("error BUNKER_STOPPED: bunker bnk_")
    assert "failed (boot_failed)" in result.stderr


def test_api_errors_print_code_and_message_and_exit_1(run: Run) -> None:
    result = run("get", "bnk_nope")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == "error BUNKER_NOT_FOUND: bunker bnk_nope not found\n"


def test_validation_details_are_listed(run: Run) -> None:
    result = run("create", "--cpu", "5")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error VALIDATION_ERROR: The request is not valid",
        "  cpu_millicores: must be at least 100",
    ]


def test_usage_errors_exit_2(run: Run) -> None:
    bad_pair = run("create", "--env", "novalue")
    assert bad_pair.exit_code == 2
    assert "error USAGE: Invalid value for '--env': expected K=V" in bad_pair.stderr
    assert run("exec", "bnk_x").exit_code == 2
    assert run("nope").exit_code == 2
    assert run("ls").exit_code == 2
    both_local = run("cp", "a", "b")
    assert both_local.exit_code == 2
    assert "exactly one of SRC and DST" in both_local.stderr


def test_a_missing_host_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCAIGRID_HOST", raising=False)
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error CONFIG_ERROR: no ScaiGrid host")


def test_host_and_key_options_override_the_environment(
    standin: StandinState, standin_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCAIGRID_HOST", "http://127.0.0.1:1")
    monkeypatch.setenv("SCAIGRID_API_KEY", "sgk_wrong")
    result = CliRunner().invoke(cli, ["--host", standin_url, "--api-key", "sgk_bad", "list"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error AUTH_TOKEN_INVALID")


def test_list_prints_a_table_and_json(run: Run, standin: StandinState) -> None:
    for name in ("one", "two", "three"):
        standin.add_bunker(name=name)
    standin.add_bunker("failed", name="gone")
    table = run("list", "--status", "running").stdout.splitlines()
    assert table[0].split() == [
        "ID",
        "NAME",
        "IMAGE",
        "STATUS",
        "CPU_M",
        "MEM_MB",
        "DISK_MB",
        "CREATED",
    ]
    assert [line.split()[1] for line in table[1:]] == ["three", "two", "one"]
    as_json = json.loads(run("list", "--json").stdout)
    assert [b["name"] for b in as_json] == ["gone", "three", "two", "one"]


def test_get_shows_fields_or_json(run: Run, bunker_id: str) -> None:
    shown = run("get", bunker_id).stdout
    assert f"id              {bunker_id}" in shown
    assert "status          running (created)" in shown
    assert json.loads(run("get", bunker_id, "--json").stdout)["id"] == bunker_id


def test_exec_argv_copies_output_and_exits_with_the_status(
    run: Run, standin: StandinState, bunker_id: str
) -> None:
    result = run(
        "exec",
        bunker_id,
        "--timeout",
        "30",
        "--cwd",
        "/tmp",
        "--env",
        "K=V",
        "--user",
        "root",
        "--",
        "echo",
        "-n",
        "hi",
    )
    assert result.exit_code == 0
    assert result.stdout_bytes == b"-n hi\n"
    assert standin.execs[-1] == {
        "command": ["echo", "-n", "hi"],
        "timeout_s": 30,
        "cwd": "/tmp",
        "env": {"K": "V"},
        "user": "root",
        "encoding": "base64",
    }


def test_exec_single_string_runs_through_the_shell(
    run: Run, standin: StandinState, bunker_id: str
) -> None:
    result = run("exec", bunker_id, "--", "exit 3")
    assert standin.execs[-1]["command"] == "exit 3"
    assert result.exit_code == 3
    assert result.stderr_bytes == b"failing\n"


def test_exec_is_byte_faithful(run: Run, bunker_id: str) -> None:
    result = run("exec", bunker_id, "binary")
    assert result.exit_code == 0
    assert result.stdout_bytes == bytes(range(256))
    assert result.stderr_bytes == b"\xff\xfe-err"


@pytest.mark.parametrize(
    ("command", "code", "note"),
    [
        ("timeout", 124, "timed out"),
        ("oom", 137, "out-of-memory"),
        ("kill", 137, "SIGKILL"),
        ("term", 143, "SIGTERM"),
        ("lost", 255, "lost contact"),
    ],
)
def test_exec_outcomes_map_to_shell_exit_codes(
    run: Run, bunker_id: str, command: str, code: int, note: str
) -> None:
    result = run("exec", bunker_id, command)
    assert result.exit_code == code
    assert note in result.stderr


def test_exec_reports_truncated_output(run: Run, bunker_id: str) -> None:
    result = run("exec", bunker_id, "truncate")
    assert result.stdout_bytes == b"head-tail"
    assert "stdout was truncated" in result.stderr


def test_exec_stdin_is_sent_only_with_the_flag(
    run: Run, standin: StandinState, bunker_id: str
) -> None:
    piped = run("exec", bunker_id, "-i", "--", "cat", "-", input=b"\x00\x01piped")
    assert piped.stdout_bytes == b"\x00\x01piped"
    assert "stdin" not in run("exec", bunker_id, "cat", input=b"ignored").stdout
    assert "stdin_b64" not in standin.execs[-1] and "stdin" not in standin.execs[-1]


def test_exec_on_a_missing_bunker_exits_1(run: Run) -> None:
    result = run("exec", "bnk_nope", "true")
    assert result.exit_code == 1
    assert result.stderr.startswith("error BUNKER_NOT_FOUND")


def test_cp_uploads_and_downloads_files(
    run: Run, standin: StandinState, bunker_id: str, tmp_path: Path
) -> None:
    data = os.urandom(700_000)
    local = tmp_path / "data.bin"
    local.write_bytes(data)
    upload = run("cp", str(local), f"{bunker_id}:/home/user/in/", "--mode", "0600")
    assert upload.exit_code == 0, upload.stderr
    assert standin.files[bunker_id]["/home/user/in/data.bin"] == data
    assert standin.uploads[-1].headers["transfer-encoding"] == "chunked"
    assert "mode=0600" in [q for m, _, q in standin.requests if m == "PUT"][-1]

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    download = run("cp", f"{bunker_id}:in/data.bin", str(out_dir))
    assert download.exit_code == 0, download.stderr
    assert (out_dir / "data.bin").read_bytes() == data
    renamed = run("cp", f"{bunker_id}:in/data.bin", str(tmp_path / "renamed.bin"))
    assert renamed.exit_code == 0
    assert (tmp_path / "renamed.bin").read_bytes() == data


def test_cp_with_dash_uses_stdin_and_stdout(
    run: Run, standin: StandinState, bunker_id: str
) -> None:
    assert run("cp", "-", f"{bunker_id}:piped.bin", input=b"\xffpiped").exit_code == 0
    assert standin.files[bunker_id]["/home/user/piped.bin"] == b"\xffpiped"
    result = run("cp", f"{bunker_id}:piped.bin", "-")
    assert result.stdout_bytes == b"\xffpiped"


def test_cp_errors(run: Run, bunker_id: str, tmp_path: Path) -> None:
    missing_local = run("cp", str(tmp_path / "missing"), f"{bunker_id}:x")
    assert missing_local.exit_code == 1
    assert missing_local.stderr.startswith("error LOCAL_ERROR: No such file or directory")
    missing_remote = run("cp", f"{bunker_id}:missing", str(tmp_path / "x"))
    assert missing_remote.exit_code == 1
    assert missing_remote.stderr.startswith("error FILE_NOT_FOUND")
    assert not (tmp_path / "x").exists()
    assert run("cp", str(tmp_path), f"{bunker_id}:dir/").exit_code == 2
    assert run("cp", f"{bunker_id}:", str(tmp_path)).exit_code == 2
    assert run("cp", f"{bunker_id}:a", f"{bunker_id}:b").exit_code == 2


def test_cp_treats_paths_with_a_slash_before_the_colon_as_local(
    run: Run, standin: StandinState, bunker_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("odd:name").write_bytes(b"colon")
    assert run("cp", "./odd:name", f"{bunker_id}:odd").exit_code == 0
    assert standin.files[bunker_id]["/home/user/odd"] == b"colon"


def test_ls_and_rm(run: Run, standin: StandinState, bunker_id: str) -> None:
    standin.files[bunker_id]["/home/user/a.txt"] = b"abc"
    standin.dirs[bunker_id].add("/home/user/sub")
    standin.files[bunker_id]["/home/user/sub/b.txt"] = b"b"
    listing = run("ls", bunker_id).stdout.splitlines()
    assert listing[0].split() == ["MODE", "SIZE", "MTIME", "NAME"]
    assert [line.split()[0] for line in listing[1:]] == ["-rw-r--r--", "drwxr-xr-x"]
    assert [line.split()[-1] for line in listing[1:]] == ["a.txt", "sub/"]
    deep = run("ls", bunker_id, ".", "--depth", "2").stdout
    assert "/home/user/sub/b.txt" in deep
    entries = json.loads(run("ls", bunker_id, "sub", "--json").stdout)
    assert [e["name"] for e in entries] == ["b.txt"]
    refused = run("rm", bunker_id, "sub")
    assert refused.exit_code == 1
    assert refused.stderr.startswith("error FILE_CONFLICT")
    assert run("rm", bunker_id, "sub", "-r").exit_code == 0
    assert "/home/user/sub" not in standin.dirs[bunker_id]


def test_terminate_prints_id_and_status(run: Run, bunker_id: str) -> None:
    result = run("terminate", bunker_id)
    assert result.stdout == f"{bunker_id}\tstopping\n"


def test_images_lists_a_table_and_json(run: Run) -> None:
    table = run("images").stdout.splitlines()
    assert table[0].split() == ["ID", "NAME", "SCOPE", "STATUS", "SIZE_MIB", "CREATED"]
    assert table[1].split()[1:4] == ["debian-12", "platform", "ready"]
    assert json.loads(run("images", "--json").stdout)[0]["name"] == "debian-12"


def test_main_returns_exit_codes_in_process(
    standin: StandinState, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    bunker_id = standin.add_bunker()["id"]
    assert main(["exec", bunker_id, "exit 7"]) == 7
    assert main(["exec", bunker_id, "--", "echo", "ok"]) == 0
    assert main(["get", "bnk_nope"]) == 1
    assert main(["exec"]) == 2
    assert main(["--help"]) == 0
    captured = capsysbinary.readouterr()
    assert b"ok\n" in captured.out
    assert b"error BUNKER_NOT_FOUND" in captured.err
    assert b"error USAGE" in captured.err


class _ClosedPipe(io.RawIOBase):
    """A stdout whose reader has gone: writes fail with EPIPE until ``mended``."""

    mended = False

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        if not self.mended:
            raise BrokenPipeError(32, "Broken pipe")
        return memoryview(data).nbytes


def test_a_closed_stdout_ends_quietly_with_141(
    standin: StandinState, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bunker_id = standin.add_bunker()["id"]
    pipe = _ClosedPipe()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BufferedWriter(pipe)))
    try:
        assert main(["exec", bunker_id, "binary"]) == 141
        assert main(["list"]) == 141
    finally:
        pipe.mended = True
    assert "error" not in capsys.readouterr().err

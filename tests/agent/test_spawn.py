"""Both ways of starting an exec's process give the same child (SPEC §3.2).

``spawn_with_helper`` (``posix_spawn`` of the runtime's static helper) and
``spawn_forked`` (``fork`` of the agent) run here in the test process, as root, with real
children: the same session, ids, umask, cwd, ``oom_score_adj`` and signal state, and
the same exit statuses and messages when the command or its directory cannot be used.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scaigrid.agent.identity import ROOT, USER, Identity
from scaigrid.agent.spawn import HELPER_NAME, spawn_forked, spawn_with_helper
from scaigrid.protocol.agent import AgentClient
from tests.agent.conftest import AgentProcess, run_exec

_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_PROBE = (
    'echo "ids $(id -u) $(id -g) $(id -G)"; echo "umask $(umask)"; echo "cwd $(pwd)"; '
    'echo "oom $(cat /proc/self/oom_score_adj)"; '
    "grep -E '^(SigBlk|SigIgn):' /proc/self/status; "
    'set -- $(cut -d" " -f1,5,6 /proc/$$/stat); echo "session $(($1 == $2)) $(($1 == $3))"'
)

Spawner = Callable[..., int]


@pytest.fixture(params=["helper", "fork"])
def spawner(request: pytest.FixtureRequest, agent_runtime: Path) -> Spawner:
    if request.param == "fork":
        return spawn_forked
    helper = agent_runtime / "bin" / HELPER_NAME
    if not helper.is_file():
        pytest.skip("the runtime was built without a C compiler: no spawn helper")

    def with_helper(argv: list[str], **kwargs: Any) -> int:
        return spawn_with_helper(str(helper), argv, **kwargs)

    return with_helper


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A fresh directory every user can reach (pytest's own tmp dirs are root-only)."""
    path = Path(tempfile.mkdtemp(prefix="scaibunker-spawn-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _run(
    spawner: Spawner,
    argv: list[str],
    *,
    identity: Identity = USER,
    cwd: str = "/tmp",
    search_path: bool = False,
    env: dict[str, str] | None = None,
    oom_score_adj: int = 0,
) -> tuple[int, str, str]:
    """Start ``argv``; return its exit status, stdout and stderr."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        pid = spawner(
            argv,
            search_path=search_path,
            env=env if env is not None else {"PATH": _PATH},
            cwd=cwd,
            identity=identity,
            stdin_fd=null,
            stdout_fd=out_w,
            stderr_fd=err_w,
            oom_score_adj=oom_score_adj,
        )
    finally:
        for fd in (null, out_w, err_w):
            os.close(fd)
    with os.fdopen(out_r) as out, os.fdopen(err_r) as err:
        stdout, stderr = out.read(), err.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), stdout, stderr


def test_the_child_gets_its_session_ids_umask_cwd_oom_score_and_clean_signals(
    spawner: Spawner,
) -> None:
    code, out, err = _run(spawner, ["/bin/sh", "-c", _PROBE], oom_score_adj=500)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "ids 1000 1000 1000",
        "umask 0022",
        "cwd /tmp",
        "oom 500",
        "SigBlk:\t0000000000000000",
        "SigIgn:\t0000000000000000",
        "session 1 1",
    ]
    code, out, _ = _run(spawner, ["/bin/sh", "-c", "id -u; id -G; pwd"], identity=ROOT, cwd="/")
    assert (code, out) == (0, "0\n0\n/\n")


def test_commands_are_looked_up_on_the_exec_environment_path(
    spawner: Spawner, open_dir: Path
) -> None:
    script = open_dir / "hello"
    script.write_text('#!/bin/sh\necho "hello $0 $1"\n')
    script.chmod(0o755)
    env = {"PATH": f"/nonexistent:{open_dir}:{_PATH}"}
    code, out, _ = _run(spawner, ["hello", "x"], search_path=True, env=env)
    assert (code, out) == (0, f"hello {script} x\n")
    code, _, err = _run(spawner, ["hello"], search_path=True)
    assert (code, err) == (127, "scaibunker: cannot run hello: No such file or directory\n")


def test_unusable_commands_and_directories_exit_126_or_127_with_a_message(
    spawner: Spawner, open_dir: Path
) -> None:
    plain = open_dir / "plain"
    plain.write_text("not a program\n")
    plain.chmod(0o644)
    assert _run(spawner, [str(plain)]) == (
        126,
        "",
        f"scaibunker: cannot run {plain}: Permission denied\n",
    )
    missing = str(open_dir / "missing")
    assert _run(spawner, [missing]) == (
        127,
        "",
        f"scaibunker: cannot run {missing}: No such file or directory\n",
    )
    assert _run(spawner, ["/bin/true"], cwd=missing) == (
        127,
        "",
        f"scaibunker: cannot enter working directory {missing}: No such file or directory\n",
    )
    private = open_dir / "private"
    private.mkdir(mode=0o700)
    # The directory is entered as the acting user: root's private directory is refused.
    assert _run(spawner, ["/bin/true"], cwd=str(private)) == (
        127,
        "",
        f"scaibunker: cannot enter working directory {private}: Permission denied\n",
    )
    assert _run(spawner, ["/bin/true"], cwd=str(private), identity=ROOT) == (0, "", "")


def test_the_helper_exists_when_a_compiler_does(agent_runtime: Path) -> None:
    if shutil.which("cc") or shutil.which("gcc"):
        assert os.access(agent_runtime / "bin" / HELPER_NAME, os.X_OK)


async def test_the_agent_starts_execs_through_the_runtime_helper(
    agent: AgentProcess, client: AgentClient
) -> None:
    result, out, _ = await run_exec(client, "echo hi")
    assert (result["exit_code"], out) == (0, b"hi\n")
    assert f"agent.spawn helper=/.scaibunker/bin/{HELPER_NAME}" in agent.log()

"""The agent's self-contained runtime tree and the argv/env the worker starts it with."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from scaigrid.worker.rootfs.agent_runtime import agent_argv, agent_env, ensure_agent_runtime


def test_the_tree_holds_interpreter_loader_libraries_stdlib_and_site(agent_runtime: Path) -> None:
    manifest = json.loads((agent_runtime / "RUNTIME.json").read_text())
    assert manifest["loader"] == "ld-linux-x86-64.so.2"
    for name in manifest["libraries"]:
        assert (agent_runtime / "lib" / name).is_file()
    assert {"libc.so.6", "ld-linux-x86-64.so.2"} <= set(manifest["libraries"])
    assert (agent_runtime / "bin/python3").is_file()
    assert (agent_runtime / "bin/python3._pth").read_text().splitlines()[-1] == "../site"
    stdlib = next((agent_runtime / "lib").glob("python3.*"))
    assert (stdlib / "asyncio/__pycache__").is_dir()
    assert not (stdlib / "test").exists() and not (stdlib / "site-packages").exists()
    site = agent_runtime / "site"
    assert sorted(p.name for p in site.iterdir()) == ["h2", "hpack", "hyperframe", "scaigrid"]
    assert sorted(p.name for p in (site / "scaigrid/protocol").glob("*.py")) == [
        "__init__.py",
        "agent.py",
    ]
    assert (site / "scaigrid/agent/__pycache__").is_dir()


def test_the_build_is_cached_by_content(agent_runtime: Path) -> None:
    assert ensure_agent_runtime(agent_runtime.parent) == agent_runtime
    assert agent_runtime.name.startswith("agent-runtime-")


def test_argv_and_env_contract(agent_runtime: Path) -> None:
    argv = agent_argv("/run/x/agent.sock")
    assert argv == [
        "/.scaibunker/lib/ld-linux-x86-64.so.2",
        "--library-path",
        "/.scaibunker/lib",
        "/.scaibunker/bin/python3",
        "-I",
        "-S",
        "-B",
        "-m",
        "scaigrid.agent",
        "--listen",
        "/run/x/agent.sock",
    ]
    assert agent_argv("/s", mount_point="/opt/rt")[0] == "/opt/rt/lib/ld-linux-x86-64.so.2"
    assert agent_env() == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
    }
    # Started from anywhere, with a hostile environment, the tree finds only itself.
    result = subprocess.run(
        [
            *agent_argv("/unused", mount_point=str(agent_runtime))[:7],
            "-c",
            "import sys, scaigrid.agent.main; print(sys.flags.isolated, len(sys.path))",
        ],
        env={"PYTHONPATH": "/nonexistent", "PYTHONHOME": "/nonexistent"},
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    assert result.stdout.split() == ["1", "3"]

"""The guest agent's self-contained runtime (HOST-NOTES §7).

The agent runs as PID 1 in images that may have no Python at all (busybox, Alpine's
musl). So the worker carries its own interpreter into the bunker, together with
everything the interpreter needs, and mounts the tree read-only at ``/.scaibunker``
(container driver) or bakes it into the image (VM drivers). Nothing from the image is
used: the interpreter is started through the runtime's own dynamic loader with the
runtime's own libraries.

Tree layout (built from the worker's own interpreter)::

    bin/python3                 the interpreter binary
    bin/python3._pth            sys.path: the stdlib, lib-dynload and site (implies -I)
    bin/scaibunker-spawn        the static spawn helper (scaigrid/agent/spawn_helper.c),
                                when a C compiler is found; without it every exec forks
    lib/ld-linux-x86-64.so.2    its dynamic loader, and every shared library ``ldd``
    lib/lib*.so*                lists for the interpreter and the kept extensions
    lib/pythonX.Y/              trimmed standard library, byte-compiled
    lib/pythonX.Y/lib-dynload/  the extension modules the agent needs
    site/scaigrid/              __init__.py, protocol/{__init__,agent}.py, agent/
    site/{h2,hpack,hyperframe}/ copied from the worker's environment
    RUNTIME.json                key, Python version, contents

Trees are cached under ``cache_dir`` as ``agent-runtime-<key>``, where the key is a
SHA-256 over the interpreter's and its libraries' bytes and every copied source file,
so a changed agent or interpreter gets a fresh tree (the key also covers the helper's
source and whether a compiler was found). Builds are serialised with a lock
file and land with an atomic rename; a half-built tree is never visible.
"""

from __future__ import annotations

import compileall
import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path

import scaigrid

_log = logging.getLogger(__name__)

#: Bump when the tree layout or the selection of files changes.
RUNTIME_FORMAT = 2
#: The spawn helper's source, next to the agent module that runs it.
HELPER_SOURCE = Path(scaigrid.__file__).resolve().parent / "agent" / "spawn_helper.c"
#: The helper's path in the tree (``scaigrid.agent.spawn`` looks for it there).
HELPER_PATH = "bin/scaibunker-spawn"
DEFAULT_MOUNT_POINT = "/.scaibunker"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
THIRD_PARTY = ("h2", "hpack", "hyperframe")

_LOADERS = {"x86_64": "ld-linux-x86-64.so.2", "aarch64": "ld-linux-aarch64.so.1"}
_STDLIB_SKIP = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "turtle.py",
    "ensurepip",
    "lib2to3",
    "site-packages",
    "distutils",
    "pydoc_data",
    "pydoc.py",
    "sqlite3",
    "curses",
    "dbm",
    "venv",
    "lib-dynload",
    "__phello__",
}
#: Extension modules kept besides those the agent imports at start-up: ones its lazily
#: imported code paths (shutil, hashlib fallbacks, a future PTY, tar archives compressed
#: with bzip2 or xz) may load.
_EXTRA_EXTENSIONS = (
    "_bisect",
    "_blake2",
    "_bz2",
    "_contextvars",
    "_heapq",
    "_lzma",
    "_md5",
    "_posixsubprocess",
    "_random",
    "_sha1",
    "_sha256",
    "_sha3",
    "_sha512",
    "array",
    "binascii",
    "fcntl",
    "grp",
    "math",
    "resource",
    "select",
    "termios",
    "zlib",
)
#: Extension modules left out although asyncio imports them: the agent speaks no TLS,
#: and asyncio runs without ``ssl`` (saving libssl and its load time at start-up).
_EXCLUDED_EXTENSIONS = ("_ssl",)
_PROBE = r"""
import sys, importlib.machinery as m
import scaigrid.agent.main
for mod in list(sys.modules.values()):
    f = getattr(mod, "__file__", None) or ""
    if any(f.endswith(s) for s in m.EXTENSION_SUFFIXES):
        sys.stdout.write(f + "\n")
"""


class AgentRuntimeError(Exception):
    """The runtime tree could not be built; the message says why."""


def loader_name() -> str:
    """File name of the dynamic loader for this machine, e.g. ``ld-linux-x86-64.so.2``."""
    machine = platform.machine()
    try:
        return _LOADERS[machine]
    except KeyError:
        raise AgentRuntimeError(f"no known dynamic loader for {machine}") from None


def agent_argv(listen_path: str, *, mount_point: str = DEFAULT_MOUNT_POINT) -> list[str]:
    """argv of the bunker's PID 1: the agent, started through the runtime's own loader.

    ``-I`` ignores every ``PYTHON*`` variable of the image, ``-S`` skips ``site``,
    ``-B`` never writes bytecode (the tree is read-only and fully compiled); ``sys.path``
    comes from ``bin/python3._pth``.

    Args:
        listen_path: where the agent creates its unix socket, as seen inside the bunker
            (in a directory the worker bind-mounts from the host).
        mount_point: where the runtime tree is mounted inside the bunker.
    """
    return [*_interpreter_argv(mount_point), "-m", "scaigrid.agent", "--listen", listen_path]


def agent_env(mount_point: str = DEFAULT_MOUNT_POINT) -> dict[str, str]:
    """Environment the agent needs, to merge *under* the image's and bunker's variables.

    The runtime itself needs no variable (``-I`` and the ``._pth`` file make it
    independent of the environment, wherever ``mount_point`` is), so this only supplies
    the defaults execs inherit when the image sets none. Whatever the agent gets, its
    execs get (plus ``HOME``/``USER``/``LOGNAME`` and the exec's own ``env``).
    """
    return {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}


def ensure_agent_runtime(cache_dir: Path) -> Path:
    """Return the runtime tree for the current interpreter and agent code, building it
    once under ``cache_dir`` if needed.

    Blocking (a build takes seconds: run it in a thread from async code). Safe to call
    from several processes at once.

    Raises:
        AgentRuntimeError: the tree could not be built or does not start the agent.
    """
    cache_dir = Path(cache_dir).resolve()
    sources, key = _discover()
    final = cache_dir / f"agent-runtime-{key[:20]}"
    if (final / "RUNTIME.json").is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".agent-runtime.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "RUNTIME.json").is_file():
            return final
        build = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
        try:
            _build(build, sources)
            _verify(build)
            build.chmod(0o755)
            os.rename(build, final)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
    return final


@functools.cache
def _discover() -> tuple[_Sources, str]:
    # Discovery runs ldd and a probe interpreter and hashes ~25 MB (~0.5 s); the inputs
    # do not change under a running worker, so once per process is enough.
    sources = _Sources.discover()
    return sources, sources.key()


class _Sources:
    """Everything a runtime tree is made of, on this worker."""

    def __init__(
        self,
        interpreter: Path,
        libraries: dict[str, Path],
        stdlib: Path,
        extensions: dict[str, Path],
        site: dict[str, Path],
        compiler: str | None,
    ) -> None:
        self.interpreter = interpreter
        self.libraries = libraries
        self.stdlib = stdlib
        self.extensions = extensions
        self.site = site
        self.compiler = compiler

    @classmethod
    def discover(cls) -> _Sources:
        # The venv's python is a link to the base interpreter, which is what we copy.
        interpreter = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        extensions = _needed_extensions(stdlib / "lib-dynload")
        libraries: dict[str, Path] = {}
        for binary in (interpreter, *extensions.values()):
            libraries.update(_shared_libraries(binary))
        libgcc = _find_library("libgcc_s.so.1")
        if libgcc is not None:
            # glibc dlopen()s it to unwind threads on pthread_exit/cancel.
            libraries.setdefault("libgcc_s.so.1", libgcc)
        if loader_name() not in libraries:
            raise AgentRuntimeError(f"ldd did not report the loader of {interpreter}")
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            _log.warning("agent_runtime.no_c_compiler helper=%s: every exec forks", HELPER_PATH)
        return cls(interpreter, libraries, stdlib, extensions, _site_files(), compiler)

    def key(self) -> str:
        helper = self.compiler is not None
        digest = hashlib.sha256(f"format={RUNTIME_FORMAT};{sys.version};helper={helper}".encode())
        inputs = [
            ("helper", HELPER_SOURCE),
            ("bin/python3", self.interpreter),
            *((f"lib/{n}", p) for n, p in sorted(self.libraries.items())),
            *((f"dynload/{n}", p) for n, p in sorted(self.extensions.items())),
            *((f"site/{n}", p) for n, p in sorted(self.site.items())),
        ]
        for name, path in inputs:
            digest.update(name.encode() + b"\0")
            with open(path, "rb") as fh:
                digest.update(hashlib.file_digest(fh, "sha256").digest())
        return digest.hexdigest()


def _needed_extensions(dynload: Path) -> dict[str, Path]:
    """Extension modules of lib-dynload that the agent loads, plus the extras."""
    paths = [str(Path(scaigrid.__file__).resolve().parent.parent)]
    paths += sorted({str(_package_dir(name).parent) for name in THIRD_PARTY})
    probe = subprocess.run(
        [sys.executable, "-I", "-S", "-c", f"import sys; sys.path[:0] = {paths!r}\n{_PROBE}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if probe.returncode != 0:
        raise AgentRuntimeError(f"cannot import the agent to list its modules: {probe.stderr}")
    found: dict[str, Path] = {}
    for line in probe.stdout.splitlines():
        path = Path(line)
        if path.parent == dynload and path.name.split(".")[0] not in _EXCLUDED_EXTENSIONS:
            found[path.name] = path
    for module in _EXTRA_EXTENSIONS:
        for candidate in dynload.glob(f"{module}.cpython-*.so"):
            found[candidate.name] = candidate
    return found


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise AgentRuntimeError(f"package {name} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _shared_libraries(binary: Path) -> dict[str, Path]:
    """``{soname: path}`` of every library ``ldd`` lists for ``binary`` (with the loader)."""
    out = subprocess.run(
        ["ldd", str(binary)], capture_output=True, text=True, timeout=30, check=False
    )
    if out.returncode != 0:
        raise AgentRuntimeError(f"ldd {binary} failed: {out.stderr.strip()}")
    libraries: dict[str, Path] = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if "=>" in parts:
            name, target = parts[0], parts[parts.index("=>") + 1]
            if target.startswith("/"):
                libraries[name] = Path(target)
            elif target == "not":
                raise AgentRuntimeError(f"{binary} needs {name}, which is not found")
        elif parts and parts[0].startswith("/"):
            libraries[Path(parts[0]).name] = Path(parts[0])
    return libraries


def _find_library(soname: str) -> Path | None:
    libdir = Path(os.path.realpath(sysconfig.get_config_var("LIBDIR") or "/usr/lib"))
    for directory in (
        Path("/lib/x86_64-linux-gnu"),
        Path("/usr/lib/x86_64-linux-gnu"),
        Path(f"/lib/{platform.machine()}-linux-gnu"),
        Path("/lib64"),
        Path("/usr/lib64"),
        libdir,
    ):
        if (directory / soname).is_file():
            return directory / soname
    return None


def _site_files() -> dict[str, Path]:
    """``{relative path: source}`` of the site dir: the agent's packages and h2's."""
    pkg = Path(scaigrid.__file__).resolve().parent
    files: dict[str, Path] = {
        "scaigrid/__init__.py": pkg / "__init__.py",
        "scaigrid/protocol/__init__.py": pkg / "protocol" / "__init__.py",
        "scaigrid/protocol/agent.py": pkg / "protocol" / "agent.py",
    }
    for source in sorted((pkg / "agent").glob("*.py")):
        files[f"scaigrid/agent/{source.name}"] = source
    for name in THIRD_PARTY:
        root = _package_dir(name)
        for source in sorted(root.rglob("*")):
            wanted = source.suffix in (".py", ".typed") and "__pycache__" not in source.parts
            if wanted and source.is_file():
                files[f"{name}/{source.relative_to(root)}"] = source
    return files


def _build(root: Path, sources: _Sources) -> None:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (root / "bin").mkdir()
    lib = root / "lib"
    lib.mkdir()
    shutil.copy2(sources.interpreter, root / "bin" / "python3")
    (root / "bin" / "python3._pth").write_text(
        f"../lib/{version}\n../lib/{version}/lib-dynload\n../site\n"
    )
    for name, path in sources.libraries.items():
        shutil.copy2(os.path.realpath(path), lib / name)
    stdlib = lib / version
    shutil.copytree(
        sources.stdlib,
        stdlib,
        ignore=_stdlib_ignore(sources.stdlib),
        symlinks=False,
    )
    dynload = stdlib / "lib-dynload"
    dynload.mkdir()
    for name, path in sources.extensions.items():
        shutil.copy2(path, dynload / name)
    site = root / "site"
    for rel, path in sources.site.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, site / rel)
    for tree in (stdlib, site):
        if not compileall.compile_dir(tree, quiet=2, workers=1):
            raise AgentRuntimeError(f"byte-compiling {tree} failed")
    helper = sources.compiler is not None and _build_helper(sources.compiler, root / HELPER_PATH)
    manifest = {
        "format": RUNTIME_FORMAT,
        "python": sys.version,
        "loader": loader_name(),
        "helper": HELPER_PATH if helper else None,
        "libraries": sorted(sources.libraries),
        "extensions": sorted(sources.extensions),
        "site": sorted(sources.site),
    }
    (root / "RUNTIME.json").write_text(json.dumps(manifest, indent=2))


def _build_helper(compiler: str, target: Path) -> bool:
    """Compile the spawn helper statically (it runs in any image) to ``target``.

    Returns:
        True when it was built; False (logged) when the compiler failed, e.g. without a
        static C library: the agent then forks every exec.
    """
    try:
        result = subprocess.run(
            [compiler, "-O2", "-static", "-Wall", "-o", str(target), str(HELPER_SOURCE)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        _log.warning("agent_runtime.helper_build_failed error=%s", exc)
        return False
    if result.returncode != 0:
        _log.warning("agent_runtime.helper_build_failed error=%s", result.stderr.strip())
        target.unlink(missing_ok=True)
        return False
    return True


def _stdlib_ignore(top: Path) -> Callable[[str, list[str]], set[str]]:
    """copytree filter: skip the unneeded parts; keep only plain ``.pyc`` caches."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        path = Path(directory)
        if path == top:
            return {n for n in names if n in _STDLIB_SKIP or n.startswith("config-")}
        if path.name == "__pycache__":
            return {n for n in names if ".opt-" in n}
        return {n for n in names if n in {"test", "tests", "idle_test"}}

    return ignore


def _interpreter_argv(mount_point: str) -> list[str]:
    return [
        f"{mount_point}/lib/{loader_name()}",
        "--library-path",
        f"{mount_point}/lib",
        f"{mount_point}/bin/python3",
        "-I",
        "-S",
        "-B",
    ]


def _verify(root: Path) -> None:
    """Start the new tree's interpreter the way the bunker will and import the agent."""
    try:
        result = subprocess.run(
            [*_interpreter_argv(str(root)), "-c", "import scaigrid.agent.main"],
            capture_output=True,
            text=True,
            env={},
            cwd="/",
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AgentRuntimeError(f"the runtime interpreter in {root} cannot start: {exc}") from exc
    if result.returncode != 0:
        raise AgentRuntimeError(f"the runtime cannot import the agent: {result.stderr.strip()}")

"""The agent's operations: argument checks and wiring onto exec and file services.

Shapes follow SPEC §3 and §4 as forwarded by the worker; transport conventions are in
:mod:`scaigrid.protocol.agent`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from scaigrid import __version__
from scaigrid.agent import files
from scaigrid.agent.archive import ArchiveRunner
from scaigrid.agent.clock import rfc3339
from scaigrid.agent.execs import ExecManager, ExecSpec, stream_output
from scaigrid.agent.identity import HOME
from scaigrid.agent.init import missing_capabilities
from scaigrid.agent.validation import (
    get_bool,
    get_choice,
    get_identity,
    get_int,
    get_path,
    invalid,
)
from scaigrid.protocol.agent import (
    PROTOCOL_VERSION,
    AgentError,
    AgentRouter,
    ServerRequest,
    dumps,
)

EXEC_CONTENT_TYPE = "application/x-scaibunker-exec"
MAX_RING_BUFFER_BYTES = 64 << 20
MAX_LIST_ENTRIES = 100_000
_FILE_CHUNK_BYTES = 256 * 1024
_PROCESS_STATUSES = ("running", "exited", "signaled", "timed_out", "oom_killed")


class AgentService:
    """Holds the agent's state and answers its operations.

    Args:
        execs: the exec/process manager.
        ring_buffer_bytes: default capacity of each exec output buffer.
    """

    def __init__(self, execs: ExecManager, *, ring_buffer_bytes: int) -> None:
        self.execs = execs
        self.ring_buffer_bytes = ring_buffer_bytes
        self.archives = ArchiveRunner(execs.reaper, oom_score_adj=execs.workload.oom_score_adj)
        self.started_at = time.time()
        self._started_mono = time.monotonic()

    def router(self) -> AgentRouter:
        """The router serving every operation of this agent."""
        router = AgentRouter()
        router.add("GET", "/v1/ping", self.ping)
        router.add("POST", "/v1/exec", self.exec)
        router.add("GET", "/v1/processes", self.list_processes)
        router.add("GET", "/v1/processes/{ref}", self.get_process)
        router.add("GET", "/v1/processes/{ref}/output", self.process_output)
        router.add("POST", "/v1/processes/{ref}/signal", self.signal_process)
        router.add("POST", "/v1/processes/{ref}/stdin", self.process_stdin)
        router.add("PUT", "/v1/files", self.put_file)
        router.add("GET", "/v1/files", self.get_file)
        router.add("DELETE", "/v1/files", self.delete_file)
        router.add("GET", "/v1/files/list", self.list_files)
        router.add("GET", "/v1/files/stat", self.stat_file)
        router.add("POST", "/v1/files/mkdir", self.mkdir)
        router.add("POST", "/v1/files/move", self.move)
        router.add("GET", "/v1/files/archive", self.get_archive)
        router.add("PUT", "/v1/files/archive", self.put_archive)
        router.add("POST", "/v1/sync", self.sync)
        return router

    # -- health ----------------------------------------------------------------------

    async def ping(self, request: ServerRequest) -> None:
        """``GET /v1/ping`` → ``{agent_version, protocol_version, uptime_s, pid,
        started_at, running_processes, capabilities_missing}``.

        ``capabilities_missing`` lists required capabilities the agent lacks (execs as
        ``user`` and file operations fail without them): a driver misconfiguration.
        """
        running = sum(1 for p in self.execs.processes.values() if p.status == "running")
        await request.send_json(
            {
                "agent_version": __version__,
                "protocol_version": PROTOCOL_VERSION,
                "uptime_s": round(time.monotonic() - self._started_mono, 3),
                "pid": os.getpid(),
                "started_at": rfc3339(self.started_at),
                "running_processes": running,
                "capabilities_missing": missing_capabilities(),
            }
        )

    async def sync(self, request: ServerRequest) -> None:
        """``POST /v1/sync`` → ``{}`` once every filesystem's dirty data reached its disk
        (``sync(2)``): a microVM's host reads the guest's scratch disk only after this
        (snapshots)."""
        await asyncio.to_thread(os.sync)
        await request.send_json({})

    # -- exec and processes ------------------------------------------------------------

    async def exec(self, request: ServerRequest) -> None:
        """``POST /v1/exec``: run a command and stream its output.

        Args (``x-args``): ``exec_id``, ``command`` (str → ``/bin/sh -c``; list → argv
        on PATH), ``cwd`` (default ``/home/user``), ``env``, ``user`` (``user`` |
        ``root``), ``timeout_s`` (number or null), ``stdin`` (``none`` | ``body`` |
        ``open``: a pipe kept open for ``POST /v1/processes/{ref}/stdin``, background only),
        ``background`` (bool; answers ``{exec_id, pid}`` as JSON at once),
        ``paced`` (bool, foreground: the reader keeps up, so a full buffer makes the process
        wait instead of dropping output; see :class:`ExecSpec`), ``ring_buffer_bytes``.

        Response: header ``x-start`` ``{exec_id, pid}``; body of exec records; trailer
        ``x-result`` ``{exec_id, pid, status, exit_code, signal, duration_ms,
        started_at, ended_at, stdout_bytes, stderr_bytes}``.
        """
        spec = self._exec_spec(request.args)
        proc, stdin_fd = self.execs.start(spec)
        start = dumps({"exec_id": proc.exec_id, "pid": proc.pid})
        if spec.background:
            await request.send_json(
                {"exec_id": proc.exec_id, "pid": proc.pid}, headers={"x-start": start}
            )
            return
        feeder = None
        if stdin_fd is not None:
            feeder = asyncio.create_task(self.execs.feed_stdin(proc, stdin_fd, request.body()))
        try:
            request.start(200, {"content-type": EXEC_CONTENT_TYPE, "x-start": start})
            await stream_output(request, proc, ("stdout", "stderr"), {"stdout": 0, "stderr": 0})
            request.finish({"x-result": dumps(proc.result())})
        finally:
            proc.stop_pacing()
            if feeder is not None:
                feeder.cancel()

    def _exec_spec(self, args: dict[str, Any]) -> ExecSpec:
        exec_id = args.get("exec_id")
        if not isinstance(exec_id, str) or not 0 < len(exec_id) <= 128 or "/" in exec_id:
            raise invalid("exec_id must be a string of 1 to 128 characters without /", "exec_id")
        command = args.get("command")
        if isinstance(command, str) and command and "\x00" not in command:
            argv, search_path = ["/bin/sh", "-c", command], False
        elif (
            isinstance(command, list)
            and command
            and all(isinstance(a, str) and "\x00" not in a for a in command)
            and command[0]
        ):
            argv, search_path = list(command), True
        else:
            raise invalid("command must be a non-empty string or list of strings", "command")
        env = args.get("env") or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str)
            and k
            and "=" not in k
            and "\x00" not in k
            and isinstance(v, str)
            and "\x00" not in v
            for k, v in env.items()
        ):
            raise invalid("env must map variable names to strings", "env")
        timeout_s = args.get("timeout_s")
        if timeout_s is not None and (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, int | float)
            or not 0 < timeout_s <= 10_000_000
        ):
            raise invalid("timeout_s must be a positive number or null", "timeout_s")
        stdin = get_choice(args, "stdin", ("none", "body", "open"), "none")
        background = get_bool(args, "background", False)
        if background and stdin == "body":
            raise invalid("a background exec cannot take stdin from the body", "stdin")
        if stdin == "open" and not background:
            raise invalid("stdin open needs a background exec", "stdin")
        paced = get_bool(args, "paced", False)
        if paced and background:
            raise invalid("a background exec cannot be paced by its reader", "paced")
        return ExecSpec(
            exec_id=exec_id,
            argv=argv,
            search_path=search_path,
            command=command,
            cwd=get_path(args, "cwd") if args.get("cwd") is not None else HOME,
            env=env,
            identity=get_identity(args),
            timeout_s=float(timeout_s) if timeout_s is not None else None,
            stdin_body=stdin == "body",
            stdin_open=stdin == "open",
            background=background,
            paced=paced,
            ring_buffer_bytes=get_int(
                args,
                "ring_buffer_bytes",
                self.ring_buffer_bytes,
                low=4096,
                high=MAX_RING_BUFFER_BYTES,
            ),
        )

    async def list_processes(self, request: ServerRequest) -> None:
        """``GET /v1/processes`` args ``{status?}`` → records, newest first."""
        status = request.args.get("status")
        if status is not None and status not in _PROCESS_STATUSES:
            raise invalid(f"status must be one of {', '.join(_PROCESS_STATUSES)}", "status")
        await request.send_json([p.record() for p in self.execs.listing(status)])

    async def get_process(self, request: ServerRequest) -> None:
        """``GET /v1/processes/{exec_id | pid}`` → record (SPEC §3.6)."""
        await request.send_json(self.execs.get(request.params["ref"]).record())

    async def process_output(self, request: ServerRequest) -> None:
        """``GET /v1/processes/{ref}/output`` args ``{stream, offset, max_bytes, follow}``.

        Without ``follow``: header ``x-meta`` ``{stream, offset, next_offset,
        dropped_bytes, eof}`` and the raw bytes available from ``offset``. With
        ``follow``: exec records of that stream from ``offset`` until the process
        finishes, then trailer ``x-result``.
        """
        proc = self.execs.get(request.params["ref"])
        args = request.args
        stream = get_choice(args, "stream", ("stdout", "stderr"), "stdout")
        offset = get_int(args, "offset", 0)
        if get_bool(args, "follow", False):
            start = dumps({"exec_id": proc.exec_id, "pid": proc.pid})
            request.start(200, {"content-type": EXEC_CONTENT_TYPE, "x-start": start})
            await stream_output(request, proc, (stream,), {stream: offset})
            request.finish({"x-result": dumps(proc.result())})
            return
        max_bytes = get_int(args, "max_bytes", 1 << 20, low=1, high=16 << 20)
        ring = proc.buffer(stream)
        first, data = ring.read(offset, max_bytes)
        next_offset = first + len(data)
        meta = {
            "stream": stream,
            "offset": first,
            "next_offset": next_offset,
            "dropped_bytes": max(0, first - offset),
            "eof": proc.finished and not proc.open_pipes and next_offset >= ring.end,
        }
        request.start(200, {"content-type": "application/octet-stream", "x-meta": dumps(meta)})
        await request.write(data)
        request.finish()

    async def signal_process(self, request: ServerRequest) -> None:
        """``POST /v1/processes/{ref}/signal`` args ``{signal, group}`` → record.

        ``signal`` is a name with or without ``SIG`` (``"SIGTERM"``, ``"TERM"``) or a
        number; ``group`` signals the whole process group.
        """
        proc = self.execs.get(request.params["ref"])
        signum = parse_signal(request.args.get("signal"))
        self.execs.send_signal(proc, signum, group=get_bool(request.args, "group", False))
        await request.send_json(proc.record())

    async def process_stdin(self, request: ServerRequest) -> None:
        """``POST /v1/processes/{ref}/stdin`` args ``{eof}``, body = bytes →
        ``{bytes_written, stdin_open}``.

        Only for execs started with ``stdin: "open"``; otherwise ``STDIN_CLOSED``.
        """
        proc = self.execs.get(request.params["ref"])
        eof = get_bool(request.args, "eof", False)
        written = await self.execs.write_stdin(proc, request.body(), eof)
        await request.send_json({"bytes_written": written, "stdin_open": proc.stdin_open})

    # -- files -----------------------------------------------------------------------

    async def put_file(self, request: ServerRequest) -> None:
        """``PUT /v1/files`` args ``{path, mode, parents, user}``, body = content."""
        args = request.args
        result = await files.write_file(
            get_identity(args),
            get_path(args),
            mode=get_int(args, "mode", 0o644, high=0o7777),
            parents=get_bool(args, "parents", True),
            chunks=request.body(),
        )
        await request.send_json(result)

    async def get_file(self, request: ServerRequest) -> None:
        """``GET /v1/files`` args ``{path, user, offset?, length?}``.

        Header ``x-meta`` ``{size, offset, length}``, then the bytes. An ``offset``
        beyond the end answers 416 ``VALIDATION_ERROR``.
        """
        args = request.args
        path = get_path(args)
        fd, size = files.open_for_read(get_identity(args), path)
        try:
            offset = get_int(args, "offset", 0)
            if offset > size:
                raise AgentError(
                    "VALIDATION_ERROR",
                    f"offset {offset} is beyond the file size {size}",
                    status=416,
                )
            length = min(get_int(args, "length", size - offset), size - offset)
            meta = {"size": size, "offset": offset, "length": length}
            request.start(200, {"content-type": "application/octet-stream", "x-meta": dumps(meta)})
            position, end = offset, offset + length
            while position < end:
                window = await request.writable()
                data = os.pread(
                    fd, min(end - position, max(window, 16384), _FILE_CHUNK_BYTES), position
                )
                if not data:
                    break
                await request.write(data)
                position += len(data)
            request.finish()
        finally:
            os.close(fd)

    async def list_files(self, request: ServerRequest) -> None:
        """``GET /v1/files/list`` args ``{path, depth (1..10), limit, user}`` → entries.

        Header ``x-meta`` ``{"truncated": bool}``.
        """
        args = request.args
        entries, truncated = files.list_dir(
            get_identity(args),
            get_path(args),
            get_int(args, "depth", 1, low=1, high=10),
            get_int(args, "limit", MAX_LIST_ENTRIES, low=1, high=MAX_LIST_ENTRIES),
        )
        await request.send_json(entries, headers={"x-meta": dumps({"truncated": truncated})})

    async def stat_file(self, request: ServerRequest) -> None:
        """``GET /v1/files/stat`` args ``{path, user}`` → entry."""
        await request.send_json(files.stat_path(get_identity(request.args), get_path(request.args)))

    async def delete_file(self, request: ServerRequest) -> None:
        """``DELETE /v1/files`` args ``{path, recursive, user}`` → ``{path, deleted}``."""
        args = request.args
        result = files.delete(
            get_identity(args), get_path(args), get_bool(args, "recursive", False)
        )
        await request.send_json(result)

    async def mkdir(self, request: ServerRequest) -> None:
        """``POST /v1/files/mkdir`` args ``{path, parents, mode, user}`` → entry."""
        args = request.args
        result = files.mkdir(
            get_identity(args),
            get_path(args),
            get_bool(args, "parents", False),
            get_int(args, "mode", 0o755, high=0o7777),
        )
        await request.send_json(result)

    async def move(self, request: ServerRequest) -> None:
        """``POST /v1/files/move`` args ``{src, dst, overwrite, user}`` → entry at dst."""
        args = request.args
        result = files.move(
            get_identity(args),
            get_path(args, "src"),
            get_path(args, "dst"),
            get_bool(args, "overwrite", False),
        )
        await request.send_json(result)

    async def get_archive(self, request: ServerRequest) -> None:
        """``GET /v1/files/archive`` args ``{path, user}``: a tar of the directory's
        contents (``application/x-tar``), trailer ``x-result`` ``{path, entries, bytes,
        skipped}`` (``skipped``: entries the user could not read). See
        :mod:`scaigrid.agent.archive`."""
        args = request.args
        await self.archives.pack(request, get_identity(args), get_path(args))

    async def put_archive(self, request: ServerRequest) -> None:
        """``PUT /v1/files/archive`` args ``{path, user}``, body = a tar stream (plain,
        gzip, bzip2 or xz) → ``{path, entries, bytes}``."""
        args = request.args
        result = await self.archives.extract(request, get_identity(args), get_path(args))
        await request.send_json(result)


def parse_signal(value: Any) -> int:
    """A signal number from ``"SIGTERM"``, ``"TERM"``, ``15`` or ``"15"``.

    Raises:
        AgentError: VALIDATION_ERROR for anything else.
    """
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value:
        name = value.upper()
        if name.isdigit():
            number = int(name)
        else:
            name = name if name.startswith("SIG") else f"SIG{name}"
            number = getattr(signal.Signals, name, None)
    if number is None or number not in signal.valid_signals():
        raise invalid(f"unknown signal {value!r}", "signal")
    return int(number)

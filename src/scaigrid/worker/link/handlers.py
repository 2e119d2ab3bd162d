"""The task contract between controller and worker: one handler per task kind.

Every handler gets a :class:`~scaigrid.worker.link.tasks.Task` and returns the ``result``
object of ``task_result``; errors become ``{code, message, details?}`` (agent errors keep
their SPEC code, a lost or silent agent is ``AGENT_UNAVAILABLE``).

``bunker.create``
    params ``{bunker: {id, cpu_millicores, memory_mb, disk_mb, env_vars, network_profile},
    image: {id, name, source}}``; progress ``{stage: "image"}`` (repeated every 30 s while the
    image builds) then ``{stage: "booting"}``; result ``{driver, isolation, boot_ms}``;
    error ``BOOT_FAILED`` with the reason. Deadline 1800 s.
``bunker.destroy``
    params ``{}``; result ``{}``; idempotent, also for ids the worker does not hold.
``image.bake``
    params ``{image: {id, name, source, size_mib?, artifact?}}`` (``artifact``: the baked
    artifact to fetch or publish, see :mod:`scaigrid.worker.images`; ``bunker.create``'s
    ``image`` may carry it too; with ``size_mib`` a microVM worker also bakes the image's base
    ext4 of that size, and a tree that does not fit fails the bake saying so); result
    ``{digest, source_digest, bake_source}`` once the cache holds the image (``digest``:
    ``sha256:`` of the stored artifact when this worker uploaded or fetched it, else null;
    ``source_digest``: the pinned ``sha256:`` manifest digest of an OCI source, else null;
    ``bake_source``: ``"artifact"`` or ``"baked"``); error ``BAKE_FAILED`` with the reason.
    With ``warm: true`` (a warm-up, not the image's first bake) a worker whose image cache
    stays over its limit drops the image again and answers ``BAKE_FAILED`` with details
    ``{cache_full: true}``. Deadline 1800 s.
``image.scan``
    params ``{image_id}``; result ``{status, scanner, scanner_version, counts, findings,
    error}`` (see :mod:`scaigrid.worker.scan`); error ``IMAGE_NOT_READY`` when the image is
    not ready on this worker. Deadline 900 s.
``bunker.snapshot``
    params ``{snapshot_id, storage_url, layer: {key, capability}, manifest: {key, capability,
    body}}``; progress ``{stage: "uploading"}`` once the layer is archived (the bunker is
    frozen only while it is read); result ``{size_bytes, sha256, layer_bytes, entries,
    skipped}``. See :mod:`scaigrid.worker.snapshot_task`.
``image.evict``
    params ``{image_id}``; result ``{evicted: bool}``; error ``IMAGE_IN_USE`` while a
    bunker's root uses the image.
``exec.start``
    params ``{exec_id, command, cwd, env, user, timeout_s, stdin: "none" | "body"}`` (passed to
    the agent's ``POST /v1/exec`` unchanged); streams ``stdout``, ``stderr`` (worker →
    controller) and ``stdin`` (controller → worker, when ``stdin`` is ``"body"``). Progress
    ``{event: "start", exec_id, pid}`` once the process runs, and ``{event: "gap", exec_id,
    stream, offset, dropped_bytes}`` if the agent's ring buffer overwrote output the link
    was too slow to carry. Both output streams end with EOF before the result, which is the
    agent's ``x-result`` (SPEC §3.3 without output, plus ``ended_at``, ``stdout_bytes``,
    ``stderr_bytes``); if contact with the agent is lost mid-run (or the exec outlives
    ``timeout_s`` + 30 s) the result is ``{exec_id, pid, status: "agent_lost", exit_code: null,
    signal: null, duration_ms, started_at}``. An exec that cannot be started answers
    ``AGENT_UNAVAILABLE`` (or the agent's error, e.g. ``VALIDATION_ERROR``).
    Foreground only: ``background`` execs are ``exec.background``.
``exec.background``
    params as ``exec.start`` (``stdin`` ``"none"`` | ``"open"``), sent with ``background:
    true``; result ``{exec_id, pid}`` at once.
``process.list`` / ``process.get`` / ``process.signal``
    params ``{status?}`` / ``{ref}`` / ``{ref, signal, group}`` (``ref``: exec id or pid);
    result ``{entries: [record, ...]}`` / the record / the record (SPEC §3.6).
``process.output``
    params ``{ref, stream, offset, max_bytes}`` (``max_bytes`` ≤ 256 KiB); result the agent's
    ``x-meta`` ``{stream, offset, next_offset, dropped_bytes, eof}`` plus ``data_b64``.
``process.follow``
    params ``{ref, stream, offset}``; stream ``output`` (worker → controller). Progress
    ``{event: "start", exec_id, pid}``, then ``gap`` progress as for ``exec.start`` while the
    bytes of ``stream`` from ``offset`` flow until the process finishes; result the agent's
    ``x-result``. Deadline: an hour (a follower that outlives it reconnects with an offset).
``process.stdin``
    params ``{ref, data_b64, eof}`` (decoded data ≤ 256 KiB); result ``{bytes_written,
    stdin_open}``.
``files.write``
    params ``{path, mode, parents, user}``; stream ``body`` (controller → worker) streamed to the
    agent's ``PUT /v1/files``; result ``{path, size, sha256, mode}``.
``files.read``
    params ``{path, user, offset?, length?}``; stream ``body`` (worker → controller). Progress
    first: the agent's ``x-meta`` object (at least ``{size}``), then the bytes, EOF, and the
    result ``{size}``.
``files.archive_read``
    params ``{path, user}``; stream ``body`` (worker → controller): the tar of directory
    ``path`` from the agent's ``GET /v1/files/archive``. Progress ``{}`` once the agent has
    accepted the directory (errors such as ``FILE_NOT_FOUND`` come before it), then the bytes,
    EOF, and the result ``{path, entries, bytes, skipped}``. A failure mid-stream fails the task
    without EOF.
``files.archive_write``
    params ``{path, user}``; stream ``body`` (controller → worker): a tar stream extracted by the
    agent's ``PUT /v1/files/archive``; result ``{path, entries, bytes}``.
``files.list`` / ``files.stat`` / ``files.delete`` / ``files.mkdir`` / ``files.move``
    params ``{path, depth, user}`` / ``{path, user}`` / ``{path, recursive, user}`` /
    ``{path, parents, mode, user}`` / ``{src, dst, overwrite, user}``; result: the agent's JSON
    answer; a JSON list (``files.list``) becomes ``{entries: [...], truncated}`` with the
    fields of the agent's ``x-meta``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

import structlog

from scaigrid.protocol.agent import AgentConnectionLost, AgentResponse
from scaigrid.protocol.link import TaskKind
from scaigrid.worker.bunkers import BunkerSupervisor, CreateRequest
from scaigrid.worker.drivers.base import DriverError
from scaigrid.worker.images import (
    ImageInUse,
    ImageNotCached,
    ImagePrepareFailed,
    bake_vm_disks,
)
from scaigrid.worker.link.bridge_handlers import bridge_specs
from scaigrid.worker.link.client import utc_timestamp
from scaigrid.worker.link.shell import shell_specs
from scaigrid.worker.link.tasks import (
    HandlerSpec,
    Task,
    TaskFailed,
    TaskHandler,
    agent_errors,
    stream_chunks,
)
from scaigrid.worker.rootfs import ImageBuildError
from scaigrid.worker.snapshot_task import take_snapshot
from scaigrid.worker.vm.disks import DiskError

log = structlog.get_logger(__name__)

IMAGE_BAKE: Final = "image.bake"
BAKE_FAILED: Final = "BAKE_FAILED"

CREATE_DEADLINE_S: Final = 1800.0
BAKE_DEADLINE_S: Final = 1800.0
SCAN_DEADLINE_S: Final = 900.0
EVICT_DEADLINE_S: Final = 300.0
DESTROY_DEADLINE_S: Final = 60.0
PAUSE_DEADLINE_S: Final = 10.0
SNAPSHOT_DEADLINE_S: Final = 3600.0
FILES_CALL_DEADLINE_S: Final = 60.0
FILES_STREAM_DEADLINE_S: Final = 3600.0
#: Exec timeout assumed for the deadline when the task gives none (SPEC §3.2 maximum).
EXEC_DEFAULT_TIMEOUT_S: Final = 3600.0
#: How long after ``timeout_s`` the worker waits for the agent's exec result.
EXEC_GRACE_S: Final = 30.0
_AGENT_CALL_TIMEOUT_S: Final = FILES_CALL_DEADLINE_S - 5.0
#: Most bytes one ``process.output`` or ``process.stdin`` task carries (inside one message).
PROCESS_CHUNK_BYTES: Final = 256 * 1024


def _json_header(response: AgentResponse, name: str) -> dict[str, Any]:
    raw = response.headers.get(name)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _exec_deadline(params: Mapping[str, Any]) -> float:
    return _exec_timeout(params) + 2 * EXEC_GRACE_S


def _exec_timeout(params: Mapping[str, Any]) -> float:
    timeout = params.get("timeout_s")
    if isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout > 0:
        return float(timeout)
    return EXEC_DEFAULT_TIMEOUT_S


class TaskHandlers:
    """Handlers of the task contract (see the module docstring), bound to a supervisor."""

    def __init__(self, supervisor: BunkerSupervisor) -> None:
        self._bunkers = supervisor

    def specs(self) -> dict[str, HandlerSpec]:
        """Return the handler table for :class:`~scaigrid.worker.link.client.LinkClient`."""
        files_call = {
            TaskKind.FILES_LIST: ("GET", "/v1/files/list", True),
            TaskKind.FILES_STAT: ("GET", "/v1/files/stat", True),
            TaskKind.FILES_DELETE: ("DELETE", "/v1/files", False),
            TaskKind.FILES_MKDIR: ("POST", "/v1/files/mkdir", False),
            TaskKind.FILES_MOVE: ("POST", "/v1/files/move", False),
        }
        specs = {
            TaskKind.BUNKER_CREATE: HandlerSpec(
                self.bunker_create, CREATE_DEADLINE_S, timeout_code="BOOT_FAILED"
            ),
            TaskKind.BUNKER_DESTROY: HandlerSpec(self.bunker_destroy, DESTROY_DEADLINE_S),
            TaskKind.BUNKER_PAUSE: HandlerSpec(
                self.bunker_pause, PAUSE_DEADLINE_S, timeout_code="AGENT_UNAVAILABLE"
            ),
            TaskKind.BUNKER_RESUME: HandlerSpec(
                self.bunker_resume, PAUSE_DEADLINE_S, timeout_code="AGENT_UNAVAILABLE"
            ),
            IMAGE_BAKE: HandlerSpec(self.image_bake, BAKE_DEADLINE_S, timeout_code=BAKE_FAILED),
            TaskKind.IMAGE_SCAN: HandlerSpec(self.image_scan, SCAN_DEADLINE_S),
            TaskKind.BUNKER_SNAPSHOT: HandlerSpec(
                self.bunker_snapshot, SNAPSHOT_DEADLINE_S, timeout_code="OBJECT_STORE_UNAVAILABLE"
            ),
            TaskKind.IMAGE_EVICT: HandlerSpec(self.image_evict, EVICT_DEADLINE_S),
            TaskKind.EXEC_START: HandlerSpec(
                agent_errors(self.exec_start),
                _exec_deadline,
                timeout_code="AGENT_UNAVAILABLE",
                inbound_roles=frozenset({"stdin"}),
                outbound_roles=frozenset({"stdout", "stderr"}),
            ),
            TaskKind.FILES_WRITE: HandlerSpec(
                agent_errors(self.files_write),
                FILES_STREAM_DEADLINE_S,
                timeout_code="AGENT_UNAVAILABLE",
                inbound_roles=frozenset({"body"}),
            ),
            TaskKind.FILES_READ: HandlerSpec(
                agent_errors(self.files_read),
                FILES_STREAM_DEADLINE_S,
                timeout_code="AGENT_UNAVAILABLE",
                outbound_roles=frozenset({"body"}),
            ),
            TaskKind.FILES_ARCHIVE_WRITE: HandlerSpec(
                agent_errors(self.files_archive_write),
                FILES_STREAM_DEADLINE_S,
                timeout_code="AGENT_UNAVAILABLE",
                inbound_roles=frozenset({"body"}),
            ),
            TaskKind.FILES_ARCHIVE_READ: HandlerSpec(
                agent_errors(self.files_archive_read),
                FILES_STREAM_DEADLINE_S,
                timeout_code="AGENT_UNAVAILABLE",
                outbound_roles=frozenset({"body"}),
            ),
        }
        process_calls = {
            TaskKind.EXEC_BACKGROUND: self.exec_background,
            TaskKind.PROCESS_LIST: self.process_list,
            TaskKind.PROCESS_GET: self.process_get,
            TaskKind.PROCESS_SIGNAL: self.process_signal,
            TaskKind.PROCESS_OUTPUT: self.process_output,
            TaskKind.PROCESS_STDIN: self.process_stdin,
        }
        specs[TaskKind.PROCESS_FOLLOW] = HandlerSpec(
            agent_errors(self.process_follow),
            FILES_STREAM_DEADLINE_S,
            timeout_code="AGENT_UNAVAILABLE",
            outbound_roles=frozenset({"output"}),
        )
        for kind, call in process_calls.items():
            specs[kind] = HandlerSpec(
                agent_errors(call), FILES_CALL_DEADLINE_S, timeout_code="AGENT_UNAVAILABLE"
            )
        for kind, (method, path, read_only) in files_call.items():
            specs[kind] = HandlerSpec(
                agent_errors(self._files_call(method, path, read_only=read_only)),
                FILES_CALL_DEADLINE_S,
                timeout_code="AGENT_UNAVAILABLE",
            )
        return specs

    # -- bunkers and images ----------------------------------------------------------------

    async def bunker_create(self, task: Task) -> dict[str, Any]:
        """``bunker.create`` → ``{driver, isolation, boot_ms}``."""
        request = CreateRequest.from_params(task.bunker_id, task.params)
        return await self._bunkers.create(request, task.progress)

    async def bunker_destroy(self, task: Task) -> dict[str, Any]:
        """``bunker.destroy`` → ``{}``, or ``{egress_bytes}`` (the bunker's final cumulative
        egress counter, bytes) when it had a network on this worker."""
        bunker_id = task.require_bunker_id()
        try:
            await self._bunkers.destroy(bunker_id)
        except DriverError as exc:
            message = f"bunker {bunker_id} could not be stopped: {exc}"
            raise TaskFailed("INTERNAL_ERROR", message) from exc
        network = self._bunkers.network
        sent = network.pop_final_egress(bunker_id) if network is not None else None
        return {} if sent is None else {"egress_bytes": sent}

    async def bunker_pause(self, task: Task) -> dict[str, Any]:
        """``bunker.pause`` → ``{}``: freeze every process of the bunker (idempotent)."""
        bunker_id = task.require_bunker_id()
        try:
            await self._bunkers.pause(bunker_id)
        except DriverError as exc:
            raise TaskFailed("AGENT_UNAVAILABLE", f"bunker {bunker_id} not paused: {exc}") from exc
        return {}

    async def bunker_resume(self, task: Task) -> dict[str, Any]:
        """``bunker.resume`` → ``{}``: thaw a paused bunker (idempotent)."""
        bunker_id = task.require_bunker_id()
        try:
            await self._bunkers.resume(bunker_id)
        except DriverError as exc:
            raise TaskFailed("AGENT_UNAVAILABLE", f"bunker {bunker_id} not resumed: {exc}") from exc
        return {}

    async def bunker_snapshot(self, task: Task) -> dict[str, Any]:
        """``bunker.snapshot`` → ``{size_bytes, sha256, layer_bytes, entries, skipped}``."""
        return await take_snapshot(self._bunkers, task)

    async def image_bake(self, task: Task) -> dict[str, Any]:
        """``image.bake`` → ``{digest, source_digest, bake_source}``."""
        image = task.params.get("image")
        if not isinstance(image, Mapping) or not isinstance(image.get("id"), str):
            raise TaskFailed("VALIDATION_ERROR", "image.bake needs image.id and image.source")
        source = image.get("source")
        if not isinstance(source, Mapping):
            raise TaskFailed("VALIDATION_ERROR", "image.bake needs image.source")
        artifact = image.get("artifact")
        images = self._bunkers.images
        try:
            tree = await images.ensure(
                image["id"], source, artifact if isinstance(artifact, Mapping) else None
            )
            await images.published(image["id"])
        except ImagePrepareFailed as exc:
            raise TaskFailed(BAKE_FAILED, str(exc)) from exc
        if task.params.get("warm") is True and not await images.fits():
            with contextlib.suppress(ImageInUse):
                await images.evict(image["id"])
            raise TaskFailed(
                BAKE_FAILED,
                "short of cache space: the image does not fit in this worker's image cache",
                details={"cache_full": True},
            )
        size_mib = image.get("size_mib")
        if isinstance(size_mib, int) and not isinstance(size_mib, bool):
            try:
                await bake_vm_disks(self._bunkers.drivers, tree, size_mib)
            except DiskError as exc:
                with contextlib.suppress(ImageInUse):
                    await images.evict(image["id"])
                raise TaskFailed(BAKE_FAILED, str(exc)) from exc
        return {
            "digest": images.digest(image["id"]),
            "source_digest": images.source_digest(image["id"]),
            "bake_source": images.bake_source(image["id"]),
        }

    async def image_scan(self, task: Task) -> dict[str, Any]:
        """``image.scan`` → the scan result of the cached image."""
        image_id = task.params.get("image_id")
        if not isinstance(image_id, str):
            raise TaskFailed("VALIDATION_ERROR", "image.scan needs image_id")
        try:
            result = await self._bunkers.images.scan(image_id)
        except ImageNotCached as exc:
            raise TaskFailed("IMAGE_NOT_READY", str(exc)) from exc
        return result.to_dict()

    async def image_evict(self, task: Task) -> dict[str, Any]:
        """``image.evict`` → ``{evicted}``; refused while a bunker uses the image."""
        image_id = task.params.get("image_id")
        if not isinstance(image_id, str):
            raise TaskFailed("VALIDATION_ERROR", "image.evict needs image_id")
        try:
            return {"evicted": await self._bunkers.images.evict(image_id)}
        except ImageInUse as exc:
            raise TaskFailed("IMAGE_IN_USE", str(exc)) from exc
        except ImageBuildError as exc:
            raise TaskFailed("VALIDATION_ERROR", str(exc)) from exc

    # -- exec --------------------------------------------------------------------------

    async def exec_start(self, task: Task) -> dict[str, Any]:
        """``exec.start`` → the agent's exec result (or ``agent_lost``)."""
        bunker_id = task.require_bunker_id()
        stdout, stderr = task.outbound("stdout"), task.outbound("stderr")
        args = dict(task.params)
        # Only a caller that streams the exec (SSE) needs the start event; the worker's own
        # flag, not the agent's.
        announce = bool(args.pop("announce_start", True))
        if args.get("background"):
            raise TaskFailed("VALIDATION_ERROR", "exec.start runs foreground execs only")
        body = stream_chunks(task.inbound("stdin")) if args.get("stdin") == "body" else None
        client = await self._bunkers.agent(bunker_id)
        response = await client.request("POST", "/v1/exec", args, body, timeout_s=None)
        start = _json_header(response, "x-start")
        exec_id, pid = start.get("exec_id", args.get("exec_id")), start.get("pid")
        started = time.monotonic()
        started_at = utc_timestamp()
        try:
            if announce:
                await task.progress({"event": "start", "exec_id": exec_id, "pid": pid})
            async with asyncio.timeout(_exec_timeout(task.params) + EXEC_GRACE_S):
                async for kind, data in response.exec_events():
                    if kind == "stdout":
                        await stdout.write(data)
                    elif kind == "stderr":
                        await stderr.write(data)
                    else:
                        gap = json.loads(data)
                        await task.progress({"event": "gap", "exec_id": exec_id, **gap})
                result = json.loads((await response.trailers())["x-result"])
        except (AgentConnectionLost, TimeoutError, KeyError, ValueError) as exc:
            log.warning(
                "exec_agent_lost", bunker_id=bunker_id, exec_id=exec_id, error=str(exc) or repr(exc)
            )
            result = {
                "exec_id": exec_id,
                "pid": pid,
                "status": "agent_lost",
                "exit_code": None,
                "signal": None,
                "duration_ms": round((time.monotonic() - started) * 1000),
                "started_at": started_at,
            }
        finally:
            await response.aclose()
        await stdout.end()
        await stderr.end()
        return result if isinstance(result, dict) else {"value": result}

    # -- background processes ----------------------------------------------------------

    async def exec_background(self, task: Task) -> dict[str, Any]:
        """``exec.background`` → ``{exec_id, pid}``."""
        args = {**task.params, "background": True}
        if args.get("stdin", "none") not in ("none", "open"):
            raise TaskFailed("VALIDATION_ERROR", "a background exec takes stdin none or open")
        return await self._agent_json(task, "POST", "/v1/exec", args, retry=False)

    async def process_list(self, task: Task) -> dict[str, Any]:
        """``process.list`` → ``{entries}``."""
        args = {k: v for k, v in task.params.items() if k == "status"}
        return await self._agent_json(task, "GET", "/v1/processes", args, retry=True)

    async def process_get(self, task: Task) -> dict[str, Any]:
        """``process.get`` → the process record."""
        path = f"/v1/processes/{_process_ref(task.params)}"
        return await self._agent_json(task, "GET", path, {}, retry=True)

    async def process_signal(self, task: Task) -> dict[str, Any]:
        """``process.signal`` → the process record."""
        path = f"/v1/processes/{_process_ref(task.params)}/signal"
        args = {k: v for k, v in task.params.items() if k in ("signal", "group")}
        return await self._agent_json(task, "POST", path, args, retry=False)

    async def process_output(self, task: Task) -> dict[str, Any]:
        """``process.output`` → ``{stream, offset, next_offset, dropped_bytes, eof, data_b64}``."""
        path = f"/v1/processes/{_process_ref(task.params)}/output"
        args = {k: v for k, v in task.params.items() if k in ("stream", "offset")}
        max_bytes = task.params.get("max_bytes", PROCESS_CHUNK_BYTES)
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool):
            raise TaskFailed("VALIDATION_ERROR", "max_bytes must be an integer")
        args["max_bytes"] = max(1, min(max_bytes, PROCESS_CHUNK_BYTES))
        response = await self._request(
            task.require_bunker_id(),
            "GET",
            path,
            args,
            retry=True,
            timeout_s=_AGENT_CALL_TIMEOUT_S,
        )
        async with response:
            data = await response.read(PROCESS_CHUNK_BYTES)
            meta = _json_header(response, "x-meta")
        return {**meta, "data_b64": base64.b64encode(data).decode()}

    async def process_follow(self, task: Task) -> dict[str, Any]:
        """``process.follow`` → the agent's ``x-result`` after streaming the output."""
        path = f"/v1/processes/{_process_ref(task.params)}/output"
        args = {k: v for k, v in task.params.items() if k in ("stream", "offset")}
        args["follow"] = True
        out = task.outbound("output")
        client = await self._bunkers.agent(task.require_bunker_id())
        response = await client.request("GET", path, args, timeout_s=None)
        try:
            start = _json_header(response, "x-start")
            await task.progress({"event": "start", **start})
            async for kind, data in response.exec_events():
                if kind in ("stdout", "stderr"):
                    await out.write(data)
                else:
                    await task.progress({"event": "gap", **json.loads(data)})
            result = json.loads((await response.trailers())["x-result"])
        finally:
            await response.aclose()
        await out.end()
        return _as_object(result)

    async def process_stdin(self, task: Task) -> dict[str, Any]:
        """``process.stdin`` → ``{bytes_written, stdin_open}``."""
        path = f"/v1/processes/{_process_ref(task.params)}/stdin"
        try:
            data = base64.b64decode(str(task.params.get("data_b64", "")), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise TaskFailed("VALIDATION_ERROR", "data_b64 is not valid base64") from exc
        if len(data) > PROCESS_CHUNK_BYTES:
            raise TaskFailed("VALIDATION_ERROR", f"at most {PROCESS_CHUNK_BYTES} bytes per call")

        async def body() -> AsyncIterator[bytes]:
            yield data

        client = await self._bunkers.agent(task.require_bunker_id())
        args = {"eof": bool(task.params.get("eof", False))}
        response = await client.request("POST", path, args, body(), timeout_s=_AGENT_CALL_TIMEOUT_S)
        async with response:
            return _as_object(await response.json())

    async def _agent_json(
        self, task: Task, method: str, path: str, args: Mapping[str, Any], *, retry: bool
    ) -> dict[str, Any]:
        response = await self._request(
            task.require_bunker_id(),
            method,
            path,
            args,
            retry=retry,
            timeout_s=_AGENT_CALL_TIMEOUT_S,
        )
        async with response:
            return _as_object(await response.json())

    # -- files -------------------------------------------------------------------------

    async def files_write(self, task: Task) -> dict[str, Any]:
        """``files.write`` → ``{path, size, sha256, mode}``."""
        client = await self._bunkers.agent(task.require_bunker_id())
        body = stream_chunks(task.inbound("body"))
        response = await client.request("PUT", "/v1/files", dict(task.params), body, timeout_s=None)
        return _as_object(await response.json())

    async def files_read(self, task: Task) -> dict[str, Any]:
        """``files.read`` → ``{size}`` after progress ``x-meta`` and the streamed bytes."""
        bunker_id = task.require_bunker_id()
        out = task.outbound("body")
        response = await self._request(
            bunker_id, "GET", "/v1/files", task.params, retry=True, timeout_s=None
        )
        try:
            meta = _json_header(response, "x-meta")
            await task.progress(meta)
            async for chunk in response.iter_body():
                await out.write(chunk)
        finally:
            await response.aclose()
        await out.end()
        return {"size": meta.get("size")}

    async def files_archive_write(self, task: Task) -> dict[str, Any]:
        """``files.archive_write`` → ``{path, entries, bytes}``."""
        client = await self._bunkers.agent(task.require_bunker_id())
        body = stream_chunks(task.inbound("body"))
        response = await client.request(
            "PUT", "/v1/files/archive", dict(task.params), body, timeout_s=None
        )
        return _as_object(await response.json())

    async def files_archive_read(self, task: Task) -> dict[str, Any]:
        """``files.archive_read`` → ``{path, entries, bytes, skipped}`` after progress ``{}``
        and the streamed tar."""
        out = task.outbound("body")
        response = await self._request(
            task.require_bunker_id(),
            "GET",
            "/v1/files/archive",
            task.params,
            retry=True,
            timeout_s=None,
        )
        try:
            await task.progress({})
            async for chunk in response.iter_body():
                await out.write(chunk)
            trailers = await response.trailers()
        finally:
            await response.aclose()
        await out.end()
        try:
            result = json.loads(trailers.get("x-result") or "{}")
        except ValueError:
            result = {}
        return _as_object(result)

    def _files_call(self, method: str, path: str, *, read_only: bool) -> TaskHandler:
        async def handler(task: Task) -> dict[str, Any]:
            response = await self._request(
                task.require_bunker_id(),
                method,
                path,
                task.params,
                retry=read_only,
                timeout_s=_AGENT_CALL_TIMEOUT_S,
            )
            async with response:
                value = await response.json()
                if isinstance(value, list):
                    return {"entries": value, **_json_header(response, "x-meta")}
                return _as_object(value)

        handler.__name__ = f"files_{path.rsplit('/', 1)[-1]}_{method.lower()}"
        return handler

    async def _request(
        self,
        bunker_id: str,
        method: str,
        path: str,
        args: Mapping[str, Any],
        *,
        retry: bool,
        timeout_s: float | None,
    ) -> AgentResponse:
        """Send a bodiless request; a read-only one is retried once on a fresh connection
        when the old one turns out to be dead. ``timeout_s`` bounds the whole exchange."""
        client = await self._bunkers.agent(bunker_id)
        try:
            return await client.request(method, path, dict(args), timeout_s=timeout_s)
        except AgentConnectionLost:
            if not (retry and client.closed):
                raise
        client = await self._bunkers.agent(bunker_id)
        return await client.request(method, path, dict(args), timeout_s=timeout_s)


def _process_ref(params: Mapping[str, Any]) -> str:
    """The ``ref`` param as a path segment: an exec id or a pid, nothing else."""
    ref = params.get("ref")
    if not isinstance(ref, str) or not 0 < len(ref) <= 128 or not ref.replace("_", "").isalnum():
        raise TaskFailed("VALIDATION_ERROR", "ref must be an exec id or a pid")
    return ref


def _as_object(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if isinstance(value, list):
        return {"entries": value}
    return {"value": value}


def build_handlers(supervisor: BunkerSupervisor) -> dict[str, HandlerSpec]:
    """Return the handler table of the task contract bound to ``supervisor``."""
    return {
        **TaskHandlers(supervisor).specs(),
        **bridge_specs(supervisor),
        **shell_specs(supervisor),
    }

"""Background execs and process calls relayed to the bunker's agent (SPEC §3.6).

The agent keeps every exec's record and output ring buffers; the controller only relays:
each call is one link task with a deadline (:data:`CALL_TIMEOUT_S`). Output and stdin
travel base64-encoded inside task messages, at most :data:`CHUNK_BYTES` per task.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

from scaigrid import errors
from scaigrid.ids import new_id
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.bunkers.schemas import ExecRequest
from scaigrid.modules.scaibunker.state import ModuleState
from scaigrid.protocol.link import TaskKind

CALL_TIMEOUT_S = 60.0
#: Bytes one output read or stdin write carries through the worker channel.
CHUNK_BYTES = 256 * 1024
#: Most bytes one ``POST .../stdin`` (or a background exec's initial stdin) may carry.
MAX_STDIN_BYTES = 16 << 20
_REF_MAX = 128


def check_ref(ref: str) -> str:
    """Validate a process reference: a guest pid or an ``exe_`` exec id.

    Raises:
        errors.ValidationFailed: anything else.
    """
    if ref.isdigit() and len(ref) <= 10:
        return ref
    if ref.startswith("exe_") and len(ref) <= _REF_MAX and ref.replace("_", "").isalnum():
        return ref
    raise errors.ValidationFailed(
        "a process is named by its pid or its exec id",
        details=[{"field": "pid", "message": "not a pid or exe_ id"}],
    )


def decode_data(data: str | None, data_b64: str | None, field: str = "data") -> bytes:
    """The bytes of a ``data`` (UTF-8 text) or ``data_b64`` field (exclusive).

    Raises:
        errors.ValidationFailed: both given, invalid base64, or over :data:`MAX_STDIN_BYTES`.
    """
    if data is not None and data_b64 is not None:
        raise errors.ValidationFailed(
            f"{field} and {field}_b64 are exclusive",
            details=[{"field": f"{field}_b64", "message": "exclusive with " + field}],
        )
    if data_b64 is not None:
        try:
            raw = base64.b64decode(data_b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise errors.ValidationFailed(
                f"{field}_b64 is not valid base64",
                details=[{"field": f"{field}_b64", "message": "invalid base64"}],
            ) from exc
    else:
        raw = (data or "").encode()
    if len(raw) > MAX_STDIN_BYTES:
        raise errors.ValidationFailed(
            f"{field} may carry at most {MAX_STDIN_BYTES} bytes",
            details=[{"field": field, "message": "too large"}],
        )
    return raw


async def _call(
    state: ModuleState, bunker: Bunker, kind: str, params: dict[str, Any]
) -> dict[str, Any]:
    connection = state.hub.require(bunker.worker_id)
    return await connection.call(kind, params, bunker_id=bunker.id, timeout_s=CALL_TIMEOUT_S)


async def start_background(
    state: ModuleState, bunker: Bunker, request: ExecRequest, *, max_timeout_s: int
) -> dict[str, Any]:
    """Start ``request`` in the background; return ``{exec_id, pid}`` (SPEC §3.6).

    Initial ``stdin``/``stdin_b64`` is written right after the start and stdin is closed
    unless ``stdin_open``. A background exec has no timeout unless ``timeout_s`` is given.

    Raises:
        errors.ValidationFailed: ``timeout_s`` over ``max_timeout_s``, bad stdin.
        errors.AgentUnavailable: the exec could not be started.
    """
    if request.timeout_s is not None and request.timeout_s > max_timeout_s:
        raise errors.ValidationFailed(
            f"timeout_s may not exceed {max_timeout_s}",
            details=[{"field": "timeout_s", "message": f"must be at most {max_timeout_s}"}],
        )
    initial = decode_data(request.stdin, request.stdin_b64, "stdin")
    has_stdin = request.stdin is not None or request.stdin_b64 is not None
    params = {
        "exec_id": new_id("exe"),
        "command": request.command,
        "cwd": request.cwd,
        "env": request.env,
        "user": request.user,
        "timeout_s": request.timeout_s,
        "stdin": "open" if has_stdin or request.stdin_open else "none",
    }
    started = await _call(state, bunker, TaskKind.EXEC_BACKGROUND, params)
    result = {"exec_id": started.get("exec_id"), "pid": started.get("pid")}
    if has_stdin:
        await write_stdin(
            state, bunker, str(result["exec_id"]), initial, eof=not request.stdin_open
        )
    return result


async def list_processes(
    state: ModuleState, bunker: Bunker, status: str | None
) -> list[dict[str, Any]]:
    """Every exec of the bunker, newest first, optionally only those with ``status``."""
    params = {"status": status} if status is not None else {}
    result = await _call(state, bunker, TaskKind.PROCESS_LIST, params)
    entries = result.get("entries", [])
    return [e for e in entries if isinstance(e, dict)]


async def get_process(state: ModuleState, bunker: Bunker, ref: str) -> dict[str, Any]:
    """One process record.

    Raises:
        errors.ScaiGridError: ``PROCESS_NOT_FOUND``.
    """
    return await _call(state, bunker, TaskKind.PROCESS_GET, {"ref": check_ref(ref)})


async def signal_process(
    state: ModuleState, bunker: Bunker, ref: str, signal: str | int, group: bool
) -> dict[str, Any]:
    """Send ``signal`` to the process (or its group); return its record.

    Raises:
        errors.ScaiGridError: ``PROCESS_NOT_FOUND``, ``PROCESS_NOT_RUNNING``,
            ``VALIDATION_ERROR`` (unknown signal).
    """
    params = {"ref": check_ref(ref), "signal": signal, "group": group}
    return await _call(state, bunker, TaskKind.PROCESS_SIGNAL, params)


async def write_stdin(
    state: ModuleState, bunker: Bunker, ref: str, data: bytes, *, eof: bool
) -> dict[str, Any]:
    """Write ``data`` to a ``stdin_open`` process in order, then close stdin if ``eof``.

    Returns:
        ``{bytes_written, stdin_open}``.

    Raises:
        errors.ScaiGridError: ``PROCESS_NOT_FOUND``, ``PROCESS_NOT_RUNNING``, ``STDIN_CLOSED``.
    """
    ref = check_ref(ref)
    written = 0
    answer: dict[str, Any] = {"bytes_written": 0, "stdin_open": True}
    chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
    for index, chunk in enumerate(chunks):
        last = index == len(chunks) - 1
        params = {
            "ref": ref,
            "data_b64": base64.b64encode(chunk).decode(),
            "eof": eof and last,
        }
        answer = await _call(state, bunker, TaskKind.PROCESS_STDIN, params)
        written += int(answer.get("bytes_written", 0))
    return {"bytes_written": written, "stdin_open": bool(answer.get("stdin_open"))}


async def read_output(
    state: ModuleState,
    bunker: Bunker,
    ref: str,
    *,
    stream: Literal["stdout", "stderr"],
    offset: int,
    max_bytes: int,
    encoding: Literal["utf8", "base64"],
) -> dict[str, Any]:
    """Output of ``stream`` available from ``offset`` (SPEC §3.6).

    Returns:
        ``{stream, offset, next_offset, data, encoding, dropped_bytes, eof}``. With
        ``utf8``, a multi-byte character cut at the end of the chunk is left for the next
        read (``next_offset`` stops before it), so resuming never splits a character.
    """
    params = {
        "ref": check_ref(ref),
        "stream": stream,
        "offset": offset,
        "max_bytes": min(max_bytes, CHUNK_BYTES),
    }
    chunk = await _call(state, bunker, TaskKind.PROCESS_OUTPUT, params)
    data = base64.b64decode(str(chunk.get("data_b64", "")))
    first = int(chunk.get("offset", offset))
    eof = bool(chunk.get("eof", False))
    if encoding == "utf8" and not eof:
        data = data[: len(data) - incomplete_utf8_tail(data)]
    next_offset = first + len(data)
    text = data.decode("utf-8", errors="replace") if encoding == "utf8" else None
    return {
        "stream": stream,
        "offset": first,
        "next_offset": next_offset,
        "data": text if text is not None else base64.b64encode(data).decode(),
        "encoding": encoding,
        "dropped_bytes": int(chunk.get("dropped_bytes", 0)),
        "eof": eof,
    }


def incomplete_utf8_tail(data: bytes) -> int:
    """Bytes at the end of ``data`` that begin a UTF-8 sequence not yet complete (0-3).

    Only a well-formed lead byte followed by too few continuation bytes counts, so invalid
    input is never held back forever.
    """
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue
        if byte >= 0xF0:
            need = 4
        elif byte >= 0xE0:
            need = 3
        elif byte >= 0xC0:
            need = 2
        else:
            need = 1
        return back if need > back and byte <= 0xF4 else 0
    return 0

"""Request builders for every endpoint, shared by the sync and async clients.

Each function turns Python arguments into a :class:`~scaigrid.client._transport.Call`; it
does no I/O. Paths follow SPEC §2.3, §3.1, §4.1 and §7.10; ids are percent-encoded so an id
can never change the route.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

from scaigrid.client._transport import Call, QueryParams

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DEFAULT_EXEC_TIMEOUT_S = 60
"""The server's default foreground ``timeout_s`` (``exec_limits.default_timeout_s``)."""
EXEC_GRACE_S = 75.0
"""Extra seconds to wait for an exec answer beyond its ``timeout_s``: the server waits up to
30 s for the result and 30 s more for the output after the command's deadline."""
WAIT_GRACE_S = 15.0
"""Extra seconds to wait for a create answer beyond its ``wait_s``."""
FILE_ANSWER_TIMEOUT_S = 300.0
"""How long an upload may wait for its answer once the body is sent (the server's bound)."""


def compact(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the ``None`` values of ``fields`` so the server applies its defaults."""
    return {key: value for key, value in fields.items() if value is not None}


def _bunker(bunker_id: str, *rest: str) -> str:
    return "/".join(("/bunkers", quote(bunker_id, safe=""), *rest))


def page_size(limit: int | None) -> int:
    """Page size for a listing that stops after ``limit`` items (None = all)."""
    if limit is None:
        return DEFAULT_PAGE_SIZE
    return max(1, min(limit, MAX_PAGE_SIZE))


def octal_mode(mode: int) -> str:
    """Render a permission mode such as ``0o644`` as the API's octal string ``"0644"``.

    Raises:
        ValueError: ``mode`` is outside ``0 … 0o7777``.
    """
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"mode must be within 0o0 and 0o7777, got {mode:#o}")
    return format(mode, "04o")


def label_filters(label: Mapping[str, str] | Iterable[str] | None) -> list[str]:
    """Render label filters as ``key=value`` strings (a mapping or ready-made strings).

    Raises:
        ValueError: a ready-made string has no ``=`` or an empty key.
    """
    if label is None:
        return []
    if isinstance(label, Mapping):
        return [f"{key}={value}" for key, value in label.items()]
    filters = [label] if isinstance(label, str) else list(label)
    for item in filters:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ValueError(f"label filters look like key=value, got {item!r}")
    return filters


def create_bunker(body: Mapping[str, Any], wait_s: int | None) -> Call:
    """``POST /bunkers[?wait_s=]`` with the §2.2 body (None values dropped)."""
    params: QueryParams | None = [("wait_s", str(wait_s))] if wait_s else None
    read_timeout_s = wait_s + WAIT_GRACE_S if wait_s else None
    return Call("POST", "/bunkers", params, compact(body), read_timeout_s)


def list_bunkers(
    status: str | Iterable[str] | None,
    label: Mapping[str, str] | Iterable[str] | None,
    limit: int | None,
) -> Call:
    """``GET /bunkers`` filtered by ``status`` (one or several) and ``label`` (all must
    match)."""
    params: QueryParams = [("limit", str(page_size(limit)))]
    if status is not None:
        statuses = [status] if isinstance(status, str) else list(status)
        if statuses:
            params.append(("status", ",".join(statuses)))
    params.extend(("label", item) for item in label_filters(label))
    return Call("GET", "/bunkers", params)


def get_bunker(bunker_id: str) -> Call:
    """``GET /bunkers/{id}``."""
    return Call("GET", _bunker(bunker_id))


def terminate_bunker(bunker_id: str) -> Call:
    """``DELETE /bunkers/{id}``."""
    return Call("DELETE", _bunker(bunker_id))


def exec_command(
    bunker_id: str,
    command: str | Iterable[str],
    *,
    timeout_s: int | None,
    cwd: str | None,
    env: Mapping[str, str] | None,
    stdin: str | bytes | None,
    user: str,
    max_output_bytes: int | None,
) -> Call:
    """``POST /bunkers/{id}/exec`` (foreground, ``encoding: base64``; SPEC §3.2).

    A ``str`` command runs through ``/bin/sh -c``; any other iterable is an argv. ``str``
    stdin is sent as text, ``bytes`` as ``stdin_b64``.
    """
    body: dict[str, Any] = {
        "command": command if isinstance(command, str) else list(command),
        "timeout_s": timeout_s,
        "cwd": cwd,
        "env": dict(env) if env else None,
        "user": user,
        "max_output_bytes": max_output_bytes,
        "encoding": "base64",
    }
    if isinstance(stdin, str):
        body["stdin"] = stdin
    elif stdin is not None:
        body["stdin_b64"] = base64.b64encode(stdin).decode()
    read_timeout_s = (timeout_s or DEFAULT_EXEC_TIMEOUT_S) + EXEC_GRACE_S
    return Call("POST", _bunker(bunker_id, "exec"), None, compact(body), read_timeout_s)


def write_file(bunker_id: str, path: str, mode: int, parents: bool, user: str) -> Call:
    """``PUT /bunkers/{id}/files?path=&mode=&parents=&user=`` (the body is sent separately)."""
    params = [
        ("path", path),
        ("mode", octal_mode(mode)),
        ("parents", "true" if parents else "false"),
        ("user", user),
    ]
    return Call("PUT", _bunker(bunker_id, "files"), params, read_timeout_s=FILE_ANSWER_TIMEOUT_S)


def read_file(bunker_id: str, path: str, user: str) -> Call:
    """``GET /bunkers/{id}/files?path=&user=`` (raw bytes, no envelope)."""
    params = [("path", path), ("user", user)]
    return Call("GET", _bunker(bunker_id, "files"), params, headers={"Accept": "*/*"})


def write_archive(bunker_id: str, path: str, user: str) -> Call:
    """``PUT /bunkers/{id}/files/archive?path=&user=`` (the tar body is sent separately)."""
    params = [("path", path), ("user", user)]
    return Call(
        "PUT",
        _bunker(bunker_id, "files", "archive"),
        params,
        read_timeout_s=FILE_ANSWER_TIMEOUT_S,
        headers={"Content-Type": "application/x-tar"},
    )


def read_archive(bunker_id: str, path: str, user: str) -> Call:
    """``GET /bunkers/{id}/files/archive?path=&user=`` (a tar stream, no envelope)."""
    params = [("path", path), ("user", user)]
    return Call("GET", _bunker(bunker_id, "files", "archive"), params, headers={"Accept": "*/*"})


def list_files(bunker_id: str, path: str, depth: int, user: str) -> Call:
    """``GET /bunkers/{id}/files/list?path=&depth=&user=``."""
    params = [("path", path), ("depth", str(depth)), ("user", user)]
    return Call("GET", _bunker(bunker_id, "files", "list"), params)


def stat_file(bunker_id: str, path: str, user: str) -> Call:
    """``GET /bunkers/{id}/files/stat?path=&user=``."""
    return Call("GET", _bunker(bunker_id, "files", "stat"), [("path", path), ("user", user)])


def delete_file(bunker_id: str, path: str, recursive: bool, user: str) -> Call:
    """``DELETE /bunkers/{id}/files?path=&recursive=&user=``."""
    params = [("path", path), ("recursive", "true" if recursive else "false"), ("user", user)]
    return Call("DELETE", _bunker(bunker_id, "files"), params)


def make_directory(bunker_id: str, path: str, parents: bool, mode: int, user: str) -> Call:
    """``POST /bunkers/{id}/files/mkdir`` with ``{path, parents, mode}``."""
    body = {"path": path, "parents": parents, "mode": octal_mode(mode)}
    return Call("POST", _bunker(bunker_id, "files", "mkdir"), [("user", user)], body)


def move_file(bunker_id: str, src: str, dst: str, overwrite: bool, user: str) -> Call:
    """``POST /bunkers/{id}/files/move`` with ``{src, dst, overwrite}``."""
    body = {"src": src, "dst": dst, "overwrite": overwrite}
    return Call("POST", _bunker(bunker_id, "files", "move"), [("user", user)], body)


def list_images(status: str | None, name: str | None, limit: int | None) -> Call:
    """``GET /images`` filtered by ``status`` and exact ``name``."""
    params: QueryParams = [("limit", str(page_size(limit)))]
    if status:
        params.append(("status", status))
    if name:
        params.append(("name", name))
    return Call("GET", "/images", params)


def get_image(image_id: str) -> Call:
    """``GET /images/{id}``."""
    return Call("GET", "/images/" + quote(image_id, safe=""))


def register_image(body: Mapping[str, Any]) -> Call:
    """``POST /images`` with the §7.4 body (None values dropped)."""
    return Call("POST", "/images", None, compact(body))


def deactivate_image(image_id: str) -> Call:
    """``POST /images/{id}/deactivate``."""
    return Call("POST", "/images/" + quote(image_id, safe="") + "/deactivate")


def _exec_body(
    command: str | Iterable[str],
    timeout_s: int | None,
    cwd: str | None,
    env: Mapping[str, str] | None,
    stdin: str | bytes | None,
    user: str,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "command": command if isinstance(command, str) else list(command),
        "timeout_s": timeout_s,
        "cwd": cwd,
        "env": dict(env) if env else None,
        "user": user,
        "encoding": "base64",
    }
    if isinstance(stdin, str):
        body["stdin"] = stdin
    elif stdin is not None:
        body["stdin_b64"] = base64.b64encode(stdin).decode()
    return body


def exec_stream(
    bunker_id: str,
    command: str | Iterable[str],
    *,
    timeout_s: int | None,
    cwd: str | None,
    env: Mapping[str, str] | None,
    stdin: str | bytes | None,
    user: str,
) -> Call:
    """``POST /bunkers/{id}/exec`` with ``Accept: text/event-stream`` (SPEC §3.5; base64)."""
    body = _exec_body(command, timeout_s, cwd, env, stdin, user)
    return Call(
        "POST",
        _bunker(bunker_id, "exec"),
        None,
        compact(body),
        headers={"Accept": "text/event-stream"},
    )


def start_process(
    bunker_id: str,
    command: str | Iterable[str],
    *,
    timeout_s: int | None,
    cwd: str | None,
    env: Mapping[str, str] | None,
    stdin: str | bytes | None,
    stdin_open: bool,
    user: str,
) -> Call:
    """``POST /bunkers/{id}/exec`` with ``background: true`` (SPEC §3.6)."""
    body = _exec_body(command, timeout_s, cwd, env, stdin, user)
    body.update(background=True, stdin_open=stdin_open)
    return Call("POST", _bunker(bunker_id, "exec"), None, compact(body))


def _process(bunker_id: str, ref: str | int, *rest: str) -> str:
    return _bunker(bunker_id, "processes", quote(str(ref), safe=""), *rest)


def list_processes(bunker_id: str, status: str | None, limit: int | None) -> Call:
    """``GET /bunkers/{id}/processes[?status=]``."""
    params: QueryParams = [("limit", str(page_size(limit)))]
    if status:
        params.append(("status", status))
    return Call("GET", _bunker(bunker_id, "processes"), params)


def get_process(bunker_id: str, ref: str | int) -> Call:
    """``GET /bunkers/{id}/processes/{pid | exec_id}``."""
    return Call("GET", _process(bunker_id, ref))


def process_output(bunker_id: str, ref: str | int, stream: str, offset: int) -> Call:
    """``GET /bunkers/{id}/processes/{ref}/output?stream=&offset=&encoding=base64``."""
    params = [("stream", stream), ("offset", str(offset)), ("encoding", "base64")]
    return Call("GET", _process(bunker_id, ref, "output"), params)


def signal_process(bunker_id: str, ref: str | int, signal: str | int, group: bool) -> Call:
    """``POST /bunkers/{id}/processes/{ref}/signal`` with ``{signal, group}``."""
    body = {"signal": signal, "group": group}
    return Call("POST", _process(bunker_id, ref, "signal"), None, body)


def process_stdin(bunker_id: str, ref: str | int, data: str | bytes, eof: bool) -> Call:
    """``POST /bunkers/{id}/processes/{ref}/stdin`` with ``{data | data_b64, eof}``."""
    body: dict[str, Any] = {"eof": eof}
    if isinstance(data, str):
        body["data"] = data
    else:
        body["data_b64"] = base64.b64encode(data).decode()
    return Call("POST", _process(bunker_id, ref, "stdin"), None, body)


def follow_output(bunker_id: str, ref: str | int, stream: str, offset: int) -> Call:
    """``GET /bunkers/{id}/processes/{ref}/output`` as an event stream (base64)."""
    params = [("stream", stream), ("offset", str(offset)), ("encoding", "base64")]
    return Call(
        "GET",
        _process(bunker_id, ref, "output"),
        params,
        headers={"Accept": "text/event-stream"},
    )

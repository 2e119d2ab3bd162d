"""A stand-in ScaiBunker API for the client tests, served over real HTTP on 127.0.0.1.

Why a stand-in: exec and files are relayed by the controller to a worker and the guest agent
inside a bunker, so the real app answers them only with a whole stack running (that is what
``tests/e2e`` does). This app keeps bunkers, files and images in memory and speaks the same
routes, envelopes and error codes as ``scaigrid.modules.scaibunker`` (SPEC §1.4-1.5, §2-§4,
§7), so the sync client and the CLI can be tested against a real socket: chunked uploads,
streamed downloads and broken connections behave as they do in production. What only the
real controller can prove (its envelopes, codes and pagination) is tested against the real
app in ``test_real_app.py``.

Exec is scripted by command (see :func:`_run`). Every upload records how its body arrived
(:class:`Upload`). Lists page with a small fixed page size so the client must follow
``next_cursor``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import posixpath
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from scaigrid.ids import new_id

API_KEY = "sgk_standin_0123456789abcdefghijklmnopqrstuv"
BASE = "/v1/modules/scaibunker"
HOME = "/home/user"
PAGE_SIZE = 2
DOWNLOAD_CHUNK = 64 * 1024


class ApiError(Exception):
    """An error the stand-in answers with the error envelope."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


@dataclass
class Upload:
    """How one ``PUT .../files`` body arrived."""

    path: str
    headers: dict[str, str]
    chunk_sizes: list[int]
    data: bytes


@dataclass
class StandinState:
    """Everything the stand-in holds; tests read and seed it."""

    bunkers: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)
    dirs: dict[str, set[str]] = field(default_factory=dict)
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    uploads: list[Upload] = field(default_factory=list)
    execs: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    polls_until_running: int = 2
    polls: dict[str, int] = field(default_factory=dict)

    def add_bunker(self, status: str = "running", **fields: Any) -> dict[str, Any]:
        """Seed a bunker (with an empty home directory) and return it."""
        bunker_id = new_id("bnk")
        bunker = _bunker(bunker_id, {"image": "debian-12", **fields}, status)
        self.bunkers[bunker_id] = bunker
        self.files[bunker_id] = {}
        self.dirs[bunker_id] = {"/", "/home", HOME}
        return bunker


def _now() -> str:
    return "2026-05-09T12:00:00.000Z"


def _image(image_id: str, name: str, scope: str, status: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": image_id,
        "name": name,
        "scope": scope,
        "tenant_id": None,
        "partner_id": None,
        "source": {"kind": "debootstrap", "suite": "bookworm", "variant": "minbase"},
        "digest": None,
        "size_mib": 2048,
        "default_cpu_millicores": None,
        "default_memory_mb": None,
        "default_disk_mb": None,
        "lazy_pull": False,
        "status": status,
        "status_reason": None,
        "scan": None,
        "warm": {"queued": 0, "ready": 0, "failed": 0, "skipped": 0},
        "created_at": _now(),
        **extra,
    }


def _bunker(bunker_id: str, body: dict[str, Any], status: str) -> dict[str, Any]:
    return {
        "id": bunker_id,
        "tenant_id": "ten_standin",
        "owner_user_id": "usr_standin",
        "name": body.get("name"),
        "image": body.get("image"),
        "image_id": "img_standin",
        "snapshot_id": None,
        "lifecycle_mode": body.get("lifecycle_mode", "ephemeral"),
        "network_profile": body.get("network_profile", "isolated"),
        "network_allowlist": body.get("network_allowlist"),
        "cpu_millicores": body.get("cpu_millicores", 1000),
        "memory_mb": body.get("memory_mb", 512),
        "disk_mb": body.get("disk_mb", 1024),
        "gpu_count": 0,
        "gpu_type": None,
        "bandwidth_mbit": None,
        "max_lifetime_s": 3600,
        "idle_timeout_s": 600,
        "session_type": "standalone",
        "session_ref": None,
        "label_set": body.get("label_set", {}),
        "env_vars": dict.fromkeys(body.get("env_vars", {}), "***"),
        "interfaces": [],
        "status": status,
        "status_reason": "created",
        "status_message": None,
        "status_changed_at": _now(),
        "worker_id": "wrk_standin",
        "driver": "container",
        "isolation": "container",
        "created_at": _now(),
        "started_at": None,
        "last_activity_at": None,
        "expires_at": None,
        "ended_at": None,
        "final_snapshot_id": None,
    }


def _ok(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse({"status": "ok", "data": data}, status_code=status)


def _page(items: list[Any], cursor: str | None) -> JSONResponse:
    start = int(cursor or 0)
    page = items[start : start + PAGE_SIZE]
    next_cursor = str(start + PAGE_SIZE) if start + PAGE_SIZE < len(items) else None
    return JSONResponse(
        {
            "status": "ok",
            "data": page,
            "has_more": next_cursor is not None,
            "next_cursor": next_cursor,
        }
    )


def _resolve(path: str) -> str:
    return posixpath.normpath(posixpath.join(HOME, path))


def _entry(state: StandinState, bunker_id: str, path: str) -> dict[str, Any]:
    if path in state.dirs[bunker_id]:
        kind, size, mode = "dir", 4096, "0755"
    elif path in state.files[bunker_id]:
        kind, size, mode = "file", len(state.files[bunker_id][path]), "0644"
    else:
        raise ApiError(404, "FILE_NOT_FOUND", f"{path} does not exist")
    return {
        "name": posixpath.basename(path) or "/",
        "path": path,
        "type": kind,
        "size": size,
        "mode": mode,
        "uid": 1000,
        "gid": 1000,
        "mtime": _now(),
        "symlink_target": None,
    }


def _run(body: dict[str, Any]) -> tuple[dict[str, Any], bytes, bytes]:
    """Script exec outcomes: ``["echo", ...]``, ``["cat"]`` (stdin to stdout), and the shell
    strings ``exit N``, ``binary``, ``timeout``, ``oom``, ``kill``, ``term``, ``lost``,
    ``truncate``."""
    command = body["command"]
    stdin = body.get("stdin", "").encode() or base64.b64decode(body.get("stdin_b64", ""))
    result: dict[str, Any] = {"status": "exited", "exit_code": 0, "signal": None}
    out, err = b"", b""
    if isinstance(command, list):
        if command[0] == "echo":
            out = (" ".join(command[1:]) + "\n").encode()
        elif command[0] == "cat":
            out = stdin
        else:
            result["exit_code"] = 127
            err = f"{command[0]}: not found\n".encode()
    elif command.startswith("exit "):
        result["exit_code"] = int(command.split()[1])
        err = b"failing\n"
    elif command == "binary":
        out, err = bytes(range(256)), b"\xff\xfe-err"
    elif command in ("timeout", "oom", "kill", "lost"):
        statuses = {
            "timeout": "timed_out",
            "oom": "oom_killed",
            "kill": "signaled",
            "lost": "agent_lost",
        }
        result = {
            "status": statuses[command],
            "exit_code": None,
            "signal": None if command == "lost" else "SIGKILL",
        }
        out = b"partial"
    elif command == "term":
        result = {"status": "signaled", "exit_code": None, "signal": "SIGTERM"}
    elif command == "truncate":
        out = b"head-tail"
        result["stdout_truncated"] = True
    return result, out, err


class StandinApp:
    """The ASGI app; ``state`` is shared with the tests."""

    state: StandinState

    def __init__(self) -> None:
        self.reset()
        routes = [
            Route(f"{BASE}/bunkers", self.bunkers, methods=["GET", "POST"]),
            Route(f"{BASE}/bunkers/{{bid}}", self.bunker, methods=["GET", "DELETE"]),
            Route(f"{BASE}/bunkers/{{bid}}/exec", self.exec, methods=["POST"]),
            Route(f"{BASE}/bunkers/{{bid}}/files", self.files, methods=["GET", "PUT", "DELETE"]),
            Route(f"{BASE}/bunkers/{{bid}}/files/list", self.files_list, methods=["GET"]),
            Route(f"{BASE}/bunkers/{{bid}}/files/stat", self.files_stat, methods=["GET"]),
            Route(f"{BASE}/bunkers/{{bid}}/files/mkdir", self.files_mkdir, methods=["POST"]),
            Route(f"{BASE}/bunkers/{{bid}}/files/move", self.files_move, methods=["POST"]),
            Route(f"{BASE}/images", self.images, methods=["GET", "POST"]),
            Route(f"{BASE}/images/{{iid}}", self.image, methods=["GET"]),
        ]
        self.app = Starlette(routes=routes, exception_handlers={ApiError: self._handle})

    def reset(self) -> StandinState:
        """Start over with a fresh state holding only the ready ``debian-12`` image."""
        self.state = StandinState()
        image_id = new_id("img")
        self.state.images[image_id] = _image(image_id, "debian-12", "platform", "ready")
        return self.state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_id("req")
        request = Request(scope, receive)
        self.state.requests.append((request.method, request.url.path, request.url.query))
        auth = request.headers.get("authorization")
        error: ApiError | None = None
        if auth is None:
            error = ApiError(401, "AUTH_TOKEN_MISSING", "No credential")
        elif auth != f"Bearer {API_KEY}":
            error = ApiError(401, "AUTH_TOKEN_INVALID", "Unknown credential")
        if error is not None:
            await self._error(error, request_id)(scope, receive, send)
            return

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        scope.setdefault("state", {})["request_id"] = request_id
        await self.app(scope, receive, send_with_id)

    async def _handle(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return self._error(exc, request.scope["state"]["request_id"])

    @staticmethod
    def _error(error: ApiError, request_id: str) -> JSONResponse:
        body: dict[str, Any] = {"code": error.code, "message": error.message}
        if error.details is not None:
            body["details"] = error.details
        headers = {"x-request-id": request_id}
        if error.code == "RATE_LIMITED":
            body["retry_after"] = 7
            headers["retry-after"] = "7"
        return JSONResponse(
            {"status": "error", "error": body, "meta": {"request_id": request_id}},
            status_code=error.status,
            headers=headers,
        )

    def _bunker(self, request: Request) -> dict[str, Any]:
        bunker = self.state.bunkers.get(request.path_params["bid"])
        if bunker is None:
            raise ApiError(
                404, "BUNKER_NOT_FOUND", f"bunker {request.path_params['bid']} not found"
            )
        return bunker

    def _running(self, request: Request) -> str:
        bunker = self._bunker(request)
        if bunker["status"] != "running":
            raise ApiError(
                409, "BUNKER_NOT_RUNNING", f"bunker {bunker['id']} is {bunker['status']}"
            )
        return str(bunker["id"])

    async def bunkers(self, request: Request) -> Response:
        if request.method == "GET":
            items = list(reversed(self.state.bunkers.values()))
            statuses = request.query_params.get("status")
            if statuses:
                items = [b for b in items if b["status"] in statuses.split(",")]
            for label in request.query_params.getlist("label"):
                key, _, value = label.partition("=")
                items = [b for b in items if b["label_set"].get(key) == value]
            return _page(items, request.query_params.get("cursor"))
        body = await request.json()
        if body.get("cpu_millicores", 1000) < 100:
            raise ApiError(
                422,
                "VALIDATION_ERROR",
                "The request is not valid",
                [{"field": "cpu_millicores", "message": "must be at least 100"}],
            )
        if not any(i["name"] == body.get("image") for i in self.state.images.values()):
            raise ApiError(404, "IMAGE_NOT_FOUND", f"image {body.get('image')} not found")
        if body.get("name") == "rate-limited":
            raise ApiError(429, "RATE_LIMITED", "slow down")
        status = "provisioning" if request.query_params.get("wait_s") else "pending"
        bunker = self.state.add_bunker(status, **body)
        bunker["request"] = body
        return _ok(bunker, 201)

    async def bunker(self, request: Request) -> Response:
        if request.path_params["bid"] == "bnk_html":
            return Response("<html>bad gateway</html>", 502, media_type="text/html")
        if request.path_params["bid"] == "bnk_slow":
            await asyncio.sleep(2)
        bunker = self._bunker(request)
        if request.method == "DELETE":
            bunker["status"] = "stopping"
            return _ok(bunker)
        polls = self.state.polls.get(bunker["id"], 0) + 1
        self.state.polls[bunker["id"]] = polls
        if (
            bunker["status"] in ("pending", "provisioning")
            and polls >= self.state.polls_until_running
        ):
            doomed = bunker["name"] == "doomed"
            bunker["status"] = "failed" if doomed else "running"
            bunker["status_reason"] = "boot_failed" if doomed else "booted"
        return _ok({**bunker, "status_history": []})

    async def exec(self, request: Request) -> Response:
        self._running(request)
        body = await request.json()
        self.state.execs.append(body)
        result, out, err = _run(body)
        encode = (
            (lambda b: base64.b64encode(b).decode())
            if body.get("encoding") == "base64"
            else (lambda b: b.decode("utf-8", "replace"))
        )
        return _ok(
            {
                "exec_id": new_id("exe"),
                "pid": 42,
                "stdout": encode(out),
                "stderr": encode(err),
                "stdout_truncated": False,
                "stderr_truncated": False,
                "duration_ms": 5,
                "started_at": _now(),
                **result,
            }
        )

    async def files(self, request: Request) -> Response:
        bid = self._running(request)
        path = _resolve(request.query_params["path"])
        if request.method == "PUT":
            chunks = [chunk async for chunk in request.stream() if chunk]
            data = b"".join(chunks)
            self.state.uploads.append(
                Upload(path, dict(request.headers), [len(c) for c in chunks], data)
            )
            if path in self.state.dirs[bid]:
                raise ApiError(409, "FILE_CONFLICT", f"{path} is a directory")
            parent = posixpath.dirname(path)
            if parent not in self.state.dirs[bid]:
                if request.query_params.get("parents") != "true":
                    raise ApiError(404, "FILE_NOT_FOUND", f"{parent} does not exist")
                while parent not in self.state.dirs[bid]:
                    self.state.dirs[bid].add(parent)
                    parent = posixpath.dirname(parent)
            self.state.files[bid][path] = data
            return _ok(
                {
                    "path": path,
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "mode": int(request.query_params["mode"], 8),
                }
            )
        if request.method == "DELETE":
            if path in self.state.files[bid]:
                del self.state.files[bid][path]
            elif path in self.state.dirs[bid]:
                children = [
                    p
                    for p in (*self.state.files[bid], *self.state.dirs[bid])
                    if p.startswith(path + "/")
                ]
                if children and request.query_params.get("recursive") != "true":
                    raise ApiError(409, "FILE_CONFLICT", f"{path} is not empty")
                for child in children:
                    self.state.files[bid].pop(child, None)
                    self.state.dirs[bid].discard(child)
                self.state.dirs[bid].discard(path)
            else:
                raise ApiError(404, "FILE_NOT_FOUND", f"{path} does not exist")
            return _ok({"path": path, "deleted": True})
        if path in self.state.dirs[bid]:
            raise ApiError(409, "FILE_CONFLICT", f"{path} is a directory")
        if path not in self.state.files[bid]:
            raise ApiError(404, "FILE_NOT_FOUND", f"{path} does not exist")
        data = self.state.files[bid][path]
        # A file named "broken" promises more bytes than it sends, then drops the connection.
        length = len(data) + (1000 if posixpath.basename(path) == "broken" else 0)

        async def body() -> AsyncIterator[bytes]:
            for start in range(0, len(data), DOWNLOAD_CHUNK):
                yield data[start : start + DOWNLOAD_CHUNK]
                await asyncio.sleep(0)

        return StreamingResponse(
            body(),
            media_type="application/octet-stream",
            headers={"content-length": str(length), "accept-ranges": "bytes"},
        )

    async def files_list(self, request: Request) -> Response:
        bid = self._running(request)
        path = _resolve(request.query_params.get("path", "."))
        entry = _entry(self.state, bid, path)
        if entry["type"] != "dir":
            raise ApiError(409, "FILE_CONFLICT", f"{path} is not a directory")
        depth = int(request.query_params.get("depth", "1"))
        names = sorted(
            p
            for p in (*self.state.dirs[bid], *self.state.files[bid])
            if p.startswith(path.rstrip("/") + "/")
            and p != path
            and p[len(path) :].count("/") <= depth
        )
        return _page(
            [_entry(self.state, bid, p) for p in names], request.query_params.get("cursor")
        )

    async def files_stat(self, request: Request) -> Response:
        bid = self._running(request)
        return _ok(_entry(self.state, bid, _resolve(request.query_params["path"])))

    async def files_mkdir(self, request: Request) -> Response:
        bid = self._running(request)
        body = await request.json()
        path = _resolve(body["path"])
        if path in self.state.dirs[bid] or path in self.state.files[bid]:
            raise ApiError(409, "FILE_CONFLICT", f"{path} exists")
        if posixpath.dirname(path) not in self.state.dirs[bid] and not body["parents"]:
            raise ApiError(404, "FILE_NOT_FOUND", "parent missing")
        self.state.dirs[bid].add(path)
        return _ok({**_entry(self.state, bid, path), "mode": body["mode"]})

    async def files_move(self, request: Request) -> Response:
        bid = self._running(request)
        body = await request.json()
        src, dst = _resolve(body["src"]), _resolve(body["dst"])
        if src not in self.state.files[bid]:
            raise ApiError(404, "FILE_NOT_FOUND", f"{src} does not exist")
        if dst in self.state.files[bid] and not body["overwrite"]:
            raise ApiError(409, "FILE_CONFLICT", f"{dst} exists")
        self.state.files[bid][dst] = self.state.files[bid].pop(src)
        return _ok(_entry(self.state, bid, dst))

    async def images(self, request: Request) -> Response:
        if request.method == "GET":
            items = list(reversed(self.state.images.values()))
            if status := request.query_params.get("status"):
                items = [i for i in items if i["status"] == status]
            return _page(items, request.query_params.get("cursor"))
        body = await request.json()
        if any(i["name"] == body["name"] for i in self.state.images.values()):
            raise ApiError(409, "SLUG_CONFLICT", f"image {body['name']} exists")
        image_id = new_id("img")
        extra = {k: v for k, v in body.items() if k not in ("name", "scope")}
        image = _image(image_id, body["name"], body.get("scope", "tenant"), "pending", **extra)
        self.state.images[image_id] = image
        return _ok(image, 201)

    async def image(self, request: Request) -> Response:
        image = self.state.images.get(request.path_params["iid"])
        if image is None:
            raise ApiError(404, "IMAGE_NOT_FOUND", f"image {request.path_params['iid']} not found")
        return _ok(image)


@contextlib.contextmanager
def serve(app: StandinApp) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port in a thread; yield its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", lifespan="off", ws="none", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the stand-in server did not start")
        threading.Event().wait(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()

"""Storage proxy routes ``/storage/objects/{key}`` (SPEC §11.2).

Served in-process by the controller and, unchanged, by a standalone ``bunker_proxy``. The only
authority is a capability (``Authorization: Bearer <cap>`` or ``?cap=``) checked with the
shared secret before the store is touched, so the routes need no database and no Redis and any
two proxies are interchangeable. Uploads stream into the store (S3 multipart) with the sha256
computed on the fly; downloads stream out, with a single ``Range`` honoured.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import structlog
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from scaigrid.errors import AuthTokenMissing, RangeNotSatisfiable
from scaigrid.modules.scaibunker.storage.capabilities import validate_key, verify
from scaigrid.modules.scaibunker.storage.service import StorageService
from scaigrid.platform.envelope import ok
from scaigrid.platform.middleware import streaming_body

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/storage", tags=["storage"])

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _storage(request: Request) -> StorageService:
    service: StorageService = request.app.state.scaibunker_storage
    return service


def _authorise(request: Request, method: str, key: str) -> StorageService:
    service = _storage(request)
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    token = token or request.query_params.get("cap", "")
    if not token:
        raise AuthTokenMissing("a storage capability is required")
    validate_key(key)
    verify(token, service.secrets, method, key)
    return service


def _parse_range(header: str) -> tuple[int, int | None, int | None]:
    """``(start, end, suffix)``: ``bytes=a-b``, ``bytes=a-`` or ``bytes=-n``."""
    match = _RANGE_RE.match(header.strip())
    if not match or match.groups() == ("", ""):
        raise RangeNotSatisfiable(f"unsupported Range header {header!r}")
    first, last = match.groups()
    if first == "":
        return 0, None, int(last)
    return int(first), int(last) if last else None, None


@router.put("/objects/{key:path}")
@streaming_body
async def put_object(key: str, request: Request) -> JSONResponse:
    """Stream the body into the store; 200 ``{key, size, sha256}``.

    With ``If-None-Match: *`` the object is stored only if the key is free; otherwise 412
    ``OBJECT_EXISTS`` and the earlier object stays (first writer wins).
    """
    service = _authorise(request, "PUT", key)
    if_absent = request.headers.get("if-none-match", "").strip() == "*"

    async def body() -> AsyncIterator[bytes]:
        async for chunk in request.stream():
            if chunk:
                yield chunk

    result = await service.store.put(key, body(), if_absent=if_absent)
    log.info("storage.put", key=key, size=result.size)
    return ok({"key": result.key, "size": result.size, "sha256": result.sha256})


@router.get("/objects/{key:path}")
async def get_object(key: str, request: Request) -> StreamingResponse:
    """Stream the object (200) or one range of it (206)."""
    service = _authorise(request, "GET", key)
    header = request.headers.get("range")
    if header is None:
        read = await service.store.get(key)
        status = 200
    else:
        start, end, suffix = _parse_range(header)
        if suffix is not None:
            total = (await service.store.head(key)).size
            start = max(total - suffix, 0)
        read = await service.store.get(key, start, end)
        status = 206
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Length": str(read.length if read.total else 0),
    }
    if status == 206:
        headers["Content-Range"] = f"bytes {read.start}-{read.end}/{read.total}"
    return StreamingResponse(
        read.chunks, status_code=status, headers=headers, media_type="application/octet-stream"
    )


@router.head("/objects/{key:path}")
async def head_object(key: str, request: Request) -> Response:
    """200 with ``Content-Length`` and ``ETag``."""
    service = _authorise(request, "HEAD", key)
    info = await service.store.head(key)
    return Response(
        status_code=200,
        headers={"Content-Length": str(info.size), "ETag": info.etag, "Accept-Ranges": "bytes"},
    )


@router.delete("/objects/{key:path}")
async def delete_object(key: str, request: Request) -> JSONResponse:
    """Remove the object; 200 ``{id, deleted: true}``."""
    service = _authorise(request, "DELETE", key)
    await service.store.delete(key)
    log.info("storage.delete", key=key)
    return ok({"id": key, "deleted": True})

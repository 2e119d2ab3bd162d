"""The worker's object client: files to and from the storage proxy (SPEC §11.2, §10.6).

Workers hold no S3 credentials. Every transfer carries a capability minted by the controller
for exactly the key it touches, sent as ``Authorization: Bearer``. Uploads stream the file
(the proxy computes the sha256 on the fly and answers it, checked here against the local
digest); downloads stream to a temporary file next to the destination that is renamed into
place only when complete. Transfers that fail on the network or with a 5xx are retried up to
3 times with backoff (1, 2, 4 s); a 4xx is final, except a refused (expired) capability when
the caller gave a ``refresh`` callable: a new capability is fetched (SPEC §10.6, "asking for
a new capability when one has expired") and the attempt repeated once.

An upload with ``if_absent`` sends ``If-None-Match: *``: the proxy stores it only when the key
is free and answers 412 ``OBJECT_EXISTS`` otherwise (:class:`ObjectExistsError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import httpx
import structlog

from scaigrid.worker.link.tasks import TaskFailed

log = structlog.get_logger(__name__)

OBJECTS_PATH: Final = "/v1/modules/scaibunker/storage/objects"
CHUNK_BYTES: Final = 1024 * 1024
ATTEMPTS: Final = 4
BACKOFF_S: Final = (1.0, 2.0, 4.0)
TIMEOUT: Final = httpx.Timeout(60.0, connect=10.0)


#: Answers a new capability token when the one in hand was refused (expired).
Refresh = Callable[[], Awaitable[str]]
#: Codes the proxy answers for a capability that is expired, tampered or out of scope.
_REFUSED: Final = frozenset({"AUTHZ_PERMISSION_DENIED", "AUTH_TOKEN_INVALID", "AUTH_TOKEN_MISSING"})


class _Retryable(Exception):
    """A transfer failure worth another attempt."""


class ObjectExistsError(TaskFailed):
    """A conditional upload lost: another writer stored the key first."""

    def __init__(self, key: str) -> None:
        super().__init__("OBJECT_EXISTS", f"an object is already stored at {key}")


def _fail(response: httpx.Response, what: str) -> TaskFailed:
    try:
        error = response.json().get("error", {})
    except ValueError:
        error = {}
    code = str(error.get("code") or "OBJECT_STORE_UNAVAILABLE")
    message = str(error.get("message") or f"HTTP {response.status_code}")
    return TaskFailed(code, f"{what}: {message}")


class ObjectClient:
    """Uploads and downloads through the storage proxy at ``base_url``.

    Args:
        base_url: the proxy's (or controller's) base URL, e.g. ``http://127.0.0.1:8080``.
    """

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")

    def _url(self, key: str) -> str:
        return f"{self.base_url}{OBJECTS_PATH}/{key}"

    async def _retry(self, what: str, attempt_once: Any) -> Any:
        for attempt in range(ATTEMPTS):
            try:
                return await attempt_once()
            except (_Retryable, httpx.TransportError) as exc:
                if attempt == ATTEMPTS - 1:
                    raise TaskFailed(
                        "OBJECT_STORE_UNAVAILABLE", f"{what} failed after {ATTEMPTS} tries: {exc}"
                    ) from exc
                log.warning("objects.retry", what=what, attempt=attempt + 1, error=str(exc))
                await asyncio.sleep(BACKOFF_S[attempt])
        raise AssertionError("unreachable")

    async def _with_refresh(
        self, capability: str, refresh: Refresh | None, run: Callable[[str], Awaitable[Any]]
    ) -> Any:
        try:
            return await run(capability)
        except TaskFailed as exc:
            if refresh is None or exc.code not in _REFUSED:
                raise
        log.info("objects.capability_refreshed")
        return await run(await refresh())

    async def upload(
        self,
        path: Path,
        key: str,
        capability: str,
        sha256: str,
        *,
        if_absent: bool = False,
        refresh: Refresh | None = None,
    ) -> dict[str, Any]:
        """PUT ``path`` at ``key``; return the proxy's ``{key, size, sha256}``.

        Args:
            path: local file.
            key: object key.
            capability: a ``PUT`` capability for ``key``.
            sha256: hex digest of ``path`` (checked against the proxy's).
            if_absent: store only if the key is free (``If-None-Match: *``).
            refresh: called for a new capability when the proxy refuses this one.

        Raises:
            ObjectExistsError: ``if_absent`` and the key was taken.
            TaskFailed: the proxy refused (its code, e.g. ``AUTHZ_PERMISSION_DENIED``), the
                digest it computed differs from ``sha256``, or retries ran out
                (``OBJECT_STORE_UNAVAILABLE``).
        """
        result: dict[str, Any] = await self._with_refresh(
            capability,
            refresh,
            lambda cap: self._upload(path, key, cap, sha256, if_absent=if_absent),
        )
        return result

    async def _upload(
        self, path: Path, key: str, capability: str, sha256: str, *, if_absent: bool
    ) -> dict[str, Any]:

        async def body() -> AsyncIterator[bytes]:
            with path.open("rb") as handle:
                while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
                    yield chunk

        async def once() -> dict[str, Any]:
            size = (await asyncio.to_thread(path.stat)).st_size
            headers = {
                "Authorization": f"Bearer {capability}",
                "Content-Length": str(size),
                "Content-Type": "application/octet-stream",
            }
            if if_absent:
                headers["If-None-Match"] = "*"
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                response = await client.put(self._url(key), content=body(), headers=headers)
            if response.status_code >= 500:
                raise _Retryable(f"HTTP {response.status_code}")
            if response.status_code == 412 and if_absent:
                raise ObjectExistsError(key)
            if response.status_code != 200:
                raise _fail(response, f"upload of {key}")
            data: dict[str, Any] = response.json()["data"]
            return data

        result: dict[str, Any] = await self._retry(f"upload of {key}", once)
        if result.get("sha256") != sha256:
            raise TaskFailed("OBJECT_STORE_UNAVAILABLE", f"upload of {key} arrived corrupted")
        log.info("objects.uploaded", key=key, size=result.get("size"))
        return result

    async def put_bytes(
        self, key: str, body: bytes, capability: str, *, refresh: Refresh | None = None
    ) -> dict[str, Any]:
        """PUT the small in-memory ``body`` at ``key``; return ``{key, size, sha256}``.

        Raises:
            TaskFailed: as :meth:`upload`.
        """
        expected = hashlib.sha256(body).hexdigest()

        async def run(cap: str) -> dict[str, Any]:
            async def once() -> dict[str, Any]:
                headers = {
                    "Authorization": f"Bearer {cap}",
                    "Content-Type": "application/octet-stream",
                }
                async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                    response = await client.put(self._url(key), content=body, headers=headers)
                if response.status_code >= 500:
                    raise _Retryable(f"HTTP {response.status_code}")
                if response.status_code != 200:
                    raise _fail(response, f"upload of {key}")
                data: dict[str, Any] = response.json()["data"]
                return data

            data: dict[str, Any] = await self._retry(f"upload of {key}", once)
            if data.get("sha256") != expected:
                raise TaskFailed("OBJECT_STORE_UNAVAILABLE", f"upload of {key} arrived corrupted")
            return data

        result: dict[str, Any] = await self._with_refresh(capability, refresh, run)
        return result

    async def head(self, key: str, capability: str) -> int | None:
        """Size of the object at ``key``, or ``None`` when there is none.

        Raises:
            TaskFailed: the proxy refused, or retries ran out (``OBJECT_STORE_UNAVAILABLE``).
        """

        async def once() -> int | None:
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                response = await client.head(
                    self._url(key), headers={"Authorization": f"Bearer {capability}"}
                )
            if response.status_code >= 500:
                raise _Retryable(f"HTTP {response.status_code}")
            if response.status_code == 404:
                return None
            if response.status_code != 200:
                raise TaskFailed(
                    "AUTHZ_PERMISSION_DENIED"
                    if response.status_code == 403
                    else "OBJECT_STORE_UNAVAILABLE",
                    f"HEAD of {key}: HTTP {response.status_code}",
                )
            return int(response.headers.get("content-length", "0"))

        size: int | None = await self._retry(f"HEAD of {key}", once)
        return size

    async def download(
        self, key: str, capability: str, dest: Path, *, refresh: Refresh | None = None
    ) -> int:
        """GET ``key`` into ``dest`` (replaced atomically); return its size in bytes.

        ``refresh``, when given, is called for a new capability if the proxy refuses this one.

        Raises:
            TaskFailed: ``OBJECT_NOT_FOUND`` / ``AUTHZ_PERMISSION_DENIED`` from the proxy, or
                ``OBJECT_STORE_UNAVAILABLE`` when retries ran out. ``dest`` is untouched.
        """
        size: int = await self._with_refresh(
            capability, refresh, lambda cap: self._download(key, cap, dest)
        )
        return size

    async def _download(self, key: str, capability: str, dest: Path) -> int:
        tmp = dest.with_name(dest.name + ".part")

        async def once() -> int:
            size = 0
            headers = {"Authorization": f"Bearer {capability}"}
            try:
                async with (
                    httpx.AsyncClient(timeout=TIMEOUT) as client,
                    client.stream("GET", self._url(key), headers=headers) as response,
                ):
                    if response.status_code >= 500:
                        raise _Retryable(f"HTTP {response.status_code}")
                    if response.status_code != 200:
                        await response.aread()
                        raise _fail(response, f"download of {key}")
                    with tmp.open("wb") as out:
                        async for chunk in response.aiter_bytes(CHUNK_BYTES):
                            await asyncio.to_thread(out.write, chunk)
                            size += len(chunk)
                expected = response.headers.get("content-length")
                if expected is not None and int(expected) != size:
                    raise _Retryable(f"download of {key} ended early ({size} of {expected})")
                os.replace(tmp, dest)
                return size
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

        size: int = await self._retry(f"download of {key}", once)
        log.info("objects.downloaded", key=key, size=size)
        return size

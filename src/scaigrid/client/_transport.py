"""HTTP plumbing shared by :class:`~scaigrid.client.Client` and
:class:`~scaigrid.client.AsyncClient`: configuration, envelopes, deadlines and error mapping.

Endpoint code builds a :class:`Call` (method, path below the module base, query, JSON body,
read deadline); the sync and async transports send it and unwrap the envelope (SPEC §1.4).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import httpx

from scaigrid import __version__
from scaigrid.client.errors import (
    APIConnectionError,
    APITimeoutError,
    ConfigurationError,
    ProtocolError,
    from_response,
)

MODULE_PREFIX = "/v1/modules/scaibunker"
"""Path of the ScaiBunker module below the ScaiGrid host (SPEC §1.1)."""

DEFAULT_TIMEOUT_S = 60.0
HOST_ENV = "SCAIGRID_HOST"
API_KEY_ENV = "SCAIGRID_API_KEY"

QueryParams = list[tuple[str, str]]
RequestContent = bytes | Iterable[bytes] | AsyncIterable[bytes]


@dataclass(frozen=True)
class Call:
    """One API request.

    Args:
        method: HTTP method.
        path: path below :data:`MODULE_PREFIX`, e.g. ``"/bunkers"``.
        params: query parameters (repeatable keys allowed).
        json: JSON body, or None for no body.
        read_timeout_s: how long to wait for the answer (seconds) when longer than the
            client's timeout, e.g. for an exec that may run for minutes.
        headers: extra request headers.
    """

    method: str
    path: str
    params: QueryParams | None = None
    json: Any = None
    read_timeout_s: float | None = None
    headers: dict[str, str] | None = None


def resolve_config(host: str | None, api_key: str | None) -> tuple[str, str | None]:
    """Return ``(base_url, api_key)``, reading ``SCAIGRID_HOST`` / ``SCAIGRID_API_KEY`` for
    values not given. The host may already end in :data:`MODULE_PREFIX`.

    Raises:
        ConfigurationError: no host, or the host is not an ``http://`` / ``https://`` URL.
    """
    host = host or os.environ.get(HOST_ENV) or None
    if host is None:
        raise ConfigurationError(f"no ScaiGrid host: pass host= or set {HOST_ENV}")
    try:
        url = httpx.URL(host)
    except httpx.InvalidURL as exc:
        raise ConfigurationError(f"the ScaiGrid host is not a URL: {host!r}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigurationError(f"the ScaiGrid host must be an http(s) URL, got {host!r}")
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    base_url = host.rstrip("/")
    if not base_url.endswith(MODULE_PREFIX):
        base_url += MODULE_PREFIX
    return base_url, api_key


def default_headers(api_key: str | None) -> dict[str, str]:
    """Headers every request carries: ``Accept``, ``User-Agent`` and the bearer key."""
    headers = {"Accept": "application/json", "User-Agent": f"scaigrid-client/{__version__}"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def timeout_for(timeout_s: float, call: Call) -> httpx.Timeout:
    """The deadlines of ``call``: ``timeout_s`` for connect, write and pool, and the longer of
    ``timeout_s`` and ``call.read_timeout_s`` for reading the answer. Never None."""
    read_s = max(timeout_s, call.read_timeout_s or 0.0)
    return httpx.Timeout(timeout_s, read=read_s)


@contextlib.contextmanager
def translate_transport_errors(base_url: str) -> Iterator[None]:
    """Turn httpx transport failures into :class:`APITimeoutError` /
    :class:`APIConnectionError` (works around awaits too)."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise APITimeoutError(f"{base_url}: {type(exc).__name__} {exc}".rstrip()) from exc
    except httpx.TransportError as exc:
        raise APIConnectionError(f"{base_url}: {type(exc).__name__} {exc}".rstrip()) from exc


def _json_body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError as exc:
        raise ProtocolError(
            f"HTTP {response.status_code} answer is not JSON "
            f"({response.headers.get('content-type', 'no content type')})"
        ) from exc
    if not isinstance(body, dict) or body.get("status") != "ok" or "data" not in body:
        raise ProtocolError(f"HTTP {response.status_code} answer is not a ScaiGrid envelope")
    return body


def unwrap(response: httpx.Response) -> Any:
    """Return ``data`` of a success envelope ``{"status": "ok", "data": ...}``.

    Raises:
        ProtocolError: the body is not such an envelope.
    """
    return _json_body(response)["data"]


def unwrap_page(response: httpx.Response) -> tuple[list[Any], str | None]:
    """Return ``(items, next_cursor)`` of a list envelope; the cursor is None on the last page.

    Raises:
        ProtocolError: the body is not a list envelope.
    """
    body = _json_body(response)
    items = body["data"]
    if not isinstance(items, list):
        raise ProtocolError("a list endpoint answered without a list in data")
    cursor = body.get("next_cursor")
    if not body.get("has_more", cursor is not None) or not isinstance(cursor, str):
        cursor = None
    return items, cursor


def _request(
    client: httpx.Client | httpx.AsyncClient,
    call: Call,
    timeout_s: float,
    content: RequestContent | None,
) -> httpx.Request:
    headers = dict(call.headers or {})
    if content is not None:
        headers.setdefault("Content-Type", "application/octet-stream")
    return client.build_request(
        call.method,
        call.path.lstrip("/"),
        params=tuple(call.params or ()),
        json=call.json,
        content=content,
        headers=headers,
        timeout=timeout_for(timeout_s, call),
    )


class SyncTransport:
    """Blocking transport over :class:`httpx.Client`.

    Args:
        base_url: ``<host>/v1/modules/scaibunker``.
        api_key: bearer credential or None.
        timeout_s: default connect/read/write/pool deadline in seconds.
        transport: an httpx transport to use instead of the network (tests, custom TLS).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout_s: float,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        self.timeout_s = timeout_s
        self._client = httpx.Client(
            base_url=base_url + "/",
            headers=default_headers(api_key),
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def send(self, call: Call, content: RequestContent | None = None) -> httpx.Response:
        """Send ``call`` and read the whole answer.

        Raises:
            ScaiGridAPIError: the server answered with an error (typed by code).
            APIConnectionError: no answer (:class:`APITimeoutError` for deadlines).
        """
        request = _request(self._client, call, self.timeout_s, content)
        with translate_transport_errors(self.base_url):
            response = self._client.send(request)
        if response.status_code >= 400:
            raise from_response(response)
        return response

    def data(self, call: Call, content: RequestContent | None = None) -> Any:
        """Send ``call`` and return the envelope's ``data``."""
        return unwrap(self.send(call, content))

    def pages(self, call: Call) -> Iterator[Any]:
        """Yield every item of a list endpoint, following ``next_cursor`` page by page."""
        params = list(call.params or [])
        cursor: str | None = None
        while True:
            page_params = [*params, ("cursor", cursor)] if cursor else params
            items, cursor = unwrap_page(self.send(replace(call, params=page_params)))
            yield from items
            if cursor is None:
                return

    @contextlib.contextmanager
    def stream(self, call: Call) -> Iterator[httpx.Response]:
        """Send ``call`` and yield the response with its body still unread.

        Raises:
            ScaiGridAPIError: the server answered with an error (its body is read first).
            APIConnectionError: no answer, or the body broke off while being read.
        """
        request = _request(self._client, call, self.timeout_s, None)
        with translate_transport_errors(self.base_url):
            response = self._client.send(request, stream=True)
            try:
                if response.status_code >= 400:
                    response.read()
                    raise from_response(response)
                yield response
            finally:
                response.close()


class AsyncTransport:
    """Asynchronous transport over :class:`httpx.AsyncClient`; same contract as
    :class:`SyncTransport`."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout_s: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        self.timeout_s = timeout_s
        self._client = httpx.AsyncClient(
            base_url=base_url + "/",
            headers=default_headers(api_key),
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
        )

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def send(self, call: Call, content: RequestContent | None = None) -> httpx.Response:
        """Send ``call`` and read the whole answer (errors as :meth:`SyncTransport.send`)."""
        request = _request(self._client, call, self.timeout_s, content)
        with translate_transport_errors(self.base_url):
            response = await self._client.send(request)
        if response.status_code >= 400:
            raise from_response(response)
        return response

    async def data(self, call: Call, content: RequestContent | None = None) -> Any:
        """Send ``call`` and return the envelope's ``data``."""
        return unwrap(await self.send(call, content))

    async def pages(self, call: Call) -> AsyncIterator[Any]:
        """Yield every item of a list endpoint, following ``next_cursor`` page by page."""
        params = list(call.params or [])
        cursor: str | None = None
        while True:
            page_params = [*params, ("cursor", cursor)] if cursor else params
            items, cursor = unwrap_page(await self.send(replace(call, params=page_params)))
            for item in items:
                yield item
            if cursor is None:
                return

    @contextlib.asynccontextmanager
    async def stream(self, call: Call) -> AsyncIterator[httpx.Response]:
        """Send ``call`` and yield the response with its body still unread."""
        request = _request(self._client, call, self.timeout_s, None)
        with translate_transport_errors(self.base_url):
            response = await self._client.send(request, stream=True)
            try:
                if response.status_code >= 400:
                    await response.aread()
                    raise from_response(response)
                yield response
            finally:
                await response.aclose()

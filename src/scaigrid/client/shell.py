"""Interactive shell sessions over the shell WebSocket (SPEC §5).

>>> with Client() as client:
...     with client.shell(bunker_id, cols=120, rows=40) as shell:
...         shell.send(b"ls /\\n")
...         print(shell.read_until(b"$ ").decode())
...         shell.resize(100, 30)
...         shell.send(b"exit 3\\n")
...         assert shell.wait() == 3

Output is raw terminal bytes exactly as the PTY wrote them; :attr:`ShellBase.offset`
counts them, and :meth:`Shell.reconnect` reattaches after a dropped connection asking the
server to replay from that offset, so nothing is lost or repeated while the session's
replay buffer still holds it. A session ends with :attr:`ShellBase.exit_code` set.
Refusals before the upgrade raise the same typed errors as every other call
(``BunkerNotFound``, ``AuthzPermissionDenied``, ``ShellSessionNotFound``, …); a session
the server closes because the worker or agent went away raises ``AgentUnavailable``.
"""

from __future__ import annotations

import json
import time
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import httpx
import websockets.asyncio.client as ws_async
import websockets.exceptions as ws_errors
import websockets.sync.client as ws_sync

from scaigrid.client._transport import Call
from scaigrid.client.errors import APIConnectionError, ScaiGridAPIError, error_for, from_response

#: Largest frame accepted from the server.
MAX_FRAME_BYTES = 1 << 20


def shell_url(base_url: str, bunker_id: str, params: dict[str, Any]) -> str:
    """The ``ws(s)://`` URL of a bunker's shell with the query ``params`` (None dropped)."""
    query = urlencode({k: v for k, v in params.items() if v is not None})
    url = base_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    return f"{url}/bunkers/{bunker_id}/shell" + (f"?{query}" if query else "")


def _refusal(exc: Exception) -> Exception:
    """The typed error of a refused upgrade (the server answers with the error envelope)."""
    if isinstance(exc, ws_errors.InvalidStatus):
        response = exc.response
        fake = httpx.Response(
            response.status_code,
            headers=list(response.headers.raw_items()),
            content=bytes(response.body or b""),
        )
        return from_response(fake)
    return APIConnectionError(f"cannot open the shell: {exc}")


def _closed_error(exc: ws_errors.ConnectionClosed) -> ScaiGridAPIError | None:
    """The error a close frame reports: 1011 with a JSON ``{code, message}`` reason."""
    received = exc.rcvd
    if received is None or received.code == 1000:
        return None
    try:
        reason = json.loads(received.reason)
        code, message = str(reason["code"]), str(reason.get("message", ""))
    except (ValueError, KeyError, TypeError):
        code, message = "AGENT_UNAVAILABLE", received.reason or f"closed with {received.code}"
    return error_for(code, 502)(code, message, 502)


class ShellBase:
    """State both shell flavours share.

    Attributes:
        bunker_id: the bunker.
        session_id: ``shs_`` id once the server's first message arrived.
        offset: output bytes received so far (the stream offset of the next byte).
        replayed_bytes: bytes the server replayed on the latest (re)attach.
        exit_code: the shell's exit code once it ended (``128 + n`` for signal ``n``).
        exit_signal: the signal name that ended it, if any.
        errors: ``{"type": "error", "code", "message"}`` frames the server sent about
            rejected control frames.
        closed: True once the connection is closed.
    """

    def __init__(self, bunker_id: str) -> None:
        self.bunker_id = bunker_id
        self.session_id: str | None = None
        self.offset = 0
        self.replayed_bytes = 0
        self.exit_code: int | None = None
        self.exit_signal: str | None = None
        self.errors: list[dict[str, Any]] = []
        self.closed = False

    def _text(self, text: str) -> None:
        try:
            frame = json.loads(text)
        except ValueError:
            return
        if not isinstance(frame, dict):
            return
        kind = frame.get("type")
        if kind == "session":
            self.session_id = str(frame.get("session_id"))
            self.replayed_bytes = int(frame.get("replayed_bytes") or 0)
            self.offset = int(frame.get("offset", self.offset))
        elif kind == "exit":
            self.exit_code = frame.get("exit_code")
            self.exit_signal = frame.get("signal")
        elif kind == "error":
            self.errors.append(frame)

    @staticmethod
    def _resize_frame(cols: int, rows: int) -> str:
        return json.dumps({"type": "resize", "cols": cols, "rows": rows})

    @staticmethod
    def _signal_frame(signal: str) -> str:
        return json.dumps({"type": "signal", "signal": signal})


class Shell(ShellBase):
    """A blocking shell session; open with :meth:`scaigrid.client.Client.shell`."""

    def __init__(
        self, base_url: str, headers: dict[str, str], bunker_id: str, params: dict[str, Any]
    ) -> None:
        super().__init__(bunker_id)
        self._base_url = base_url
        self._headers = headers
        self._params = params
        self._ws: ws_sync.ClientConnection | None = None
        self._connect(params)

    def _connect(self, params: dict[str, Any]) -> None:
        url = shell_url(self._base_url, self.bunker_id, params)
        try:
            self._ws = ws_sync.connect(
                url,
                additional_headers=self._headers,
                max_size=MAX_FRAME_BYTES,
                open_timeout=60,
                compression=None,
            )
        except (ws_errors.InvalidStatus, ws_errors.InvalidHandshake, OSError) as exc:
            raise _refusal(exc) from exc
        # The session object owns the connection's lifetime (closed by close()/abort()).
        if hasattr(self._ws, "pending_legacy_warning"):
            setattr(self._ws, "pending_legacy_warning", False)  # noqa: B010
        self.closed = False
        first = self._ws.recv(timeout=60)
        if isinstance(first, str):
            self._text(first)

    def reconnect(self, **params: Any) -> None:
        """Reattach to the session (after a dropped connection), asking for the output
        from :attr:`offset` on; ``cols``/``rows`` resize on the way.

        Raises:
            ShellSessionNotFound: the grace period is over.
        """
        self.abort()
        query = {"session": self.session_id, "offset": self.offset, **params}
        if self._params.get("ticket") and "ticket" not in params:
            raise ValueError("a ticket is one-use: pass a fresh ticket= to reconnect")
        self._connect(query)

    def send(self, data: bytes | str) -> None:
        """Write bytes (``str`` is UTF-8 encoded) to the terminal."""
        assert self._ws is not None
        self._ws.send(data.encode() if isinstance(data, str) else bytes(data))

    def resize(self, cols: int, rows: int) -> None:
        """Change the window size (1-1000 each)."""
        assert self._ws is not None
        self._ws.send(self._resize_frame(cols, rows))

    def signal(self, signal: str = "SIGINT") -> None:
        """Send a signal to the terminal's foreground process group."""
        assert self._ws is not None
        self._ws.send(self._signal_frame(signal))

    def recv(self, timeout_s: float | None = None) -> bytes | None:
        """The next output chunk, or None once the session ended and the server closed.

        Raises:
            TimeoutError: nothing arrived within ``timeout_s``.
            AgentUnavailable: the server closed the session abnormally (1011).
        """
        assert self._ws is not None
        while True:
            try:
                message = self._ws.recv(timeout=timeout_s)
            except ws_errors.ConnectionClosed as exc:
                self.closed = True
                error = _closed_error(exc)
                if error is not None:
                    raise error from exc
                return None
            if isinstance(message, bytes):
                self.offset += len(message)
                return message
            self._text(message)

    def __iter__(self) -> Any:
        while (chunk := self.recv()) is not None:
            yield chunk

    def read_until(self, needle: bytes, timeout_s: float = 30.0) -> bytes:
        """Read output until it contains ``needle``; return everything read.

        Raises:
            TimeoutError: not seen within ``timeout_s``; EOFError: the session ended first.
        """
        out = bytearray()
        deadline = time.monotonic() + timeout_s
        while needle not in out:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{needle!r} not seen; got {bytes(out[-200:])!r}")
            chunk = self.recv(left)
            if chunk is None:
                raise EOFError(f"the shell ended before {needle!r}; got {bytes(out[-200:])!r}")
            out += chunk
        return bytes(out)

    def wait(self, timeout_s: float | None = None) -> int | None:
        """Read (and discard) output until the session ends; return its exit code."""
        while self.recv(timeout_s) is not None:
            pass
        return self.exit_code

    def abort(self) -> None:
        """Drop the connection without ending the session (it waits for a reattach)."""
        if self._ws is not None:
            self._ws.close()
        self.closed = True

    close = abort

    def __enter__(self) -> Shell:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncShell(ShellBase):
    """An asyncio shell session; open with ``await client.shell(...)`` on
    :class:`scaigrid.client.AsyncClient`. Methods mirror :class:`Shell`."""

    def __init__(
        self, base_url: str, headers: dict[str, str], bunker_id: str, params: dict[str, Any]
    ) -> None:
        super().__init__(bunker_id)
        self._base_url = base_url
        self._headers = headers
        self._params = params
        self._ws: ws_async.ClientConnection | None = None

    async def _connect(self, params: dict[str, Any]) -> AsyncShell:
        url = shell_url(self._base_url, self.bunker_id, params)
        try:
            self._ws = await ws_async.connect(
                url,
                additional_headers=self._headers,
                max_size=MAX_FRAME_BYTES,
                open_timeout=60,
                compression=None,
            )
        except (ws_errors.InvalidStatus, ws_errors.InvalidHandshake, OSError) as exc:
            raise _refusal(exc) from exc
        self.closed = False
        first = await self._ws.recv()
        if isinstance(first, str):
            self._text(first)
        return self

    async def reconnect(self, **params: Any) -> None:
        """See :meth:`Shell.reconnect`."""
        await self.abort()
        await self._connect({"session": self.session_id, "offset": self.offset, **params})

    async def send(self, data: bytes | str) -> None:
        """See :meth:`Shell.send`."""
        assert self._ws is not None
        await self._ws.send(data.encode() if isinstance(data, str) else bytes(data))

    async def resize(self, cols: int, rows: int) -> None:
        """See :meth:`Shell.resize`."""
        assert self._ws is not None
        await self._ws.send(self._resize_frame(cols, rows))

    async def signal(self, signal: str = "SIGINT") -> None:
        """See :meth:`Shell.signal`."""
        assert self._ws is not None
        await self._ws.send(self._signal_frame(signal))

    async def recv(self) -> bytes | None:
        """See :meth:`Shell.recv` (use ``asyncio.timeout`` for a deadline)."""
        assert self._ws is not None
        while True:
            try:
                message = await self._ws.recv()
            except ws_errors.ConnectionClosed as exc:
                self.closed = True
                error = _closed_error(exc)
                if error is not None:
                    raise error from exc
                return None
            if isinstance(message, bytes):
                self.offset += len(message)
                return message
            self._text(message)

    def __aiter__(self) -> Any:
        return self._iterate()

    async def _iterate(self) -> Any:
        while (chunk := await self.recv()) is not None:
            yield chunk

    async def read_until(self, needle: bytes) -> bytes:
        """See :meth:`Shell.read_until` (use ``asyncio.timeout`` for a deadline)."""
        out = bytearray()
        while needle not in out:
            chunk = await self.recv()
            if chunk is None:
                raise EOFError(f"the shell ended before {needle!r}")
            out += chunk
        return bytes(out)

    async def wait(self) -> int | None:
        """See :meth:`Shell.wait`."""
        while await self.recv() is not None:
            pass
        return self.exit_code

    async def abort(self) -> None:
        """See :meth:`Shell.abort`."""
        if self._ws is not None:
            await self._ws.close()
        self.closed = True

    close = abort

    async def __aenter__(self) -> AsyncShell:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def shell_params(
    *,
    cols: int | None,
    rows: int | None,
    command: str | None,
    user: str,
    session: str | None,
    offset: int | None,
    ticket: str | None,
) -> dict[str, Any]:
    """The upgrade's query parameters (SPEC §5.1)."""
    return {
        "cols": cols,
        "rows": rows,
        "command": command,
        "user": user if user != "user" else None,
        "session": session,
        "offset": offset,
        "ticket": ticket,
    }


def ticket_call(bunker_id: str) -> Call:
    """``POST /bunkers/{id}/shell/ticket``."""
    return Call("POST", f"/bunkers/{bunker_id}/shell/ticket")


def auth_headers(client_headers: Any, ticket: str | None) -> dict[str, str]:
    """Headers of the upgrade: the client's bearer credential unless a ticket is used."""
    headers = {"User-Agent": str(client_headers.get("User-Agent", "scaigrid-client"))}
    authorization = client_headers.get("Authorization")
    if authorization and ticket is None:
        headers["Authorization"] = str(authorization)
    return headers

"""The agent channel over one virtio-serial port (microVMs), both ends.

A virtio-serial port is a single byte stream with no connection boundaries: when the host
side (the worker, through the VMM's unix socket) disconnects and a new host-side client
connects before the agent has read EOF, the agent's old HTTP/2 session would read the new
client's bytes, and the new client would read what the old session still writes. Every
connection therefore starts with a resynchronising handshake:

1. The host sends ``SCAIBUNKER-HELLO <nonce>\\n`` (nonce: 32 hex digits) every
   :data:`HELLO_EVERY_S` until it reads ``SCAIBUNKER-READY <nonce>\\n``; everything before
   that line is stale and dropped. Only then does it send the HTTP/2 preface.
2. The agent (a stale session sees the hello as a protocol error and ends) waits for a
   hello line, dropping anything else, answers ``SCAIBUNKER-READY <nonce>\\n`` and then
   drops bytes (repeated hellos) up to the HTTP/2 client preface, which starts the session.

Lines and the skipped prefix are bounded (:data:`MAX_SKIP_BYTES`) so a hostile peer
cannot make either side buffer without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable

_log = logging.getLogger("scaigrid.agent")

HELLO = b"SCAIBUNKER-HELLO "
READY = b"SCAIBUNKER-READY "
#: The HTTP/2 client connection preface (RFC 9113 §3.4).
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HELLO_EVERY_S = 0.2
#: Bytes one side drops while looking for the other side's marker before giving up on
#: the attempt (the host) or starting over (the agent).
MAX_SKIP_BYTES = 16 << 20
_NONCE = re.compile(rb"[0-9a-f]{32}")
VIRTIO_PORTS = "/sys/class/virtio-ports"
#: Seconds between looks for the port, and between reopens while no host is connected.
SERIAL_RETRY_S = 0.05

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class HandshakeError(ConnectionError):
    """The other side did not complete the serial handshake."""


async def _skip_to(reader: asyncio.StreamReader, marker: bytes) -> bytes:
    """Read up to and including ``marker``; return what came before it.

    Raises:
        HandshakeError: more than :data:`MAX_SKIP_BYTES` came before it.
        asyncio.IncompleteReadError: EOF first.
    """
    skipped = 0
    kept = b""
    while True:
        try:
            data = await reader.readuntil(marker)
        except asyncio.LimitOverrunError as exc:
            chunk = await reader.readexactly(exc.consumed)
            skipped += len(chunk)
            kept = chunk[-256:]
            if skipped > MAX_SKIP_BYTES:
                raise HandshakeError(f"no {marker!r} within {MAX_SKIP_BYTES} bytes") from exc
            continue
        return kept + data[: -len(marker)]


async def host_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout_s: float
) -> None:
    """Resynchronise a new host-side connection (step 1 of the module docstring).

    Raises:
        HandshakeError: no matching ready line within ``timeout_s`` or before EOF.
    """
    nonce = secrets.token_hex(16).encode()
    hello = HELLO + nonce + b"\n"

    async def repeat() -> None:
        while True:
            writer.write(hello)
            await writer.drain()
            await asyncio.sleep(HELLO_EVERY_S)

    sender = asyncio.ensure_future(repeat())
    try:
        async with asyncio.timeout(timeout_s):
            await _skip_to(reader, READY + nonce + b"\n")
    except TimeoutError as exc:
        raise HandshakeError(f"the agent did not answer the hello within {timeout_s} s") from exc
    except (asyncio.IncompleteReadError, OSError) as exc:
        raise HandshakeError(f"the agent port closed during the hello: {exc}") from exc
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError, ConnectionError):
            await sender


async def agent_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[asyncio.StreamReader, asyncio.Task[None]]:
    """Wait for a hello, answer it and return a reader positioned at the HTTP/2 preface
    (step 2 of the module docstring) and the task that copies the rest of ``reader`` into
    it (cancel it when the session ends).

    Raises:
        asyncio.IncompleteReadError: EOF (the host side went away).
        HandshakeError: too much junk before the preface.
    """
    while True:
        line = await _skip_to(reader, b"\n")
        at = line.rfind(HELLO)
        if at < 0:
            continue
        nonce = line[at + len(HELLO) :]
        if _NONCE.fullmatch(nonce):
            break
    writer.write(READY + nonce + b"\n")
    await writer.drain()
    await _skip_to(reader, H2_PREFACE)
    session = asyncio.StreamReader(limit=1 << 20)
    session.feed_data(H2_PREFACE)

    async def pump() -> None:
        try:
            while data := await reader.read(1 << 16):
                session.feed_data(data)
        except (OSError, ConnectionError) as exc:
            session.set_exception(exc)
            return
        session.feed_eof()

    return session, asyncio.get_running_loop().create_task(pump())


def find_virtio_port(name: str, sysfs: str = VIRTIO_PORTS) -> str | None:
    """``/dev/vportNpM`` of the virtio-serial port called ``name``, or ``None`` if absent."""
    try:
        entries = sorted(os.listdir(sysfs))
    except OSError:
        return None
    for entry in entries:
        try:
            with open(os.path.join(sysfs, entry, "name")) as fh:
                if fh.read().strip() == name:
                    return f"/dev/{entry}"
        except OSError:
            continue
    return None


async def open_char_stream(
    path: str,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.BaseTransport]:
    """asyncio streams over a character device opened read-write (two fds, one per side).

    Returns ``(reader, writer, read_transport)``; close both the writer and the read
    transport to release the device.

    Raises:
        OSError: the device cannot be opened.
    """
    loop = asyncio.get_running_loop()
    read_fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        write_fd = os.dup(read_fd)
    except OSError:
        os.close(read_fd)
        raise
    reader = asyncio.StreamReader(limit=1 << 20)
    read_protocol = asyncio.StreamReaderProtocol(reader)
    read_transport, _ = await loop.connect_read_pipe(
        lambda: read_protocol, os.fdopen(read_fd, "rb", buffering=0)
    )
    write_transport, write_protocol = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()),
        os.fdopen(write_fd, "wb", buffering=0),
    )
    writer = asyncio.StreamWriter(write_transport, write_protocol, reader, loop)
    return reader, writer, read_transport


async def serve_serial(name: str, serve: Serve) -> None:
    """Serve host-side connections on the virtio-serial port ``name``, one after another,
    forever: open the port, :func:`agent_handshake`, serve one session, close the port.
    """
    announced = False
    while True:
        path = find_virtio_port(name)
        if path is None:
            if not announced:
                _log.warning("agent.serial_port_missing name=%s", name)
                announced = True
            await asyncio.sleep(SERIAL_RETRY_S)
            continue
        try:
            reader, writer, read_transport = await open_char_stream(path)
        except OSError as exc:
            _log.warning("agent.serial_open_failed path=%s error=%s", path, exc)
            await asyncio.sleep(SERIAL_RETRY_S)
            continue
        try:
            await _serve_session(reader, writer, serve)
        finally:
            writer.close()
            read_transport.close()
        await asyncio.sleep(SERIAL_RETRY_S)


async def _serve_session(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, serve: Serve
) -> None:
    """Handshake and serve one session on an open port (returns at once on EOF)."""
    try:
        session, pump = await agent_handshake(reader, writer)
    except asyncio.IncompleteReadError:
        return
    except (HandshakeError, OSError) as exc:
        _log.info("agent.serial_handshake_failed error=%s", exc)
        return
    started = time.monotonic()
    _log.info("agent.peer_connected serial=1")
    try:
        await serve(session, writer)
    except (OSError, ConnectionError) as exc:
        _log.info("agent.serial_connection_broken error=%s", exc)
    finally:
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
    _log.info("agent.peer_disconnected serial=1 seconds=%.1f", time.monotonic() - started)

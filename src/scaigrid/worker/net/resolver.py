"""The per-bunker DNS resolver (SPEC §8.3, §8.4).

It listens on the bunker's gateway address (UDP port 53, inside the router namespace) and:

* answers ``REFUSED`` to every name its :class:`~scaigrid.worker.net.policy.NamePolicy` does not
  allow, without sending anything upstream;
* for an allowed name asks the upstream resolvers for its ``A`` records (a fresh query with a
  new id, so nothing else of the bunker's packet leaves), follows the CNAME chain in the answer,
  hands the addresses to ``on_answer`` (which opens them in the bunker's nftables allow set)
  and only then replies;
* answers other query types of allowed names with an empty ``NOERROR`` (bunkers are IPv4-only,
  so no AAAA records);
* drops packets that are not one DNS query with one question;
* serves UDP only and keeps replies within 512 bytes by leaving out surplus answers.

Packet parsing and building use ``dnslib``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import cast

import structlog
from dnslib import CNAME, QTYPE, RCODE, DNSError, DNSRecord

from scaigrid.worker.net.policy import NamePolicy

log = structlog.get_logger(__name__)

#: Seconds one upstream resolver may take to answer.
UPSTREAM_TIMEOUT_S = 2.0
#: Minimum time an answered address stays allowed (SPEC §8.4).
MIN_ALLOW_TTL_S = 60
#: Queries one resolver handles at once; more are dropped (the client retries).
MAX_IN_FLIGHT = 64
_MAX_UDP = 4096
#: Largest reply sent (RFC 1035 §4.2.1 without EDNS); answers beyond it are left out rather
#: than setting TC, as the resolver serves no TCP.
MAX_UDP_REPLY = 512

SocketFactory = Callable[[], Awaitable[socket.socket]]
AnswerSink = Callable[[list[str], int], Awaitable[None]]


@dataclass(frozen=True)
class QueryRecord:
    """One DNS query a bunker made.

    Attributes:
        name: queried name, lower case without the trailing dot.
        qtype: query type (``"A"``, ``"AAAA"``, ...).
        verdict: ``"allow"`` or ``"deny"`` (refused by policy).
        addresses: IPv4 addresses answered (empty for refusals and failures).
        rcode: DNS response code sent (``"NOERROR"``, ``"REFUSED"``, ``"SERVFAIL"``, ...).
        src: ``(ip, port)`` of the querying bunker socket.
    """

    name: str
    qtype: str
    verdict: str
    addresses: tuple[str, ...]
    rcode: str
    src: tuple[str, int]


QuerySink = Callable[[QueryRecord], None]


def parse_upstream(spec: str) -> tuple[str, int]:
    """``"ip"`` or ``"ip:port"`` → ``(ip, port)``; the port defaults to 53.

    Raises:
        ValueError: not an IPv4 address with an optional port.
    """
    host, _, port = spec.partition(":")
    socket.inet_aton(host)
    number = int(port) if port else 53
    if not 1 <= number <= 65535:
        raise ValueError(f"bad port in upstream resolver {spec!r}")
    return host, number


class BunkerResolver(asyncio.DatagramProtocol):
    """Serves one bunker's DNS.

    Args:
        policy: names the bunker may resolve.
        upstreams: ``(ip, port)`` resolvers asked in order until one answers.
        new_socket: coroutine returning a fresh unbound UDP socket in the namespace that can
            reach the upstreams.
        on_answer: coroutine ``(addresses, ttl_s)`` opening answered addresses for the bunker.
        on_query: called with a :class:`QueryRecord` for every query answered.
    """

    def __init__(
        self,
        *,
        policy: NamePolicy,
        upstreams: Sequence[tuple[str, int]],
        new_socket: SocketFactory,
        on_answer: AnswerSink,
        on_query: QuerySink,
    ) -> None:
        self.policy = policy
        self.upstreams = list(upstreams)
        self._new_socket = new_socket
        self._on_answer = on_answer
        self._on_query = on_query
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self, sock: socket.socket) -> None:
        """Start answering on the bound UDP socket ``sock``."""
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, sock=sock)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if len(self._tasks) >= MAX_IN_FLIGHT:
            return
        src = (str(addr[0]), int(addr[1]))
        task = asyncio.ensure_future(self._handle(data, src))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop answering and cancel queries in flight."""
        if self._transport is not None:
            self._transport.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, data: bytes, src: tuple[str, int]) -> None:
        try:
            request = DNSRecord.parse(data)
        except (DNSError, ValueError, IndexError):
            return
        if request.header.qr or request.header.opcode != 0 or len(request.questions) != 1:
            return
        question = request.questions[0]
        name = str(question.qname).lower().rstrip(".")
        qtype = QTYPE.get(question.qtype, str(question.qtype))
        reply = request.reply()
        reply.questions = [question]
        addresses: tuple[str, ...] = ()
        if not self.policy.allows(name):
            verdict, rcode = "deny", RCODE.REFUSED
        elif question.qtype != QTYPE.A:
            verdict, rcode = "allow", RCODE.NOERROR
        else:
            verdict = "allow"
            rcode, addresses = await self._resolve(question.qname, reply)
        reply.header.rcode = rcode
        self._on_query(
            QueryRecord(name, str(qtype), verdict, addresses, str(RCODE.get(rcode)), src)
        )
        packed = reply.pack()
        while len(packed) > MAX_UDP_REPLY and reply.rr:
            reply.rr.pop()
            packed = reply.pack()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(packed, src)

    async def _resolve(self, qname: object, reply: DNSRecord) -> tuple[int, tuple[str, ...]]:
        query = DNSRecord.question(str(qname), "A")
        for host, port in self.upstreams:
            answer = await self._ask(query, host, port)
            if answer is None:
                continue
            if answer.header.rcode != RCODE.NOERROR:
                return int(answer.header.rcode), ()
            chain = {str(qname).lower()}
            records = list(answer.rr)
            grew = True
            while grew:
                grew = False
                for rr in records:
                    if rr.rtype == QTYPE.CNAME and str(rr.rname).lower() in chain:
                        target = str(rr.rdata.label).lower() if isinstance(rr.rdata, CNAME) else ""
                        if target and target not in chain:
                            chain.add(target)
                            grew = True
            kept = [
                rr
                for rr in records
                if str(rr.rname).lower() in chain and rr.rtype in (QTYPE.A, QTYPE.CNAME)
            ]
            addresses = tuple(str(rr.rdata) for rr in kept if rr.rtype == QTYPE.A)
            if addresses:
                ttl = max(MIN_ALLOW_TTL_S, max(rr.ttl for rr in kept if rr.rtype == QTYPE.A))
                try:
                    await self._on_answer(list(addresses), ttl)
                except Exception as exc:
                    log.error("dns_allow_failed", name=str(qname), error=str(exc))
                    return RCODE.SERVFAIL, ()
            for rr in kept:
                reply.add_answer(rr)
            return RCODE.NOERROR, addresses
        return RCODE.SERVFAIL, ()

    async def _ask(self, query: DNSRecord, host: str, port: int) -> DNSRecord | None:
        loop = asyncio.get_running_loop()
        sock = await self._new_socket()
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, (host, port))
            await loop.sock_sendall(sock, query.pack())
            deadline = time.monotonic() + UPSTREAM_TIMEOUT_S
            while (left := deadline - time.monotonic()) > 0:
                try:
                    data = await asyncio.wait_for(loop.sock_recv(sock, _MAX_UDP), left)
                except (TimeoutError, OSError):
                    break
                with contextlib.suppress(DNSError, ValueError, IndexError):
                    answer = DNSRecord.parse(data)
                    if (
                        answer.header.id == query.header.id
                        and answer.header.qr
                        and len(answer.questions) == 1
                        and answer.questions[0].qname == query.questions[0].qname
                    ):
                        return answer
        except OSError as exc:
            log.warning("dns_upstream_failed", upstream=f"{host}:{port}", error=str(exc))
        finally:
            sock.close()
        return None

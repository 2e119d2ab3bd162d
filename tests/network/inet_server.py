"""The test "internet": HTTP on every address of its namespace, a TCP sink and a DNS server.

Run inside the test's internet namespace (``ip netns exec NS python inet_server.py ...``).
The TCP sink (port 9009) answers with the number of bytes it was sent. The DNS server answers
``A`` queries from a JSON zone file ``{name: [ip, ...]}`` re-read on every query (so tests can
change answers) and appends every queried name to the query log, one per line. Prints
``ready`` when the servers listen.
"""

from __future__ import annotations

import argparse
import json
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from dnslib import QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        size = int(self.path.strip("/") or "0") if self.path.strip("/").isdigit() else 0
        body = b"x" * size if size else f"hello from {self.connection.getsockname()[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


class Sink(socketserver.BaseRequestHandler):
    """Reads until EOF, then answers with the number of bytes read."""

    def handle(self) -> None:
        total = 0
        while chunk := self.request.recv(1 << 16):
            total += len(chunk)
        self.request.sendall(str(total).encode())


class ZoneResolver(BaseResolver):
    def __init__(self, zone: Path, log: Path) -> None:
        self.zone = zone
        self.log = log
        self.lock = threading.Lock()

    def resolve(self, request, handler):  # type: ignore[no-untyped-def]
        name = str(request.q.qname).lower().rstrip(".")
        with self.lock, self.log.open("a") as out:
            out.write(name + "\n")
        zone = json.loads(self.zone.read_text())
        reply = request.reply()
        if name not in zone:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        if request.q.qtype == QTYPE.A:
            for ip in zone[name]:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(ip), ttl=30))
        return reply


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--sink-port", type=int, default=9009)
    parser.add_argument("--dns", required=True)
    parser.add_argument("--zone", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True)
    args = parser.parse_args()
    httpd = ThreadingHTTPServer(("0.0.0.0", args.http_port), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    sink = socketserver.ThreadingTCPServer(("0.0.0.0", args.sink_port), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    dns = DNSServer(
        ZoneResolver(args.zone, args.log),
        address=args.dns,
        port=53,
        logger=DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data"),
    )
    dns.start_thread()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()

"""A stand-in for the ``firecracker`` binary (a boundary we cannot reach here: no binary,
no usable KVM): serves the API on ``--api-sock``, records every request as a JSON line in
``$FAKE_FC_LOG``, and on ``InstanceStart`` listens on the configured vsock unix socket
(answering ``CONNECT <port>`` with ``OK <n>`` and then echoing) and prints the agent's
ready line on stdout, as the guest console would.

``$FAKE_FC_FAIL`` = ``"METHOD /path"`` answers that call 400 with a ``fault_message``;
``$FAKE_FC_ROOT`` (set by ``fake_jailer.py``) maps absolute API paths into the jail root;
``$FAKE_FC_PANIC`` set prints a kernel panic and exits after ``InstanceStart``.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any

LOG = os.environ.get("FAKE_FC_LOG", "")
FAIL = os.environ.get("FAKE_FC_FAIL", "")
PANIC = bool(os.environ.get("FAKE_FC_PANIC"))
#: Set by the fake jailer: absolute API paths are inside this directory (the jail root).
ROOT = os.environ.get("FAKE_FC_ROOT", "")
STATE: dict[str, Any] = {}


def record(entry: dict[str, Any]) -> None:
    with open(LOG, "a") as fh:
        fh.write(json.dumps(entry) + "\n")


def host_path(path: str) -> str:
    return ROOT + path if ROOT and path.startswith("/") else path


def serve_vsock(path: str) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(host_path(path))
    server.listen(8)

    def handle(conn: socket.socket) -> None:
        with conn:
            line = b""
            while not line.endswith(b"\n"):
                chunk = conn.recv(1)
                if not chunk:
                    return
                line += chunk
            parts = line.split()
            if len(parts) != 2 or parts[0] != b"CONNECT" or parts[1] != b"1024":
                return
            conn.sendall(b"OK 1073741824\n")
            while data := conn.recv(65536):
                conn.sendall(data)

    while True:
        conn, _ = server.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"null")

    def _answer(self) -> None:
        body = self._body()
        record({"method": self.command, "path": self.path, "body": body})
        if f"{self.command} {self.path}" == FAIL:
            payload = json.dumps({"fault_message": "fake refusal of " + self.path}).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if self.path == "/vsock":
            STATE["vsock"] = body["uds_path"]
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()
        if self.path == "/actions" and body.get("action_type") == "InstanceStart":
            if PANIC:
                print("[    0.50] Kernel panic - not syncing: fake", flush=True)
                os._exit(0)
            threading.Thread(target=serve_vsock, args=(STATE["vsock"],), daemon=True).start()
            print("INFO scaigrid.agent agent.ready vsock=1024 pid=1", flush=True)

    do_PUT = _answer
    do_PATCH = _answer


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def main() -> None:
    args = sys.argv[1:]
    api = args[args.index("--api-sock") + 1]
    record({"argv": sys.argv[1:], "cwd": os.getcwd()})
    with Server(host_path(api), Handler) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()

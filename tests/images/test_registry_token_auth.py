"""OCI pull from a registry that wants bearer tokens (Docker Registry token authentication,
the scheme Docker Hub uses for anonymous pulls): the real ``docker-registry`` configured with
``auth: token``, and a token server on loopback that signs RS256 JWTs with a self-signed
certificate the registry trusts. Anonymous token requests get pull access to repositories
outside ``private/``; the credentials ``pusher:secret`` get push and pull everywhere.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from scaigrid.worker.rootfs import ImageBuildError, ImageCache
from tests.images.conftest import TOOLS, _free_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="exact ownership needs root")
SERVICE, ISSUER = "scaibunker-test-registry", "scaibunker-test-issuer"


class _TokenServer(BaseHTTPRequestHandler):
    key: rsa.RSAPrivateKey
    cert_der: bytes
    requests: list[dict[str, Any]]

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""

    def do_GET(self) -> None:
        """Issue a token for the requested scope: pull for anyone, push only with a secret."""
        query = parse_qs(urlparse(self.path).query)
        pusher = self.headers.get("Authorization") == "Basic cHVzaGVyOnNlY3JldA=="
        access = []
        for scope in query.get("scope", []):
            kind, name, actions = scope.split(":", 2)
            wanted = actions.split(",")
            public = not name.startswith("private/")
            granted = [a for a in wanted if pusher or (a == "pull" and public)]
            access.append({"type": kind, "name": name, "actions": granted})
        self.requests.append({"scope": query.get("scope", []), "pusher": pusher})
        now = datetime.datetime.now(datetime.UTC)
        claims = {
            "iss": ISSUER,
            "sub": "pusher" if pusher else "",
            "aud": query.get("service", [""])[0],
            "iat": now,
            "nbf": now - datetime.timedelta(seconds=30),
            "exp": now + datetime.timedelta(minutes=5),
            "jti": secrets.token_hex(8),
            "access": access,
        }
        token = jwt.encode(
            claims,
            self.key,
            algorithm="RS256",
            headers={"x5c": [base64.b64encode(self.cert_der).decode()]},
        )
        body = json.dumps({"token": token}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def token_registry() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    root = Path(tempfile.mkdtemp(prefix="sbt-tokenreg-", dir="/var/tmp"))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token-issuer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (root / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    requests: list[dict[str, Any]] = []
    handler = type(
        "Handler",
        (_TokenServer,),
        {
            "key": key,
            "cert_der": cert.public_bytes(serialization.Encoding.DER),
            "requests": requests,
        },
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host = f"127.0.0.1:{_free_port()}"
    (root / "config.yml").write_text(
        "version: 0.1\nlog:\n  level: error\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'storage'}\n"
        f"http:\n  addr: {host}\n"
        "auth:\n  token:\n"
        f"    realm: http://127.0.0.1:{server.server_address[1]}/token\n"
        f"    service: {SERVICE}\n    issuer: {ISSUER}\n"
        f"    rootcertbundle: {root / 'cert.pem'}\n"
    )
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(root / "config.yml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while True:
        try:
            if httpx.get(f"http://{host}/v2/", timeout=1).status_code == 401:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("docker-registry did not start")
        time.sleep(0.05)
    try:
        yield host, requests
    finally:
        proc.terminate()
        proc.wait(10)
        server.shutdown()
        server.server_close()
        shutil.rmtree(root, ignore_errors=True)


def _push(host: str, work: Path, repo: str = "auth/app") -> str:
    with tarfile.open(work / "layer.tar", "w") as tar:
        tar.add(shutil.which("busybox") or "/bin/busybox", arcname="bin/busybox")
    layout = work / "layout"
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:t"], check=True)
    subprocess.run(
        ["umoci", "raw", "add-layer", "--image", f"{layout}:t", str(work / "layer.tar")],
        check=True,
    )
    ref = f"{host}/{repo}:v1"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--dest-creds",
            "pusher:secret",
            f"oci:{layout}:t",
            f"docker://{ref}",
        ],
        check=True,
    )
    return ref


async def test_pull_through_token_auth(
    token_registry: tuple[str, list[dict[str, Any]]], work: Path
) -> None:
    host, requests = token_registry
    anonymous = httpx.get(f"http://{host}/v2/auth/app/manifests/v1")
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Bearer realm=")
    ref = _push(host, work)
    requests.clear()
    cache = ImageCache(work / "cache", insecure_registries=frozenset({host}))
    tree = await cache.ensure("img_token", {"kind": "oci", "ref": ref})
    assert (tree / "bin" / "busybox").is_file()
    assert cache.metadata("img_token")["source_digest"].startswith("sha256:")
    assert requests and all(not r["pusher"] for r in requests)
    assert any("repository:auth/app:pull" in r["scope"] for r in requests)


async def test_missing_repository_behind_token_auth_fails(
    token_registry: tuple[str, list[dict[str, Any]]], work: Path
) -> None:
    host, _ = token_registry
    cache = ImageCache(work / "cache", insecure_registries=frozenset({host}))
    with pytest.raises(ImageBuildError, match="manifest unknown"):
        await cache.ensure("img_nope", {"kind": "oci", "ref": f"{host}/auth/none:v1"})


async def test_private_repository_needs_the_operator_auth_file(
    token_registry: tuple[str, list[dict[str, Any]]], work: Path
) -> None:
    host, requests = token_registry
    ref = _push(host, work, "private/app")
    anonymous = ImageCache(work / "anon", insecure_registries=frozenset({host}))
    with pytest.raises(ImageBuildError, match=r"(?i)unauthorized|denied|authentication required"):
        await anonymous.ensure("img_private", {"kind": "oci", "ref": ref})
    auth_file = work / "auth.json"
    auth_file.write_text(
        json.dumps({"auths": {host: {"auth": base64.b64encode(b"pusher:secret").decode()}}})
    )
    auth_file.chmod(0o600)
    requests.clear()
    cache = ImageCache(
        work / "cache", insecure_registries=frozenset({host}), registry_auth_file=auth_file
    )
    tree = await cache.ensure("img_private", {"kind": "oci", "ref": ref})
    assert (tree / "bin" / "busybox").is_file()
    assert requests and all(r["pusher"] for r in requests)

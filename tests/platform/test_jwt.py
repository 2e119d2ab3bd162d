"""RS256 JWTs (SPEC §1.2) from a configured issuer, by PEM key and by a JWKS served on
127.0.0.1: valid tokens act as their ``sub`` user; expired → SESSION_EXPIRED; wrong key,
issuer, audience, algorithm or subject → AUTH_TOKEN_INVALID."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI

from scaigrid.platform.app import create_app
from scaigrid.platform.tenancy import service as tenancy
from scaigrid.settings import Settings

ISSUER = "https://scaikey.test"
AUDIENCE = "scaigrid"


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


SIGNER = _key()
STRANGER = _key()


def _token(sub: str, key: rsa.RSAPrivateKey = SIGNER, kid: str = "k1", **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 3600, **claims}
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid})


@pytest.fixture
def jwks_url() -> Iterator[str]:
    """A JWKS holding SIGNER's public key as ``k1``, served on 127.0.0.1."""
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(SIGNER.public_key()))
    body = json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    finally:
        server.shutdown()
        thread.join(5)


@pytest.fixture(params=["pem", "jwks"])
async def jwt_app(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    migrated_sqlite_template: Path,
    settings_for: Callable[..., Settings],
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    shutil.copy2(migrated_sqlite_template, tmp_path / "scaigrid.db")
    source = (
        {"jwt_public_key": _pem(SIGNER)}
        if request.param == "pem"
        else {"jwt_jwks_url": request.getfixturevalue("jwks_url")}
    )
    app = create_app(settings_for(tmp_path, jwt_issuer=ISSUER, jwt_audience=AUDIENCE, **source))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield app, client


def _code(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return str(response.json()["error"]["code"])


async def test_jwt_acts_as_its_subject_and_bad_tokens_are_refused(
    jwt_app: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = jwt_app

    async with app.state.db.sessionmaker() as session:
        partner = await tenancy.default_partner(session)
        tenant = await tenancy.create_tenant(session, partner.id, "jwt", "jwt")
        user = await tenancy.create_user(session, tenant.id, "j@jwt.test", "tenant_admin")
        await session.commit()

    good = await client.get(
        f"/v1/users/{user.id}", headers={"Authorization": f"Bearer {_token(user.id)}"}
    )
    assert good.status_code == 200, good.text
    assert good.json()["data"]["id"] == user.id
    assert "scaibunker:admin:tenant" in good.json()["data"]["permissions"]

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    expired = _token(user.id, exp=int(time.time()) - 120)
    assert _code(await client.get("/v1/modules", headers=bearer(expired)), 401) == "SESSION_EXPIRED"
    bad_tokens = [
        _token(user.id, key=STRANGER),  # wrong signature
        _token(user.id, aud="someone-else"),
        _token(user.id, iss="https://evil.test"),
        _token("usr_01JDZ4Q7S8Y6V3N2K5M9T0R1WX"),  # no such user
        jwt.encode(
            {"iss": ISSUER, "aud": AUDIENCE, "sub": user.id, "exp": int(time.time()) + 60},
            "x" * 32,
            algorithm="HS256",
            headers={"kid": "k1"},
        ),  # algorithm switch
        _token(user.id)[:-4] + "AAAA",  # tampered signature
    ]
    for token in bad_tokens:
        response = await client.get("/v1/modules", headers=bearer(token))
        assert _code(response, 401) == "AUTH_TOKEN_INVALID", token

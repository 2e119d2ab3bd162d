"""Capability tokens (SPEC §11.3): signing, expiry with skew, scope, rotation, tampering."""

from __future__ import annotations

import base64
import json

import pytest

from scaigrid.errors import AuthzPermissionDenied, ValidationFailed
from scaigrid.modules.scaibunker.storage.capabilities import mint, validate_key, verify

SECRET = b"k" * 32
OLD = b"o" * 32
KEY = "scaibunker/snapshots/tnt_1/snp_1.tar.zst"


def test_round_trip_exact_key() -> None:
    token, exp = mint(SECRET, ["PUT"], key=KEY, ttl_s=60, now=1000)
    assert exp == 1060
    cap = verify(token, [SECRET], "PUT", KEY, now=1010)
    assert cap.key == KEY and cap.methods == {"PUT"}


def test_payload_matches_spec_format() -> None:
    token, _ = mint(SECRET, ["GET"], prefix="scaibunker/images/img_1/", ttl_s=60, now=1000)
    payload, _sig = token.split(".")
    assert "=" not in token
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert body == {"v": 1, "m": ["GET"], "p": "scaibunker/images/img_1/", "exp": 1060, "iat": 1000}


def test_expiry_allows_30s_skew_then_refuses() -> None:
    token, _ = mint(SECRET, ["GET"], key=KEY, ttl_s=60, now=1000)
    verify(token, [SECRET], "GET", KEY, now=1089)
    with pytest.raises(AuthzPermissionDenied, match="expired"):
        verify(token, [SECRET], "GET", KEY, now=1091)


@pytest.mark.parametrize(
    ("method", "key"),
    [
        ("PUT", KEY),
        ("DELETE", KEY),
        ("GET", KEY + "x"),
        ("GET", "scaibunker/snapshots/tnt_2/snp_1.tar.zst"),
    ],
)
def test_wrong_scope_is_refused(method: str, key: str) -> None:
    token, _ = mint(SECRET, ["GET"], key=KEY, ttl_s=60)
    with pytest.raises(AuthzPermissionDenied, match="does not cover"):
        verify(token, [SECRET], method, key)


def test_get_allows_head_and_prefix_scopes_below_it() -> None:
    token, _ = mint(SECRET, ["GET"], prefix="scaibunker/snapshots/tnt_1/", ttl_s=60)
    verify(token, [SECRET], "HEAD", KEY)
    with pytest.raises(AuthzPermissionDenied):
        verify(token, [SECRET], "GET", "scaibunker/snapshots/tnt_10/snp_1.tar.zst")


def test_tampered_payload_or_signature_is_refused() -> None:
    token, _ = mint(SECRET, ["GET"], key=KEY, ttl_s=60)
    payload, sig = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["m"] = ["GET", "PUT", "DELETE"]
    forged = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    for bad in (f"{forged}.{sig}", f"{payload}.{sig[:-2]}AA", "garbage", f"{payload}.{sig}.x"):
        with pytest.raises(AuthzPermissionDenied):
            verify(bad, [SECRET], "GET", KEY)
    with pytest.raises(AuthzPermissionDenied, match="signature"):
        verify(token, [b"x" * 32], "GET", KEY)


def test_previous_secret_accepted_during_rotation() -> None:
    token, _ = mint(OLD, ["GET"], key=KEY, ttl_s=60)
    verify(token, [SECRET, OLD], "GET", KEY)
    with pytest.raises(AuthzPermissionDenied):
        verify(token, [SECRET], "GET", KEY)


def test_mint_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        mint(b"short", ["GET"], key=KEY)
    with pytest.raises(ValueError, match="exactly one"):
        mint(SECRET, ["GET"], key=KEY, prefix="scaibunker/")
    with pytest.raises(ValueError, match="ttl_s"):
        mint(SECRET, ["GET"], key=KEY, ttl_s=3601)
    with pytest.raises(ValueError, match="methods"):
        mint(SECRET, ["POST"], key=KEY)


@pytest.mark.parametrize(
    "key",
    [
        "other/x",
        "scaibunker/../etc/passwd",
        "scaibunker//x",
        "scaibunker/a b",
        "scaibunker/./x",
        "/scaibunker/x",
        "scaibunker/" + "a" * 1100,
    ],
)
def test_unsafe_keys_are_rejected(key: str) -> None:
    with pytest.raises(ValidationFailed):
        validate_key(key)

"""Error envelopes become typed exceptions (SPEC §1.5)."""

from __future__ import annotations

import httpx

from scaigrid import errors as server_errors
from scaigrid.client import errors
from scaigrid.client.errors import error_for, from_response

SPEC_CODES = {
    "AUTH_TOKEN_MISSING": 401,
    "AUTH_TOKEN_INVALID": 401,
    "SESSION_EXPIRED": 401,
    "SERVICE_TOKEN_INVALID": 401,
    "AUTH_INSUFFICIENT_SCOPE": 403,
    "AUTHZ_PERMISSION_DENIED": 403,
    "MODULE_NOT_ENABLED": 403,
    "VALIDATION_ERROR": 422,
    "SLUG_CONFLICT": 409,
    "RATE_LIMITED": 429,
    "BUNKER_NOT_FOUND": 404,
    "BUNKER_NOT_RUNNING": 409,
    "BUNKER_QUOTA_EXCEEDED": 429,
    "NETWORK_PROFILE_DENIED": 403,
    "LIFECYCLE_MODE_DENIED": 403,
    "INTERFACES_NOT_ALLOWED": 422,
    "TRANSIT_MISSING_INTERFACES": 422,
    "WORKER_UNAVAILABLE": 503,
    "NO_SUITABLE_WORKER": 503,
    "AGENT_UNAVAILABLE": 502,
    "IMAGE_NOT_FOUND": 404,
    "IMAGE_NOT_READY": 409,
    "IMAGE_SCAN_BLOCKED": 403,
    "SNAPSHOT_NOT_FOUND": 404,
    "SNAPSHOT_NOT_READY": 409,
    "PROCESS_NOT_FOUND": 404,
    "PROCESS_NOT_RUNNING": 409,
    "STDIN_CLOSED": 409,
    "FILE_NOT_FOUND": 404,
    "FILE_CONFLICT": 409,
    "FILE_ACCESS_DENIED": 403,
    "BUNKER_DISK_FULL": 507,
    "SHELL_SESSION_NOT_FOUND": 404,
    "WORKER_NOT_FOUND": 404,
    "BRIDGE_NOT_FOUND": 404,
    "AVAILABILITY_GROUP_NOT_FOUND": 404,
    "QUOTA_PROFILE_NOT_FOUND": 404,
    "QUOTA_ASSIGNMENT_NOT_FOUND": 404,
    "OBJECT_NOT_FOUND": 404,
    "RESOURCE_IN_USE": 409,
}
"""The code table of SPEC §1.5 (platform and module codes) with their HTTP status."""


def _server_codes() -> dict[str, int]:
    codes: dict[str, int] = {}
    for value in vars(server_errors).values():
        if isinstance(value, type) and issubclass(value, server_errors.ScaiGridError):
            codes.setdefault(value.code, value.status_code)
    return codes


def _envelope(status: int, code: str, **extra: object) -> httpx.Response:
    error = {"code": code, "message": f"{code} happened", **extra}
    body = {"status": "error", "error": error, "meta": {"request_id": "req_abc"}}
    return httpx.Response(status, json=body)


FAMILY_BY_STATUS = {
    401: errors.AuthenticationError,
    403: errors.PermissionDeniedError,
    404: errors.NotFoundError,
    409: errors.ConflictError,
    422: errors.ValidationError,
    502: errors.UnavailableError,
    503: errors.UnavailableError,
    507: errors.InsufficientStorageError,
}


def test_every_spec_code_has_its_own_class_in_the_family_of_its_status() -> None:
    for code, status in SPEC_CODES.items():
        cls = error_for(code)
        assert cls.default_code == code, code
        if code == "RATE_LIMITED":
            assert issubclass(cls, errors.RateLimitError)
        elif code == "BUNKER_QUOTA_EXCEEDED":
            assert issubclass(cls, errors.QuotaExceededError)
        else:
            assert issubclass(cls, FAMILY_BY_STATUS[status]), (code, status)


def test_every_code_of_the_server_error_tree_is_known() -> None:
    for code, status in _server_codes().items():
        cls = error_for(code, status)
        assert cls.default_code == code, code


def test_bunker_not_found_keeps_code_message_status_and_request_id() -> None:
    exc = from_response(_envelope(404, "BUNKER_NOT_FOUND"))
    assert type(exc) is errors.BunkerNotFound
    assert isinstance(exc, errors.NotFoundError)
    assert (exc.code, exc.message, exc.status_code) == (
        "BUNKER_NOT_FOUND",
        "BUNKER_NOT_FOUND happened",
        404,
    )
    assert exc.request_id == "req_abc"
    assert str(exc) == "BUNKER_NOT_FOUND: BUNKER_NOT_FOUND happened (HTTP 404, request req_abc)"


def test_validation_details_and_retry_after_are_kept() -> None:
    details = [{"field": "network_allowlist[1]", "message": "wildcard must be the first label"}]
    exc = from_response(_envelope(422, "VALIDATION_ERROR", details=details))
    assert isinstance(exc, errors.ValidationFailed)
    assert exc.details == details
    limited = from_response(_envelope(429, "RATE_LIMITED", retry_after=30))
    assert isinstance(limited, errors.RateLimitError)
    assert limited.retry_after == 30


def test_retry_after_header_is_used_when_the_body_has_none() -> None:
    response = _envelope(429, "RATE_LIMITED")
    response.headers["Retry-After"] = "12"
    assert from_response(response).retry_after == 12


def test_unknown_code_falls_back_to_the_family_of_its_status() -> None:
    exc = from_response(_envelope(409, "SOMETHING_NEW"))
    assert type(exc) is errors.ConflictError
    assert exc.code == "SOMETHING_NEW"
    assert error_for("SOMETHING_NEW") is errors.ScaiGridAPIError
    assert error_for("SOMETHING_NEW", 500) is errors.InternalServerError


def test_a_body_that_is_not_an_envelope_still_gives_a_typed_error() -> None:
    response = httpx.Response(
        503, text="<html>upstream down</html>", headers={"X-Request-Id": "req_hdr"}
    )
    exc = from_response(response)
    assert type(exc) is errors.UnavailableError
    assert exc.code == "HTTP_503"
    assert "upstream down" in exc.message
    assert exc.request_id == "req_hdr"


def test_every_client_error_derives_from_the_client_root() -> None:
    for cls in (
        errors.APIConnectionError,
        errors.APITimeoutError,
        errors.ProtocolError,
        errors.ConfigurationError,
        errors.WaitTimeout,
        errors.BunkerStopped,
        errors.BunkerNotFound,
    ):
        assert issubclass(cls, errors.ScaiGridClientError)
    assert issubclass(errors.WaitTimeout, TimeoutError)

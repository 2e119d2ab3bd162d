"""The exception tree shared by the controller and the worker (SPEC §1.5).

Every error carries its SPEC ``code`` and HTTP status in one place; the controller's
error handler turns any :class:`ScaiGridError` into the error envelope
``{"status": "error", "error": {"code", "message", "details"?, "retry_after"?},
"meta": {"request_id"}}``. Workers send ``{"code", "message", "details"}`` in a
``task_result`` error and the controller re-raises it with :func:`from_code`.
"""

from __future__ import annotations

from typing import Any


class ScaiGridError(Exception):
    """Base of every error that reaches a caller as an envelope.

    Args:
        message: human-readable text (clients branch on ``code``, never on this).
        details: optional list of ``{"field", "message"}`` or other structured details.
        retry_after: seconds, only for rate limits and some timeouts.
    """

    code: str = "INTERNAL_ERROR"
    status_code: int = 500

    def __init__(
        self,
        message: str | None = None,
        *,
        details: list[dict[str, Any]] | dict[str, Any] | None = None,
        retry_after: int | None = None,
    ) -> None:
        self.message = message or self.code.replace("_", " ").capitalize()
        self.details = details
        self.retry_after = retry_after
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        """Return the ``error`` object of the envelope."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        return body


def _make(name: str, code: str, status: int, base: type[ScaiGridError]) -> type[ScaiGridError]:
    return type(
        name, (base,), {"code": code, "status_code": status, "__doc__": f"``{code}`` ({status})."}
    )


class NotFound(ScaiGridError):
    """Base of the ``*_NOT_FOUND`` errors (404)."""

    code = "NOT_FOUND"
    status_code = 404


class Unauthorized(ScaiGridError):
    """Base of the 401 errors."""

    code = "AUTH_TOKEN_INVALID"
    status_code = 401


class PermissionDenied(ScaiGridError):
    """Base of the 403 errors."""

    code = "AUTHZ_PERMISSION_DENIED"
    status_code = 403


class Conflict(ScaiGridError):
    """Base of the 409 errors."""

    code = "CONFLICT"
    status_code = 409


class Unavailable(ScaiGridError):
    """Base of the 502/503 errors."""

    code = "UNAVAILABLE"
    status_code = 503


class InternalError(ScaiGridError):
    """An unexpected fault; the message never leaks internals."""


AuthTokenMissing = _make("AuthTokenMissing", "AUTH_TOKEN_MISSING", 401, Unauthorized)
AuthTokenInvalid = _make("AuthTokenInvalid", "AUTH_TOKEN_INVALID", 401, Unauthorized)
SessionExpired = _make("SessionExpired", "SESSION_EXPIRED", 401, Unauthorized)
AuthzPermissionDenied = _make(
    "AuthzPermissionDenied", "AUTHZ_PERMISSION_DENIED", 403, PermissionDenied
)
ModuleNotEnabled = _make("ModuleNotEnabled", "MODULE_NOT_ENABLED", 403, PermissionDenied)
ValidationFailed = _make("ValidationFailed", "VALIDATION_ERROR", 422, ScaiGridError)
RangeNotSatisfiable = _make("RangeNotSatisfiable", "VALIDATION_ERROR", 416, ScaiGridError)
PayloadTooLarge = _make("PayloadTooLarge", "VALIDATION_ERROR", 413, ScaiGridError)
SlugConflict = _make("SlugConflict", "SLUG_CONFLICT", 409, Conflict)
RateLimited = _make("RateLimited", "RATE_LIMITED", 429, ScaiGridError)
BunkerNotFound = _make("BunkerNotFound", "BUNKER_NOT_FOUND", 404, NotFound)
BunkerNotRunning = _make("BunkerNotRunning", "BUNKER_NOT_RUNNING", 409, Conflict)
BunkerQuotaExceeded = _make("BunkerQuotaExceeded", "BUNKER_QUOTA_EXCEEDED", 429, ScaiGridError)
WorkerUnavailable = _make("WorkerUnavailable", "WORKER_UNAVAILABLE", 503, Unavailable)
NoSuitableWorker = _make("NoSuitableWorker", "NO_SUITABLE_WORKER", 503, Unavailable)
AgentUnavailable = _make("AgentUnavailable", "AGENT_UNAVAILABLE", 502, Unavailable)
ImageNotFound = _make("ImageNotFound", "IMAGE_NOT_FOUND", 404, NotFound)
ImageNotReady = _make("ImageNotReady", "IMAGE_NOT_READY", 409, Conflict)
ImageScanBlocked = _make("ImageScanBlocked", "IMAGE_SCAN_BLOCKED", 403, PermissionDenied)
AvailabilityGroupNotFound = _make(
    "AvailabilityGroupNotFound", "AVAILABILITY_GROUP_NOT_FOUND", 404, NotFound
)
ProcessNotFound = _make("ProcessNotFound", "PROCESS_NOT_FOUND", 404, NotFound)
ProcessNotRunning = _make("ProcessNotRunning", "PROCESS_NOT_RUNNING", 409, Conflict)
StdinClosed = _make("StdinClosed", "STDIN_CLOSED", 409, Conflict)
BunkerFileNotFound = _make("BunkerFileNotFound", "FILE_NOT_FOUND", 404, NotFound)
FileConflict = _make("FileConflict", "FILE_CONFLICT", 409, Conflict)
FileAccessDenied = _make("FileAccessDenied", "FILE_ACCESS_DENIED", 403, PermissionDenied)
BunkerDiskFull = _make("BunkerDiskFull", "BUNKER_DISK_FULL", 507, ScaiGridError)
WorkerNotFound = _make("WorkerNotFound", "WORKER_NOT_FOUND", 404, NotFound)
BridgeNotFound = _make("BridgeNotFound", "BRIDGE_NOT_FOUND", 404, NotFound)
NetworkProfileDenied = _make(
    "NetworkProfileDenied", "NETWORK_PROFILE_DENIED", 403, PermissionDenied
)
LifecycleModeDenied = _make("LifecycleModeDenied", "LIFECYCLE_MODE_DENIED", 403, PermissionDenied)
InterfacesNotAllowed = _make("InterfacesNotAllowed", "INTERFACES_NOT_ALLOWED", 422, ScaiGridError)
TransitMissingInterfaces = _make(
    "TransitMissingInterfaces", "TRANSIT_MISSING_INTERFACES", 422, ScaiGridError
)
ResourceInUse = _make("ResourceInUse", "RESOURCE_IN_USE", 409, Conflict)
ObjectNotFound = _make("ObjectNotFound", "OBJECT_NOT_FOUND", 404, NotFound)
ShellSessionNotFound = _make("ShellSessionNotFound", "SHELL_SESSION_NOT_FOUND", 404, NotFound)
#: The object store behind the storage proxy cannot be reached (retry later; issue #8).
ObjectStoreUnavailable = _make(
    "ObjectStoreUnavailable", "OBJECT_STORE_UNAVAILABLE", 503, Unavailable
)
#: A conditional upload (``If-None-Match: *``) found the key taken: the first writer won.
ObjectExists = _make("ObjectExists", "OBJECT_EXISTS", 412, ScaiGridError)

_BY_CODE: dict[str, type[ScaiGridError]] = {}
for _cls in list(globals().values()):
    if (
        isinstance(_cls, type)
        and issubclass(_cls, ScaiGridError)
        and _cls.code not in _BY_CODE
        and _cls.status_code not in (413, 416)
    ):
        _BY_CODE[_cls.code] = _cls


def from_code(
    code: str, message: str, details: list[dict[str, Any]] | dict[str, Any] | None = None
) -> ScaiGridError:
    """Rebuild a typed error from a ``{code, message, details}`` sent over a link.

    Unknown codes become :class:`InternalError` with the same message.
    """
    cls = _BY_CODE.get(code, InternalError)
    return cls(message, details=details)

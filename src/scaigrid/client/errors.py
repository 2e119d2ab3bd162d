"""Exceptions raised by the ScaiGrid client (SPEC §1.5).

Everything the client raises derives from :class:`ScaiGridClientError`, which carries a
stable ``code`` and a ``message``:

* :class:`ScaiGridAPIError` — the server answered with the error envelope
  ``{"status": "error", "error": {"code", "message", "details"?, "retry_after"?},
  "meta": {"request_id"}}``. Each SPEC code has its own class (``BUNKER_NOT_FOUND`` →
  :class:`BunkerNotFound`) below a family class chosen by HTTP status
  (:class:`NotFoundError`, :class:`ConflictError`, …); :func:`error_for` maps a code to its
  class. Branch on the class or on ``code``, never on ``message``.
* :class:`APIConnectionError` / :class:`APITimeoutError` — no answer was received.
* :class:`ProtocolError` — an answer arrived but is not a ScaiGrid envelope.
* :class:`WaitTimeout` / :class:`BunkerStopped` — a client-side wait gave up.
* :class:`ConfigurationError` — the client cannot be built (no host, bad URL).

This module mirrors the server's code table instead of importing it, so the client stays
installable on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import httpx

if TYPE_CHECKING:
    from scaigrid.client.models import Bunker


class ScaiGridClientError(Exception):
    """Root of every exception the client raises.

    Attributes:
        code: a stable upper-case code (a SPEC error code for API errors).
        message: human-readable text.
    """

    code: str = "CLIENT_ERROR"

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class ConfigurationError(ScaiGridClientError):
    """The client is misconfigured: no host given, or the host is not an http(s) URL."""

    code = "CONFIG_ERROR"


class APIConnectionError(ScaiGridClientError):
    """The request did not get an answer (connection refused, reset, DNS failure…)."""

    code = "CONNECTION_ERROR"


class APITimeoutError(APIConnectionError):
    """A connect, read, write or pool deadline passed before the server answered."""

    code = "TIMEOUT"


class ProtocolError(ScaiGridClientError):
    """The server's answer is not a ScaiGrid envelope (e.g. an HTML page from a proxy)."""

    code = "INVALID_RESPONSE"


class WaitTimeout(ScaiGridClientError, TimeoutError):
    """A client-side wait (``bunkers.wait_running``) ran out of time.

    Attributes:
        bunker: the bunker as last read.
    """

    code = "WAIT_TIMEOUT"

    def __init__(self, message: str, bunker: Bunker) -> None:
        super().__init__(message)
        self.bunker = bunker


class BunkerStopped(ScaiGridClientError):
    """A waited-for bunker reached ``stopping`` or a terminal state instead of ``running``.

    Attributes:
        bunker: the bunker as last read; ``status`` and ``status_reason`` say why.
    """

    code = "BUNKER_STOPPED"

    def __init__(self, message: str, bunker: Bunker) -> None:
        super().__init__(message)
        self.bunker = bunker


class ScaiGridAPIError(ScaiGridClientError):
    """The server answered with an error envelope.

    Args:
        code: the envelope's ``error.code``, e.g. ``"BUNKER_NOT_FOUND"``.
        message: the envelope's ``error.message``.
        status_code: the HTTP status, e.g. 404.
        details: ``error.details`` (validation errors: ``[{"field", "message"}]``), or None.
        request_id: ``meta.request_id`` (``req_...``) or the ``X-Request-Id`` header, or None.
        retry_after: seconds to wait before retrying (rate limits), or None.
    """

    default_code: ClassVar[str | None] = None
    """The SPEC code a per-code class stands for (None on family classes)."""

    def __init__(
        self,
        code: str,
        message: str,
        status_code: int,
        details: Any = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status_code = status_code
        self.details = details
        self.request_id = request_id
        self.retry_after = retry_after

    def __str__(self) -> str:
        suffix = f" (HTTP {self.status_code}, request {self.request_id})"
        if self.request_id is None:
            suffix = f" (HTTP {self.status_code})"
        return f"{self.code}: {self.message}{suffix}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, "
            f"status_code={self.status_code}, request_id={self.request_id!r})"
        )


class AuthenticationError(ScaiGridAPIError):
    """401: no, an unknown, an expired or a wrong-kind credential."""


class PermissionDeniedError(ScaiGridAPIError):
    """403: the caller lacks a permission, or the module is not enabled."""


class NotFoundError(ScaiGridAPIError):
    """404: unknown or invisible object (or an unknown route, code ``NOT_FOUND``)."""


class ConflictError(ScaiGridAPIError):
    """409: the object is in the wrong state, or a name or path is taken."""


class ValidationError(ScaiGridAPIError):
    """422 (also 413 and 416): the request is malformed; ``details`` names the fields."""


class RateLimitError(ScaiGridAPIError):
    """429 ``RATE_LIMITED``: wait ``retry_after`` seconds, then retry."""


class QuotaExceededError(ScaiGridAPIError):
    """429 ``BUNKER_QUOTA_EXCEEDED``: quota admission failed; do not auto-retry (SPEC §9.4)."""


class UnavailableError(ScaiGridAPIError):
    """502/503: no worker or agent can serve the call now; retry with backoff (SPEC §13.1)."""


class InsufficientStorageError(ScaiGridAPIError):
    """507: the bunker's writable disk is full."""


class InternalServerError(ScaiGridAPIError):
    """500 (or any other unexpected status): a server fault."""


class AuthTokenMissing(AuthenticationError):
    """``AUTH_TOKEN_MISSING`` (401): no credential."""

    default_code = "AUTH_TOKEN_MISSING"


class AuthTokenInvalid(AuthenticationError):
    """``AUTH_TOKEN_INVALID`` (401): unknown, revoked, malformed or wrong-kind credential; invalid
    or expired capability or ticket.
    """

    default_code = "AUTH_TOKEN_INVALID"


class SessionExpired(AuthenticationError):
    """``SESSION_EXPIRED`` (401): expired JWT."""

    default_code = "SESSION_EXPIRED"


class ServiceTokenInvalid(AuthenticationError):
    """``SERVICE_TOKEN_INVALID`` (401): invalid service-to-service token."""

    default_code = "SERVICE_TOKEN_INVALID"


class AuthInsufficientScope(PermissionDeniedError):
    """``AUTH_INSUFFICIENT_SCOPE`` (403): token scope does not cover the call."""

    default_code = "AUTH_INSUFFICIENT_SCOPE"


class AuthzPermissionDenied(PermissionDeniedError):
    """``AUTHZ_PERMISSION_DENIED`` (403): missing the endpoint's permission key."""

    default_code = "AUTHZ_PERMISSION_DENIED"


class ModuleNotEnabled(PermissionDeniedError):
    """``MODULE_NOT_ENABLED`` (403): module disabled for the caller's tenant or partner."""

    default_code = "MODULE_NOT_ENABLED"


class NetworkProfileDenied(PermissionDeniedError):
    """``NETWORK_PROFILE_DENIED`` (403): missing ``scaibunker:network:<profile>`` for the requested
    profile.
    """

    default_code = "NETWORK_PROFILE_DENIED"


class LifecycleModeDenied(PermissionDeniedError):
    """``LIFECYCLE_MODE_DENIED`` (403): missing ``scaibunker:create:session`` /
    ``scaibunker:create:persistent``.
    """

    default_code = "LIFECYCLE_MODE_DENIED"


class ImageScanBlocked(PermissionDeniedError):
    """``IMAGE_SCAN_BLOCKED`` (403): ``block_on_critical`` is on and the image has critical
    findings.
    """

    default_code = "IMAGE_SCAN_BLOCKED"


class FileAccessDenied(PermissionDeniedError):
    """``FILE_ACCESS_DENIED`` (403): the guest user lacks filesystem permission for the path."""

    default_code = "FILE_ACCESS_DENIED"


class ValidationFailed(ValidationError):
    """``VALIDATION_ERROR`` (422; also 413 and 416): malformed body, query or range."""

    default_code = "VALIDATION_ERROR"


class InterfacesNotAllowed(ValidationError):
    """``INTERFACES_NOT_ALLOWED`` (422): ``interfaces`` given with a profile but ``transit``."""

    default_code = "INTERFACES_NOT_ALLOWED"


class TransitMissingInterfaces(ValidationError):
    """``TRANSIT_MISSING_INTERFACES`` (422): ``transit`` without at least one interface."""

    default_code = "TRANSIT_MISSING_INTERFACES"


class SlugConflict(ConflictError):
    """``SLUG_CONFLICT`` (409): a name or target that must be unique is taken."""

    default_code = "SLUG_CONFLICT"


class BunkerNotRunning(ConflictError):
    """``BUNKER_NOT_RUNNING`` (409): operation needs a running (or, where stated, paused) bunker."""

    default_code = "BUNKER_NOT_RUNNING"


class ImageNotReady(ConflictError):
    """``IMAGE_NOT_READY`` (409): the resolved image is not ``ready``."""

    default_code = "IMAGE_NOT_READY"


class SnapshotNotReady(ConflictError):
    """``SNAPSHOT_NOT_READY`` (409): restore from a snapshot that is not ``ready``."""

    default_code = "SNAPSHOT_NOT_READY"


class ProcessNotRunning(ConflictError):
    """``PROCESS_NOT_RUNNING`` (409): signal or stdin sent to a process that has ended."""

    default_code = "PROCESS_NOT_RUNNING"


class StdinClosed(ConflictError):
    """``STDIN_CLOSED`` (409): stdin write to a process whose stdin is not open."""

    default_code = "STDIN_CLOSED"


class FileConflict(ConflictError):
    """``FILE_CONFLICT`` (409): target exists, directory not empty, or wrong file type for the
    operation.
    """

    default_code = "FILE_CONFLICT"


class ResourceInUse(ConflictError):
    """``RESOURCE_IN_USE`` (409): delete refused: bridge with attached bunkers, worker with
    bunkers, snapshot still uploading.
    """

    default_code = "RESOURCE_IN_USE"


class RateLimited(RateLimitError):
    """``RATE_LIMITED`` (429): platform rate limit (§1.6)."""

    default_code = "RATE_LIMITED"


class BunkerQuotaExceeded(QuotaExceededError):
    """``BUNKER_QUOTA_EXCEEDED`` (429): quota admission failed (§9.4). No ``Retry-After``; do not
    auto-retry.
    """

    default_code = "BUNKER_QUOTA_EXCEEDED"


class WorkerUnavailable(UnavailableError):
    """``WORKER_UNAVAILABLE`` (503): no eligible worker has the free CPU, memory, disk or GPU."""

    default_code = "WORKER_UNAVAILABLE"


class NoSuitableWorker(UnavailableError):
    """``NO_SUITABLE_WORKER`` (503): workers have capacity but none has the image ``ready`` and the
    image has ``lazy_pull: false``.
    """

    default_code = "NO_SUITABLE_WORKER"


class AgentUnavailable(UnavailableError):
    """``AGENT_UNAVAILABLE`` (502): the worker or guest agent for the bunker cannot be reached."""

    default_code = "AGENT_UNAVAILABLE"


class BunkerDiskFull(InsufficientStorageError):
    """``BUNKER_DISK_FULL`` (507): the bunker's writable disk has no room."""

    default_code = "BUNKER_DISK_FULL"


class RouteNotFound(NotFoundError):
    """``NOT_FOUND`` (404): no route for the method and path."""

    default_code = "NOT_FOUND"


class BunkerNotFound(NotFoundError):
    """``BUNKER_NOT_FOUND`` (404): unknown or invisible bunker."""

    default_code = "BUNKER_NOT_FOUND"


class ImageNotFound(NotFoundError):
    """``IMAGE_NOT_FOUND`` (404): unknown or invisible image."""

    default_code = "IMAGE_NOT_FOUND"


class SnapshotNotFound(NotFoundError):
    """``SNAPSHOT_NOT_FOUND`` (404): unknown or invisible snapshot."""

    default_code = "SNAPSHOT_NOT_FOUND"


class ProcessNotFound(NotFoundError):
    """``PROCESS_NOT_FOUND`` (404): unknown pid / exec id in this bunker."""

    default_code = "PROCESS_NOT_FOUND"


class BunkerFileNotFound(NotFoundError):
    """``FILE_NOT_FOUND`` (404): path does not exist in the bunker."""

    default_code = "FILE_NOT_FOUND"


class ShellSessionNotFound(NotFoundError):
    """``SHELL_SESSION_NOT_FOUND`` (404): reconnect to a shell session that no longer exists."""

    default_code = "SHELL_SESSION_NOT_FOUND"


class WorkerNotFound(NotFoundError):
    """``WORKER_NOT_FOUND`` (404): unknown or invisible worker."""

    default_code = "WORKER_NOT_FOUND"


class BridgeNotFound(NotFoundError):
    """``BRIDGE_NOT_FOUND`` (404): unknown or invisible bridge."""

    default_code = "BRIDGE_NOT_FOUND"


class AvailabilityGroupNotFound(NotFoundError):
    """``AVAILABILITY_GROUP_NOT_FOUND`` (404): unknown or invisible availability group."""

    default_code = "AVAILABILITY_GROUP_NOT_FOUND"


class QuotaProfileNotFound(NotFoundError):
    """``QUOTA_PROFILE_NOT_FOUND`` (404): unknown or invisible quota profile."""

    default_code = "QUOTA_PROFILE_NOT_FOUND"


class QuotaAssignmentNotFound(NotFoundError):
    """``QUOTA_ASSIGNMENT_NOT_FOUND`` (404): unknown or invisible quota assignment."""

    default_code = "QUOTA_ASSIGNMENT_NOT_FOUND"


class ObjectNotFound(NotFoundError):
    """``OBJECT_NOT_FOUND`` (404): storage proxy: no object at the key."""

    default_code = "OBJECT_NOT_FOUND"


class UnspecifiedConflict(ConflictError):
    """``CONFLICT`` (409): a conflict the server gave no more specific code for."""

    default_code = "CONFLICT"


class ServiceUnavailable(UnavailableError):
    """``UNAVAILABLE`` (503): the server is unavailable without a more specific code."""

    default_code = "UNAVAILABLE"


class MethodNotAllowed(ScaiGridAPIError):
    """``METHOD_NOT_ALLOWED`` (405): the path exists but not with this method."""

    default_code = "METHOD_NOT_ALLOWED"


class ObjectStoreUnavailable(UnavailableError):
    """``OBJECT_STORE_UNAVAILABLE`` (503): the object store did not answer; retry later."""

    default_code = "OBJECT_STORE_UNAVAILABLE"


class ObjectExists(ScaiGridAPIError):
    """``OBJECT_EXISTS`` (412): a first-writer-wins upload (``If-None-Match: *``) found the
    object already stored; the stored one stands."""

    default_code = "OBJECT_EXISTS"


class InternalError(InternalServerError):
    """``INTERNAL_ERROR`` (500): an unexpected server fault."""

    default_code = "INTERNAL_ERROR"


_BY_CODE: dict[str, type[ScaiGridAPIError]] = {
    cls.default_code: cls
    for cls in list(globals().values())
    if isinstance(cls, type) and issubclass(cls, ScaiGridAPIError) and cls.default_code
}

_BY_STATUS: dict[int, type[ScaiGridAPIError]] = {
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: ValidationError,
    416: ValidationError,
    422: ValidationError,
    429: RateLimitError,
    502: UnavailableError,
    503: UnavailableError,
    504: UnavailableError,
    507: InsufficientStorageError,
}

KNOWN_CODES: frozenset[str] = frozenset(_BY_CODE)
"""Every error code the client has a dedicated class for."""


def error_for(code: str, status_code: int | None = None) -> type[ScaiGridAPIError]:
    """Return the exception class for an error ``code``.

    Args:
        code: a SPEC error code such as ``"BUNKER_NOT_FOUND"``.
        status_code: the HTTP status; picks the family class for codes this client does
            not know (a newer server), e.g. 404 → :class:`NotFoundError`.

    Returns:
        The code's own class (``BUNKER_NOT_FOUND`` → :class:`BunkerNotFound`), else the
        family class for ``status_code``, else :class:`ScaiGridAPIError`.
    """
    cls = _BY_CODE.get(code)
    if cls is not None:
        return cls
    if status_code is not None:
        return _BY_STATUS.get(
            status_code, InternalServerError if status_code >= 500 else ScaiGridAPIError
        )
    return ScaiGridAPIError


def _retry_after(error: dict[str, Any], response: httpx.Response) -> float | None:
    value = error.get("retry_after", response.headers.get("retry-after"))
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def from_response(response: httpx.Response) -> ScaiGridAPIError:
    """Build the typed exception for an error ``response`` (status ≥ 400).

    The body must already be read. A body that is not the error envelope (a proxy's HTML
    page, an empty 502) still yields a typed error: code ``HTTP_<status>`` and the family
    class for the status.
    """
    request_id = response.headers.get("x-request-id")
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        meta = body.get("meta") if isinstance(body, dict) else None
        if isinstance(meta, dict) and isinstance(meta.get("request_id"), str):
            request_id = meta["request_id"]
        code: str = error["code"]
        message = str(error.get("message") or code)
        details = error.get("details")
    else:
        code = f"HTTP_{response.status_code}"
        message = response.reason_phrase or "error"
        text = response.text.strip()
        if text:
            message = f"{message}: {text[:200]}"
        details = None
        error = {}
    cls = error_for(code, response.status_code)
    return cls(
        code,
        message,
        response.status_code,
        details=details,
        request_id=request_id,
        retry_after=_retry_after(error, response),
    )

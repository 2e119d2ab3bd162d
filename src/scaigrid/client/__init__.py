"""Python SDK for the ScaiBunker API (SPEC §2-§4, §7, §13.1).

>>> from scaigrid.client import Client
>>> client = Client()  # reads SCAIGRID_HOST and SCAIGRID_API_KEY
>>> bunker = client.bunkers.create(image="debian-12", wait_s=30)

:class:`Client` blocks; :class:`AsyncClient` has the same surface with ``await`` (and
``async for`` over listings). Errors are typed: see :mod:`scaigrid.client.errors`.
"""

from scaigrid.client.async_client import AsyncClient
from scaigrid.client.client import Client
from scaigrid.client.errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BunkerNotFound,
    BunkerNotRunning,
    BunkerStopped,
    ConfigurationError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    QuotaExceededError,
    RateLimitError,
    ScaiGridAPIError,
    ScaiGridClientError,
    UnavailableError,
    ValidationError,
    WaitTimeout,
    error_for,
)
from scaigrid.client.models import (
    Bunker,
    BunkerSpec,
    DeletedFile,
    ExecEvent,
    ExecResult,
    ExtractedArchive,
    FileEntry,
    Image,
    ImageSpec,
    OutputChunk,
    ProcessRecord,
    WrittenFile,
)

__all__ = [
    "APIConnectionError",
    "APITimeoutError",
    "AsyncClient",
    "AuthenticationError",
    "Bunker",
    "BunkerNotFound",
    "BunkerNotRunning",
    "BunkerSpec",
    "BunkerStopped",
    "Client",
    "ConfigurationError",
    "ConflictError",
    "DeletedFile",
    "ExecEvent",
    "ExecResult",
    "ExtractedArchive",
    "FileEntry",
    "Image",
    "ImageSpec",
    "NotFoundError",
    "OutputChunk",
    "PermissionDeniedError",
    "ProcessRecord",
    "ProtocolError",
    "QuotaExceededError",
    "RateLimitError",
    "ScaiGridAPIError",
    "ScaiGridClientError",
    "UnavailableError",
    "ValidationError",
    "WaitTimeout",
    "WrittenFile",
    "error_for",
]

"""Object-store and storage-proxy settings: the ``SCAIBUNKER_*`` variables of SPEC §11.4.

Read by the controller and by a standalone proxy (``SCAIGRID_MODE=bunker_proxy``); workers
never read them (they hold no S3 credentials, only capabilities).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class StorageSettings(BaseSettings):
    """Settings from ``SCAIBUNKER_<NAME>`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="SCAIBUNKER_", extra="ignore", frozen=True)

    storage_backend: Literal["local", "s3"] | None = Field(
        default=None,
        description="`local` (a directory, the embedded default) or `s3`; unset means `s3` "
        "when SCAIBUNKER_S3_ENDPOINT is set, else `local`.",
    )
    storage_dir: Path | None = Field(
        default=None,
        description="Directory of the local backend (default <SCAIGRID_DATA_DIR>/objects).",
    )
    s3_endpoint: str | None = Field(default=None, description="S3 endpoint URL.")
    s3_region: str = Field(default="us-east-1", description="S3 region.")
    s3_bucket: str = Field(default="scaibunker", description="The one bucket (SPEC §11.1).")
    s3_access_key_id: SecretStr | None = Field(default=None, description="S3 access key id.")
    s3_secret_access_key: SecretStr | None = Field(default=None, description="S3 secret key.")
    s3_path_style: bool = Field(
        default=True, description="Path-style addressing (Garage, MinIO); false for virtual-host."
    )
    s3_part_size_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=5 * 1024 * 1024,
        description="Multipart upload part size in bytes (S3 minimum 5 MiB).",
    )
    s3_timeout_s: float = Field(
        default=30.0, gt=0, description="Connect and read timeout of one S3 call, seconds."
    )
    storage_proxy_url: str | None = Field(
        default=None,
        description="Base URL workers use for the storage proxy (a load balancer in front of "
        "bunker_proxy processes); default: the controller's SCAIGRID_PUBLIC_URL.",
    )
    storage_capability_secret: SecretStr | None = Field(
        default=None,
        description="HMAC secret of storage capabilities (>= 32 bytes). Required in "
        "bunker_proxy mode; a controller without one uses a random per-process secret.",
    )
    storage_capability_secret_previous: SecretStr | None = Field(
        default=None, description="The previous secret, still accepted during rotation."
    )

    def effective_backend(self) -> Literal["local", "s3"]:
        """The backend in use: the explicit one, else ``s3`` iff an endpoint is set."""
        if self.storage_backend is not None:
            return self.storage_backend
        return "s3" if self.s3_endpoint else "local"

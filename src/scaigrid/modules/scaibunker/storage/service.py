"""The storage service held in ``app.state.scaibunker_storage``: the store plus the capability
secrets, and minting of worker capabilities (SPEC §11.3)."""

from __future__ import annotations

import secrets as pysecrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from scaigrid.errors import ObjectStoreUnavailable
from scaigrid.modules.scaibunker.storage import capabilities
from scaigrid.modules.scaibunker.storage.settings import StorageSettings
from scaigrid.modules.scaibunker.storage.store import (
    ObjectStore,
    S3ObjectStore,
    build_store,
)

log = structlog.get_logger(__name__)


@dataclass
class StorageService:
    """``store`` and ``secrets`` (current first, then the previous one during rotation)."""

    store: ObjectStore
    secrets: list[bytes]

    def mint(
        self,
        methods: Sequence[str],
        *,
        key: str | None = None,
        prefix: str | None = None,
        ttl_s: int = capabilities.DEFAULT_TTL_S,
    ) -> dict[str, object]:
        """A capability for a worker task: ``{"capability", "expires_at"}`` (unix seconds)."""
        token, exp = capabilities.mint(
            self.secrets[0], methods, key=key, prefix=prefix, ttl_s=ttl_s
        )
        return {"capability": token, "expires_at": exp}

    async def close(self) -> None:
        """Close the store's clients."""
        await self.store.close()


async def open_storage(settings: StorageSettings, data_dir: Path, *, proxy: bool) -> StorageService:
    """Build the store and load the secrets.

    Raises:
        ValueError: ``proxy`` without ``SCAIBUNKER_STORAGE_CAPABILITY_SECRET``, or a secret
            shorter than 32 bytes.
    """
    current = settings.storage_capability_secret
    if current is None:
        if proxy:
            raise ValueError("bunker_proxy mode needs SCAIBUNKER_STORAGE_CAPABILITY_SECRET")
        secret = pysecrets.token_bytes(32)
        log.warning("storage.random_capability_secret")
    else:
        secret = current.get_secret_value().encode()
    keys = [secret]
    if settings.storage_capability_secret_previous is not None:
        keys.append(settings.storage_capability_secret_previous.get_secret_value().encode())
    if any(len(k) < capabilities.MIN_SECRET_BYTES for k in keys):
        raise ValueError("storage capability secrets must be at least 32 bytes")
    store = build_store(settings, data_dir)
    if isinstance(store, S3ObjectStore):
        try:
            await store.ensure_bucket()
        except ObjectStoreUnavailable:
            # Calls will answer OBJECT_STORE_UNAVAILABLE until the store is back.
            log.warning("storage.bucket_unchecked", bucket=settings.s3_bucket)
    log.info("storage.opened", backend=settings.effective_backend())
    return StorageService(store, keys)

"""What the snapshot service, routes and restore share: errors, object keys, visibility,
the storage service and capability minting."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.modules.scaibunker.snapshots.models import Snapshot
from scaigrid.modules.scaibunker.state import ModuleState
from scaigrid.modules.scaibunker.storage.service import StorageService
from scaigrid.platform.auth import Principal

#: Shown instead of environment values (as in bunker objects).
MASK = "***"


class SnapshotNotFound(errors.NotFound):
    """``SNAPSHOT_NOT_FOUND`` (404): unknown or invisible snapshot."""

    code = "SNAPSHOT_NOT_FOUND"


class SnapshotNotReady(errors.Conflict):
    """``SNAPSHOT_NOT_READY`` (409): restore from a snapshot that is not ``ready``."""

    code = "SNAPSHOT_NOT_READY"


def layer_key(snapshot: Snapshot) -> str:
    """``scaibunker/snapshots/{tenant_id}/{snapshot_id}.tar.zst`` (SPEC §6.2)."""
    return f"scaibunker/snapshots/{snapshot.tenant_id}/{snapshot.id}.tar.zst"


def manifest_key(snapshot: Snapshot) -> str:
    """``scaibunker/snapshots/{tenant_id}/{snapshot_id}.manifest.json``."""
    return f"scaibunker/snapshots/{snapshot.tenant_id}/{snapshot.id}.manifest.json"


def snapshot_to_dict(snapshot: Snapshot) -> dict[str, Any]:
    """The SPEC §6.1 object; environment values are masked."""
    manifest = dict(snapshot.manifest or {})
    manifest["env_vars"] = dict.fromkeys(manifest.get("env_vars") or {}, MASK)
    manifest["layer_bytes"] = snapshot.layer_bytes
    return {
        "snapshot_id": snapshot.id,
        "name": snapshot.name,
        "tenant_id": snapshot.tenant_id,
        "owner_user_id": snapshot.owner_user_id,
        "bunker_id": snapshot.bunker_id,
        "image_id": snapshot.image_id,
        "image_digest": snapshot.image_digest,
        "status": snapshot.status,
        "status_reason": snapshot.status_reason,
        "size_bytes": snapshot.size_bytes,
        "sha256": snapshot.sha256,
        "created_at": snapshot.created_at,
        "ready_at": snapshot.ready_at,
        "manifest": manifest,
    }


def _visible(principal: Principal, snapshot: Snapshot) -> bool:
    if snapshot.tenant_id != principal.tenant_id:
        return principal.is_super_admin and principal.has("scaibunker:admin")
    return (
        snapshot.owner_user_id == principal.user_id
        or principal.has("scaibunker:admin")
        or principal.has("scaibunker:admin:tenant")
    )


async def get_visible_snapshot(
    session: AsyncSession, principal: Principal, snapshot_id: str
) -> Snapshot:
    """Load a snapshot the caller may see.

    Raises:
        SnapshotNotFound: unknown or invisible (another tenant's id is 404, never 403).
    """
    snapshot = await session.get(Snapshot, snapshot_id)
    if snapshot is None or not _visible(principal, snapshot):
        raise SnapshotNotFound(f"snapshot {snapshot_id} not found")
    return snapshot


def storage_of(state: ModuleState) -> StorageService:
    """The module's storage service.

    Raises:
        errors.InternalError: the module started without one.
    """
    if state.storage is None:
        raise errors.InternalError("object storage is not configured")
    return state.storage


def capability(storage: StorageService, method: str, key: str) -> dict[str, Any]:
    """``{"capability": token}`` allowing ``method`` on exactly ``key`` (900 s)."""
    minted = storage.mint([method], key=key)
    return {"capability": minted["capability"]}

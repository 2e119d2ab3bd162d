"""Storage capabilities a worker asks for over its channel (SPEC §10.4 ``capability_request``).

A worker sends ``{"type": "capability_request", "request_id", "purpose", "bunker_id"?,
"image_id"?}`` when it has no capability for a transfer or the one it holds is about to
expire; the controller answers ``{"type": "capability_grant", "request_id", "capability",
"expires_at", "storage_url"}`` or, when it refuses, ``{"type": "capability_grant",
"request_id", "error": {code, message}}``.

Purposes and what they grant (lifetime :data:`GRANT_TTL_S`):

* ``audit`` with ``bunker_id``: ``PUT`` on the prefix ``scaibunker/audit/{bunker_id}/``, only
  for a bunker placed on the asking worker (egress audit batches, SPEC §8.7);
* ``image_artifact`` with ``image_id``: ``GET``, ``HEAD`` and ``PUT`` on the image's baked
  artifact keys ``scaibunker/images/{image_id}/rootfs.*``, only for a visible, not
  deactivated image the worker may hold (:func:`~scaigrid.modules.scaibunker.images.service.
  worker_usable`).
* ``snapshot_layer`` / ``snapshot_manifest`` with ``snapshot_id`` (an extension of SPEC §10.4's
  fields): ``PUT`` on exactly that snapshot's layer or manifest key, only while the snapshot
  is ``pending`` or ``uploading`` and its bunker is on the asking worker (a long snapshot
  whose task capability expired before its upload or a retry).
"""

from __future__ import annotations

from typing import Any, Final

import structlog

from scaigrid import errors
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.images.models import Image
from scaigrid.modules.scaibunker.images.service import worker_usable
from scaigrid.modules.scaibunker.snapshots.common import layer_key, manifest_key
from scaigrid.modules.scaibunker.snapshots.models import Snapshot
from scaigrid.modules.scaibunker.state import ModuleState
from scaigrid.modules.scaibunker.workers.models import Worker
from scaigrid.protocol.link import MsgType

log = structlog.get_logger(__name__)

#: Lifetime of a granted capability in seconds (the SPEC §11.3 default for worker tasks).
GRANT_TTL_S: Final = 900
AUDIT: Final = "audit"
IMAGE_ARTIFACT: Final = "image_artifact"
SNAPSHOT_LAYER: Final = "snapshot_layer"
SNAPSHOT_MANIFEST: Final = "snapshot_manifest"


def audit_prefix(bunker_id: str) -> str:
    """``scaibunker/audit/{bunker_id}/`` (SPEC §11.1)."""
    return f"scaibunker/audit/{bunker_id}/"


def image_prefix(image_id: str) -> str:
    """``scaibunker/images/{image_id}/`` (SPEC §11.1)."""
    return f"scaibunker/images/{image_id}/"


async def mint_for_worker(
    state: ModuleState,
    worker_id: str,
    purpose: str,
    *,
    bunker_id: Any,
    image_id: Any,
    snapshot_id: Any = None,
) -> dict[str, Any]:
    """Check that ``worker_id`` may have a capability for ``purpose`` and mint it.

    Returns:
        ``{capability, expires_at, storage_url}`` (``expires_at`` in unix seconds).

    Raises:
        errors.ValidationFailed: unknown purpose or missing id.
        errors.AuthzPermissionDenied: the bunker is not on this worker, or the image is
            unknown, deactivated or not one this worker may hold.
        errors.InternalError: the module has no object storage.
    """
    if state.storage is None:
        raise errors.InternalError("object storage is not configured")
    async with state.db.sessionmaker() as session:
        if purpose == AUDIT and isinstance(bunker_id, str):
            bunker = await session.get(Bunker, bunker_id)
            if bunker is None or bunker.worker_id != worker_id:
                raise errors.AuthzPermissionDenied(f"bunker {bunker_id} is not on this worker")
            minted = state.storage.mint(["PUT"], prefix=audit_prefix(bunker_id), ttl_s=GRANT_TTL_S)
        elif purpose == IMAGE_ARTIFACT and isinstance(image_id, str):
            image = await session.get(Image, image_id)
            worker = await session.get(Worker, worker_id)
            if (
                image is None
                or worker is None
                or image.status == "deactivated"
                or not worker_usable(worker, image)
            ):
                raise errors.AuthzPermissionDenied(f"image {image_id} is not available here")
            minted = state.storage.mint(
                ["GET", "HEAD", "PUT"], prefix=image_prefix(image_id), ttl_s=GRANT_TTL_S
            )
        elif purpose in (SNAPSHOT_LAYER, SNAPSHOT_MANIFEST) and isinstance(snapshot_id, str):
            snapshot = await session.get(Snapshot, snapshot_id)
            owner = await session.get(Bunker, snapshot.bunker_id) if snapshot else None
            if (
                snapshot is None
                or snapshot.status not in ("pending", "uploading")
                or owner is None
                or owner.worker_id != worker_id
            ):
                raise errors.AuthzPermissionDenied(
                    f"snapshot {snapshot_id} is not being taken on this worker"
                )
            key = layer_key(snapshot) if purpose == SNAPSHOT_LAYER else manifest_key(snapshot)
            minted = state.storage.mint(["PUT"], key=key, ttl_s=GRANT_TTL_S)
        else:
            raise errors.ValidationFailed(
                f"capability_request for {purpose!r} needs a known purpose and its id"
            )
    return {**minted, "storage_url": state.storage_url}


async def answer_request(
    state: ModuleState, worker_id: str, message: dict[str, Any]
) -> dict[str, Any]:
    """The ``capability_grant`` message answering one ``capability_request``."""
    reply: dict[str, Any] = {
        "type": MsgType.CAPABILITY_GRANT,
        "request_id": str(message.get("request_id") or ""),
    }
    purpose = str(message.get("purpose") or "")
    try:
        minted = await mint_for_worker(
            state,
            worker_id,
            purpose,
            bunker_id=message.get("bunker_id"),
            image_id=message.get("image_id"),
            snapshot_id=message.get("snapshot_id"),
        )
    except errors.ScaiGridError as exc:
        log.warning("capability_refused", worker_id=worker_id, purpose=purpose, reason=exc.message)
        reply["error"] = {"code": exc.code, "message": exc.message}
        return reply
    log.info("capability_granted", worker_id=worker_id, purpose=purpose)
    return {**reply, **minted}

"""The ``bunker.snapshot`` task (SPEC §6.3, steps 2-5 on the worker).

1. Freeze the bunker (driver pause; a paused bunker stays paused) and write its writable layer
   to a local ``tar.zst`` in the scratch dir (:func:`~scaigrid.worker.snapshots.archive_layer`).
2. Thaw it, report ``{stage: "uploading"}`` and upload the archive, then the manifest (the
   controller's ``body`` plus ``layer_bytes``, ``size_bytes`` and ``sha256``), each through
   the storage proxy with the capability the controller minted for exactly that key (one
   refused as expired is renewed over the link, ``capability_request`` purposes
   ``snapshot_layer`` / ``snapshot_manifest``).
3. Remove the local archive whatever happened. A failed upload leaves no object behind (the
   proxy aborts its multipart upload) and the bunker keeps running.

Params: ``{snapshot_id, storage_url, layer: {key, capability}, manifest: {key, capability,
body}}``. Result: ``{size_bytes, sha256, layer_bytes, entries, skipped}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from scaigrid.worker.bunkers import BunkerSupervisor
from scaigrid.worker.drivers.base import DriverError
from scaigrid.worker.link.tasks import Task, TaskFailed
from scaigrid.worker.objects import ObjectClient
from scaigrid.worker.snapshots import LayerStats, archive_layer

log = structlog.get_logger(__name__)


def _target(params: Mapping[str, Any], name: str) -> tuple[str, str]:
    value = params.get(name)
    if not isinstance(value, Mapping):
        raise TaskFailed("VALIDATION_ERROR", f"bunker.snapshot needs '{name}'")
    key, capability = value.get("key"), value.get("capability")
    if not isinstance(key, str) or not isinstance(capability, str) or not key or not capability:
        raise TaskFailed("VALIDATION_ERROR", f"{name} needs 'key' and 'capability'")
    return key, capability


def _write_archive(upper: Path, out: Path, base: int) -> LayerStats:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        return archive_layer(upper, handle, base)


async def take_snapshot(supervisor: BunkerSupervisor, task: Task) -> dict[str, Any]:
    """Run one ``bunker.snapshot`` task (see the module docstring).

    Raises:
        TaskFailed: ``VALIDATION_ERROR`` (bad params, driver without a writable layer dir),
            ``BUNKER_NOT_RUNNING``/``BUNKER_NOT_FOUND``, ``AGENT_UNAVAILABLE`` (freeze or
            thaw failed), ``INTERNAL_ERROR`` (the layer could not be read), or the proxy's
            code (``OBJECT_STORE_UNAVAILABLE`` after retries, ``AUTHZ_PERMISSION_DENIED``).
    """
    bunker_id = task.require_bunker_id()
    params = task.params
    snapshot_id, storage_url = params.get("snapshot_id"), params.get("storage_url")
    if not isinstance(snapshot_id, str) or not isinstance(storage_url, str):
        raise TaskFailed("VALIDATION_ERROR", "bunker.snapshot needs snapshot_id and storage_url")
    layer_key, layer_cap = _target(params, "layer")
    manifest_key, manifest_cap = _target(params, "manifest")
    body = params.get("manifest", {}).get("body") or {}
    await asyncio.to_thread(supervisor.scratch_dir.mkdir, mode=0o700, parents=True, exist_ok=True)
    archive = supervisor.scratch_dir / f"{snapshot_id}.tar.zst"
    manifest_path = supervisor.scratch_dir / f"{snapshot_id}.manifest.json"
    bound = log.bind(bunker_id=bunker_id, snapshot_id=snapshot_id)
    try:
        try:
            async with supervisor.frozen_upper(bunker_id) as upper:
                base = supervisor.layer_id_base(bunker_id)
                stats = await asyncio.to_thread(_write_archive, upper, archive, base)
        except DriverError as exc:
            raise TaskFailed("AGENT_UNAVAILABLE", f"bunker could not be frozen: {exc}") from exc
        except OSError as exc:
            bound.error("snapshot_read_failed", error=str(exc))
            raise TaskFailed(
                "INTERNAL_ERROR", f"the writable layer could not be read: {exc}"
            ) from exc
        bound.info(
            "snapshot_archived",
            size_bytes=stats.size_bytes,
            layer_bytes=stats.layer_bytes,
            entries=stats.entries,
            skipped=stats.skipped,
        )
        await task.progress({"stage": "uploading"})
        client = ObjectClient(storage_url)
        broker = supervisor.images.broker
        await client.upload(
            archive,
            layer_key,
            layer_cap,
            stats.sha256,
            refresh=broker.refresher("snapshot_layer", snapshot_id) if broker else None,
        )
        manifest = {
            **body,
            "layer_bytes": stats.layer_bytes,
            "size_bytes": stats.size_bytes,
            "sha256": stats.sha256,
        }
        data = json.dumps(manifest, sort_keys=True).encode()
        await asyncio.to_thread(manifest_path.write_bytes, data)
        await client.upload(
            manifest_path,
            manifest_key,
            manifest_cap,
            hashlib.sha256(data).hexdigest(),
            refresh=broker.refresher("snapshot_manifest", snapshot_id) if broker else None,
        )
    finally:
        for path in (archive, manifest_path):
            await asyncio.to_thread(path.unlink, missing_ok=True)
    bound.info("snapshot_uploaded", size_bytes=stats.size_bytes)
    return {
        "size_bytes": stats.size_bytes,
        "sha256": stats.sha256,
        "layer_bytes": stats.layer_bytes,
        "entries": stats.entries,
        "skipped": stats.skipped,
    }

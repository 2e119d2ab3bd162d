"""Task handlers for tenant bridges (SPEC §8.8, §10.4): ``bridge.create`` and ``bridge.delete``.

``bridge.create``
    params ``{bridge_id, device, vlan_id}`` (``device``: the worker device name the
    controller derived from the id, :func:`scaigrid.worker.net.l2.bridge_device`); result
    ``{device}`` once the bridge exists (idempotent). Errors: ``WORKER_UNAVAILABLE`` when the
    worker runs without bunker networking, ``VALIDATION_ERROR`` for bad params. Deadline 10 s.
``bridge.delete``
    params ``{device}``; result ``{deleted: bool}`` (``false``: it did not exist). Error
    ``RESOURCE_IN_USE`` while a bunker interface is attached. Deadline 10 s.
``bridge.list``
    params ``{}``; result ``{devices: [name, ...]}``, the bridges that exist on the worker
    (the controller deletes those it no longer knows when the worker reconnects).
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from scaigrid.protocol.link import TaskKind
from scaigrid.worker.bunkers import BunkerSupervisor
from scaigrid.worker.link.tasks import HandlerSpec, Task, TaskFailed
from scaigrid.worker.net.l2 import DEVICE, BridgeInUse, L2Error, L2Manager

BRIDGE_DEADLINE_S: Final = 10.0


def _device(params: dict[str, Any]) -> str:
    device = params.get("device")
    if not isinstance(device, str) or not DEVICE.match(device):
        raise TaskFailed("VALIDATION_ERROR", "device must be a bridge device name")
    return device


def bridge_specs(supervisor: BunkerSupervisor) -> dict[str, HandlerSpec]:
    """The ``bridge.*`` handler table bound to ``supervisor``'s network manager."""

    def l2() -> L2Manager:
        if supervisor.network is None:
            raise TaskFailed("WORKER_UNAVAILABLE", "this worker runs without bunker networking")
        return supervisor.network.l2

    async def create(task: Task) -> dict[str, Any]:
        device = _device(dict(task.params))
        vlan_id = task.params.get("vlan_id")
        if vlan_id is not None and (
            not isinstance(vlan_id, int) or isinstance(vlan_id, bool) or not 1 <= vlan_id <= 4094
        ):
            raise TaskFailed("VALIDATION_ERROR", "vlan_id must be 1-4094 or null")
        try:
            await l2().create_bridge(device, vlan_id)
        except L2Error as exc:
            raise TaskFailed("WORKER_UNAVAILABLE", f"bridge could not be created: {exc}") from exc
        return {"device": device}

    async def delete(task: Task) -> dict[str, Any]:
        device = _device(dict(task.params))
        try:
            deleted = await l2().delete_bridge(device)
        except BridgeInUse as exc:
            raise TaskFailed("RESOURCE_IN_USE", str(exc)) from exc
        except L2Error as exc:
            raise TaskFailed("INTERNAL_ERROR", f"bridge could not be deleted: {exc}") from exc
        return {"deleted": deleted}

    async def list_all(task: Task) -> dict[str, Any]:
        if supervisor.network is None:
            return {"devices": []}
        return {"devices": await asyncio.to_thread(supervisor.network.l2.bridges)}

    return {
        TaskKind.BRIDGE_LIST: HandlerSpec(list_all, BRIDGE_DEADLINE_S),
        TaskKind.BRIDGE_CREATE: HandlerSpec(create, BRIDGE_DEADLINE_S, "WORKER_UNAVAILABLE"),
        TaskKind.BRIDGE_DELETE: HandlerSpec(delete, BRIDGE_DEADLINE_S),
    }

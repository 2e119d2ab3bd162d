"""Placement of a bunker on a worker (SPEC §10.7, the walking skeleton's subset).

Eligible: connected, ``admin_state: active``, usable by the tenant (platform pool or the
tenant's own worker), offers the requested isolation class, and
``allocated + request <= capacity`` for CPU, memory and disk. Among eligible workers the one
with the largest remaining fraction of its scarcest resource wins (spread), then the one with
fewer bunkers. Image readiness (SPEC §7.8): with ``lazy_pull`` false only workers where the
image is ``ready`` (warm state, or the worker's heartbeat ``image_cache``) qualify; with
``lazy_pull`` true they are preferred. Callers hold :attr:`ModuleState.placement_lock` from
placement until the bunker row is committed, so concurrent creates cannot overfill a worker.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.modules.scaibunker.bunkers.models import Bunker
from scaigrid.modules.scaibunker.bunkers.states import TERMINAL
from scaigrid.modules.scaibunker.images.models import ImageWorker
from scaigrid.modules.scaibunker.workers.models import Worker

_RESOURCES = ("cpu_millicores", "memory_mb", "disk_mb")


@dataclass(frozen=True)
class Request:
    """What a bunker asks for: resources (millicores, MiB, MiB) and an isolation class;
    ``worker_id`` pins it to one worker (a transit bunker's bridges, SPEC §10.7 rule 4)."""

    tenant_id: str
    cpu_millicores: int
    memory_mb: int
    disk_mb: int
    isolation: str | None = None
    image_id: str | None = None
    lazy_pull: bool = True
    worker_id: str | None = None


@dataclass(frozen=True)
class Placement:
    """The chosen worker and the driver it will use."""

    worker_id: str
    driver: str
    isolation: str


async def allocated_by_worker(session: AsyncSession) -> dict[str, dict[str, int]]:
    """Sum the resources of non-terminal bunkers per worker id."""
    rows = await session.execute(
        select(
            Bunker.worker_id,
            func.sum(Bunker.cpu_millicores),
            func.sum(Bunker.memory_mb),
            func.sum(Bunker.disk_mb),
            func.count(),
        )
        .where(Bunker.worker_id.is_not(None), Bunker.status.not_in(TERMINAL))
        .group_by(Bunker.worker_id)
    )
    return {
        str(worker_id): {
            "cpu_millicores": int(cpu or 0),
            "memory_mb": int(mem or 0),
            "disk_mb": int(disk or 0),
            "bunkers": int(count),
        }
        for worker_id, cpu, mem, disk, count in rows
    }


async def image_ready_on(session: AsyncSession, image_id: str, workers: list[Worker]) -> set[str]:
    """Ids of ``workers`` where ``image_id`` is ``ready`` (warm rows or heartbeat cache)."""
    ready = set(
        (
            await session.scalars(
                select(ImageWorker.worker_id).where(
                    ImageWorker.image_id == image_id, ImageWorker.state == "ready"
                )
            )
        ).all()
    )
    for worker in workers:
        for entry in worker.image_cache or []:
            if (
                isinstance(entry, dict)
                and entry.get("image_id") == image_id
                and entry.get("state") == "ready"
            ):
                ready.add(worker.id)
    return ready


def _pick_driver(worker: Worker, isolation: str | None) -> tuple[str, str] | None:
    drivers = [d for d in worker.drivers if isinstance(d, dict)]
    if isolation is not None:
        drivers = [d for d in drivers if d.get("isolation") == isolation]
    drivers.sort(key=lambda d: 0 if d.get("isolation") == "microvm" else 1)
    if not drivers:
        return None
    return str(drivers[0]["name"]), str(drivers[0]["isolation"])


async def place(session: AsyncSession, connected: list[str], request: Request) -> Placement:
    """Choose a worker for ``request``.

    Args:
        session: database session.
        connected: ids of workers with a live channel to this controller.
        request: the bunker's effective resources and isolation class.

    Raises:
        errors.NoSuitableWorker: workers have room but none offers the isolation class, or
            (``lazy_pull`` false) none has the image ready.
        errors.WorkerUnavailable: no eligible worker has the free capacity.
    """
    if not connected:
        raise errors.WorkerUnavailable("no worker is connected")
    workers = (
        await session.scalars(
            select(Worker).where(
                Worker.id.in_(connected),
                Worker.admin_state == "active",
                Worker.connection == "online",
                Worker.deleted_at.is_(None),
                (Worker.tenant_id.is_(None)) | (Worker.tenant_id == request.tenant_id),
            )
        )
    ).all()
    if request.worker_id is not None:
        workers = [w for w in workers if w.id == request.worker_id]
    allocated = await allocated_by_worker(session)
    ready: set[str] = set()
    if request.image_id is not None:
        ready = await image_ready_on(session, request.image_id, list(workers))
    best: tuple[tuple[bool, float, int], Placement] | None = None
    class_missing = image_missing = False
    for worker in workers:
        if request.image_id is not None and not request.lazy_pull and worker.id not in ready:
            image_missing = True
            continue
        used = allocated.get(worker.id, {})
        fractions = []
        for resource in _RESOURCES:
            capacity = int(worker.capacity.get(resource, 0))
            after = capacity - used.get(resource, 0) - getattr(request, resource)
            if capacity <= 0 or after < 0:
                break
            fractions.append(after / capacity)
        else:
            driver = _pick_driver(worker, request.isolation)
            if driver is None:
                class_missing = True
                continue
            key = (worker.id in ready, min(fractions), -used.get("bunkers", 0))
            if best is None or key > best[0]:
                best = (key, Placement(worker.id, driver[0], driver[1]))
    if best is not None:
        return best[1]
    if class_missing:
        raise errors.NoSuitableWorker(f"no worker offers isolation {request.isolation!r}")
    if image_missing:
        raise errors.NoSuitableWorker("the image is not ready on any worker that could take it")
    raise errors.WorkerUnavailable("no worker has the free CPU, memory and disk for this bunker")

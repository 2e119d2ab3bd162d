"""The bunker supervisor: every bunker this worker runs, its driver handle and its agent.

One :class:`BunkerSupervisor` per worker process. Per bunker it keeps the state reported to
the controller (``provisioning`` → ``running`` → ``stopping`` → ``stopped``, or ``failed``),
the driver handle, and one :class:`~scaigrid.protocol.agent.AgentClient` connection that all
exec and files calls share (HTTP/2 multiplexes them).

* **Create** prepares the image through the :class:`~scaigrid.worker.images.ImageStore`,
  starts the bunker with the first configured driver and waits until the agent answers a
  ping. Any failure tears down whatever was started and raises :class:`BootFailed`.
* **Destroy** is idempotent and works for ids the supervisor does not know (it asks every
  driver to stop them), so reconciliation can clean up after a previous run.
* **Agent access**: a dropped agent connection is reopened once on the next call; if that
  fails the call answers ``AGENT_UNAVAILABLE`` and ``bunker_event agent_lost`` is sent (then
  ``agent_ready`` once a later reconnect works).
* **Unexpected exit** of a bunker's init marks it ``failed``, releases its host resources,
  and sends ``bunker_event vm_exited``. The failed bunker stays listed until the controller
  destroys it, so a lost event is repaired by the next heartbeat.
* **Restart**: bunkers of a previous worker process are not reattached. :meth:`start`
  stops every leftover a driver reports and the worker registers with none of them; the
  controller fails those bunkers (``vm_exited``) when it sees them missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog

from scaigrid.errors import AgentUnavailable, BunkerNotFound, BunkerNotRunning
from scaigrid.protocol.agent import AgentClient, AgentConnectionLost, AgentError
from scaigrid.protocol.link import LinkClosed
from scaigrid.worker.drivers.base import (
    BunkerHandle,
    BunkerSpec,
    Driver,
    DriverError,
    Resources,
)
from scaigrid.worker.images import ImagePrepareFailed, ImageStore
from scaigrid.worker.link.tasks import TaskFailed
from scaigrid.worker.net.l2 import InterfaceRequest
from scaigrid.worker.net.manager import NetRequest, NetworkError, NetworkManager
from scaigrid.worker.objects import ObjectClient
from scaigrid.worker.rootfs.idshift import DEFAULT_ID_BASE
from scaigrid.worker.snapshots import restore_layer

log = structlog.get_logger(__name__)

BOOT_FAILED = "BOOT_FAILED"
#: Seconds to wait for the agent's first answer after the driver started the bunker.
AGENT_BOOT_TIMEOUT_S = 60.0
#: Seconds one agent connect (HTTP/2 preface + SETTINGS) may take.
AGENT_CONNECT_TIMEOUT_S = 10.0
#: Seconds a guest may take to flush its disks before a snapshot (TCG guests are slow).
GUEST_SYNC_TIMEOUT_S = 60.0
#: Seconds between ``{"stage": "image"}`` progress repeats during a long image build, so the
#: controller's per-progress wait never runs out while the build is still going.
IMAGE_PROGRESS_EVERY_S = 30.0
_BOOT_RETRY_S = 0.05

EventSink = Callable[[str, str], Awaitable[object]]
Progress = Callable[[dict[str, Any]], Awaitable[None]]


class BunkerState(StrEnum):
    """State of one bunker on this worker (reported in ``register``/``heartbeat``)."""

    PROVISIONING = "provisioning"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


#: States whose resources count as allocated on this worker.
_HOLDING = frozenset(
    {BunkerState.PROVISIONING, BunkerState.RUNNING, BunkerState.PAUSED, BunkerState.STOPPING}
)


class BootFailed(TaskFailed):
    """``BOOT_FAILED``: the bunker could not be started; nothing is left behind."""

    def __init__(self, message: str) -> None:
        super().__init__(BOOT_FAILED, message)


@dataclass(frozen=True)
class AgentLaunch:
    """How the guest agent is started in every bunker.

    Attributes:
        runtime_dir: host directory of the self-contained agent runtime (mounted read-only
            at ``/.scaibunker``).
        argv: the agent's argv inside the bunker (the bunker's PID 1).
        env: defaults of the agent's environment (``PATH``, ``LANG``); bunker ``env_vars``
            are merged over them.
    """

    runtime_dir: Path
    argv: tuple[str, ...]
    env: Mapping[str, str]


@dataclass(frozen=True)
class SnapshotSource:
    """Where a restored bunker's writable layer comes from (``bunker.create`` ``snapshot``).

    Attributes:
        snapshot_id: ``snp_`` id; ``key`` its layer object; ``sha256`` the digest recorded
            when it was taken; ``storage_url`` the proxy's base URL; ``capability`` a ``GET``
            capability for ``key``.
    """

    snapshot_id: str
    key: str
    sha256: str
    storage_url: str
    capability: str

    @classmethod
    def from_param(cls, value: Any) -> SnapshotSource | None:
        """Parse the optional ``snapshot`` parameter.

        Raises:
            TaskFailed: ``VALIDATION_ERROR`` when a field is missing or not a string.
        """
        if value is None:
            return None
        names = ("snapshot_id", "key", "sha256", "storage_url", "capability")
        if not isinstance(value, Mapping) or not all(
            isinstance(value.get(n), str) and value.get(n) for n in names
        ):
            raise TaskFailed("VALIDATION_ERROR", f"snapshot needs string fields {names}")
        return cls(*(str(value[n]) for n in names))


@dataclass(frozen=True)
class CreateRequest:
    """The ``bunker.create`` parameters, checked.

    Attributes:
        bunker_id: ``bnk_`` id.
        resources: CPU (millicores), memory (MiB) and writable disk (MiB).
        env_vars: bunker environment variables.
        network_profile: SPEC §8 profile name.
        network: the network request (profile, allowlist, upstream resolvers, bandwidth).
        image_id: ``img_`` id.
        image_name: image name (for messages).
        image_source: SPEC §7.2 build source.
        snapshot: the snapshot whose layer the bunker starts from, if any.
        image_artifact: ``image.artifact`` (the baked artifact to fetch instead of building,
            see :mod:`scaigrid.worker.images`), if the controller sent one.
        driver: name of the driver the scheduler placed the bunker on (``bunker.driver``);
            ``None`` means the worker's first driver.
    """

    bunker_id: str
    resources: Resources
    env_vars: Mapping[str, str]
    network_profile: str
    image_id: str
    image_name: str
    image_source: Mapping[str, Any]
    network: NetRequest | None = None
    snapshot: SnapshotSource | None = None
    driver: str | None = None
    image_artifact: Mapping[str, Any] | None = None

    @classmethod
    def from_params(cls, bunker_id: str | None, params: Mapping[str, Any]) -> CreateRequest:
        """Parse ``{bunker: {id, cpu_millicores, memory_mb, disk_mb, env_vars,
        network_profile}, image: {id, name, source}}``.

        Raises:
            TaskFailed: ``VALIDATION_ERROR`` naming the bad field.
        """
        bunker = params.get("bunker")
        image = params.get("image")
        if not isinstance(bunker, Mapping) or not isinstance(image, Mapping):
            raise TaskFailed("VALIDATION_ERROR", "bunker.create needs 'bunker' and 'image'")
        bid = bunker.get("id") or bunker_id
        if not isinstance(bid, str) or not bid or (bunker_id and bid != bunker_id):
            raise TaskFailed("VALIDATION_ERROR", "bunker.id is missing or differs from bunker_id")
        numbers: dict[str, int] = {}
        for name in ("cpu_millicores", "memory_mb", "disk_mb"):
            value = bunker.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise TaskFailed("VALIDATION_ERROR", f"bunker.{name} must be a positive integer")
            numbers[name] = value
        env_vars = bunker.get("env_vars") or {}
        if not isinstance(env_vars, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()
        ):
            raise TaskFailed("VALIDATION_ERROR", "bunker.env_vars must map strings to strings")
        image_id, source = image.get("id"), image.get("source")
        if not isinstance(image_id, str) or not image_id or not isinstance(source, Mapping):
            raise TaskFailed("VALIDATION_ERROR", "image needs 'id' and 'source'")
        profile = str(bunker.get("network_profile") or "isolated")
        driver = bunker.get("driver")
        if driver is not None and (not isinstance(driver, str) or not driver):
            raise TaskFailed("VALIDATION_ERROR", "bunker.driver must be a driver name")
        return cls(
            bunker_id=bid,
            resources=Resources(**numbers),
            env_vars=dict(env_vars),
            network_profile=profile,
            network=_net_request(profile, bunker, params.get("network")),
            image_id=image_id,
            image_name=str(image.get("name") or image_id),
            image_source=dict(source),
            snapshot=SnapshotSource.from_param(params.get("snapshot")),
            driver=driver,
            image_artifact=(
                dict(image["artifact"]) if isinstance(image.get("artifact"), Mapping) else None
            ),
        )


def _net_request(profile: str, bunker: Mapping[str, Any], network: Any) -> NetRequest | None:
    """Parse the network part of ``bunker.create``: ``bunker.{network_allowlist,
    bandwidth_mbit, tenant_id}`` and ``network.{dns_upstreams, egress_audit}``; ``None`` for
    ``isolated``.

    Raises:
        TaskFailed: ``VALIDATION_ERROR`` naming the bad field.
    """
    if profile == "isolated":
        return None
    if profile not in ("registry", "allowlisted", "unrestricted", "transit"):
        raise TaskFailed("VALIDATION_ERROR", f"unknown network profile {profile!r}")
    allowlist = bunker.get("network_allowlist")
    if profile in ("registry", "allowlisted") and (
        not isinstance(allowlist, list) or not all(isinstance(n, str) for n in allowlist)
    ):
        raise TaskFailed("VALIDATION_ERROR", "bunker.network_allowlist must list names")
    bandwidth = bunker.get("bandwidth_mbit")
    if bandwidth is not None and (
        not isinstance(bandwidth, int) or isinstance(bandwidth, bool) or not 1 <= bandwidth <= 10000
    ):
        raise TaskFailed("VALIDATION_ERROR", "bunker.bandwidth_mbit must be 1-10000")
    network = network if isinstance(network, Mapping) else {}
    upstreams = network.get("dns_upstreams")
    if not isinstance(upstreams, list) or not all(isinstance(u, str) for u in upstreams):
        raise TaskFailed("VALIDATION_ERROR", "network.dns_upstreams must list resolvers")
    tenant_id = bunker.get("tenant_id")
    interfaces = _interfaces(profile, bunker.get("interfaces"))
    return NetRequest(
        interfaces=interfaces,
        tenant_id=tenant_id if isinstance(tenant_id, str) else None,
        audit=network.get("egress_audit", True) is not False,
        profile=profile,
        allowlist=tuple(str(n) for n in allowlist or ())
        if profile in ("registry", "allowlisted")
        else None,
        upstreams=tuple(upstreams),
        bandwidth_mbit=bandwidth,
    )


def _interfaces(profile: str, value: Any) -> tuple[InterfaceRequest, ...]:
    """Parse ``bunker.interfaces`` (``transit`` only): ``[{if_name, mac, spoof_guard,
    device}]``, at most 8, unique ``if_name``.

    Raises:
        TaskFailed: ``VALIDATION_ERROR`` naming the bad element.
    """
    if value is None or value == []:
        if profile == "transit":
            raise TaskFailed("VALIDATION_ERROR", "transit bunkers need bunker.interfaces")
        return ()
    if profile != "transit":
        raise TaskFailed("VALIDATION_ERROR", "bunker.interfaces needs the transit profile")
    if not isinstance(value, list) or len(value) > 8:
        raise TaskFailed("VALIDATION_ERROR", "bunker.interfaces must list at most 8 interfaces")
    parsed: list[InterfaceRequest] = []
    for index, item in enumerate(value):
        try:
            parsed.append(InterfaceRequest.parse(item))
        except ValueError as exc:
            raise TaskFailed("VALIDATION_ERROR", f"bunker.interfaces[{index}]: {exc}") from exc
    if len({i.if_name for i in parsed}) != len(parsed):
        raise TaskFailed("VALIDATION_ERROR", "bunker.interfaces if_name values must be unique")
    return tuple(parsed)


@dataclass
class _Bunker:
    bunker_id: str
    resources: Resources
    driver: Driver
    state: BunkerState = BunkerState.PROVISIONING
    handle: BunkerHandle | None = None
    agent: AgentClient | None = None
    agent_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    agent_lost_reported: bool = False
    creator: asyncio.Task[Any] | None = None
    booted: asyncio.Event = field(default_factory=asyncio.Event)
    boot_ms: int | None = None
    watcher: asyncio.Task[None] | None = None
    teardown: asyncio.Task[None] | None = None


#: Capabilities a ``transit`` bunker's root gets on top of the container defaults, over the
#: network namespace its user namespace owns (:mod:`scaigrid.worker.net.userns`).
TRANSIT_CAPABILITIES: tuple[str, ...] = ("CAP_NET_ADMIN", "CAP_NET_RAW")


def layer_id_base(driver: Driver) -> int:
    """Host id of uid 0 in the writable layers of ``driver``: ``layer_id_base`` when the
    driver sets it (VM drivers: their layers are read from guest disks with the guest's own
    ids, so 0), else its ``id_base`` (container driver), else :data:`DEFAULT_ID_BASE`."""
    return int(getattr(driver, "layer_id_base", getattr(driver, "id_base", DEFAULT_ID_BASE)))


class BunkerSupervisor:
    """Runs this worker's bunkers.

    Args:
        drivers: drivers in preference order; new bunkers use the first.
        images: the image store.
        agent_launch: how the agent is started in each bunker.
        on_event: coroutine ``(bunker_id, event)`` sending ``bunker_event``; ``event`` is
            ``"vm_exited"``, ``"agent_lost"`` or ``"agent_ready"``.
        network: bunker networking; ``None`` allows only ``isolated`` bunkers.
        scratch_dir: where snapshot archives are staged (default: a temporary directory).
    """

    def __init__(
        self,
        *,
        drivers: Sequence[Driver],
        images: ImageStore,
        agent_launch: AgentLaunch,
        on_event: EventSink | None = None,
        network: NetworkManager | None = None,
        scratch_dir: Path | None = None,
    ) -> None:
        if not drivers:
            raise ValueError("a bunker supervisor needs at least one driver")
        self.drivers = list(drivers)
        self.images = images
        self._launch = agent_launch
        self._on_event = on_event
        self.network = network
        self.scratch_dir = scratch_dir or Path(tempfile.gettempdir()) / "scaibunker-transfers"
        self._bunkers: dict[str, _Bunker] = {}
        self._background: set[asyncio.Task[Any]] = set()

    def set_event_sink(self, on_event: EventSink) -> None:
        """Set where ``bunker_event`` notifications go."""
        self._on_event = on_event

    # -- reporting ---------------------------------------------------------------------

    def report(self) -> list[dict[str, str]]:
        """``[{bunker_id, state}]`` for every bunker this worker holds, sorted by id."""
        return [
            {"bunker_id": b.bunker_id, "state": str(b.state)}
            for b in sorted(self._bunkers.values(), key=lambda b: b.bunker_id)
        ]

    def allocated(self) -> Resources:
        """Sum of the resources of bunkers that hold host resources (millicores, MiB)."""
        held = [b.resources for b in self._bunkers.values() if b.state in _HOLDING]
        return Resources(
            cpu_millicores=sum(r.cpu_millicores for r in held),
            memory_mb=sum(r.memory_mb for r in held),
            disk_mb=sum(r.disk_mb for r in held),
        )

    # -- lifecycle of the supervisor -----------------------------------------------------

    async def start(self) -> list[str]:
        """Stop the leftovers of a previous worker process; return the ids stopped.

        They are destroyed rather than reattached (see the module docstring); one that
        cannot be stopped is logged and skipped.
        """
        stopped: list[str] = []
        for driver in self.drivers:
            for bunker_id in await driver.list_leftovers():
                try:
                    await driver.stop(bunker_id)
                except DriverError as exc:
                    log.error("bunker_leftover_stop_failed", bunker_id=bunker_id, error=str(exc))
                    continue
                log.info("bunker_leftover_stopped", bunker_id=bunker_id, driver=driver.info.name)
                stopped.append(bunker_id)
        if self.network is not None:
            await self.network.start()
        return stopped

    async def close(self) -> None:
        """Destroy every bunker (worker shutdown); failures are logged."""
        ids = list(self._bunkers)
        outcomes = await asyncio.gather(*(self.destroy(i) for i in ids), return_exceptions=True)
        for bunker_id, outcome in zip(ids, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                log.error("bunker_stop_failed", bunker_id=bunker_id, error=str(outcome))
        if self.network is not None:
            await self.network.close()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    # -- create ------------------------------------------------------------------------

    async def create(self, request: CreateRequest, progress: Progress) -> dict[str, Any]:
        """Boot a bunker; return ``{driver, isolation, boot_ms}`` once its agent answers.

        Sends ``{"stage": "image"}`` while the image is prepared (repeated every
        :data:`IMAGE_PROGRESS_EVERY_S` seconds) and ``{"stage": "booting"}`` when the
        driver starts. A create for a bunker that is already running (or booting) returns
        the same result once it is up.

        Raises:
            BootFailed: image build, driver or agent failure; nothing is left behind.
        """
        existing = self._bunkers.get(request.bunker_id)
        if existing is not None:
            return await self._existing_result(existing)
        driver = self._driver_for(request)
        record = _Bunker(request.bunker_id, request.resources, driver)
        record.creator = asyncio.current_task()
        self._bunkers[request.bunker_id] = record
        bound = log.bind(bunker_id=request.bunker_id, image_id=request.image_id)
        cleanup = contextlib.ExitStack()
        try:
            rootfs = await self._prepare_image(request, progress)
            await progress({"stage": "booting"})
            started = time.monotonic()
            transit = request.network is not None and bool(request.network.interfaces)
            if transit and driver.info.isolation != "container":
                raise NetworkError("transit interfaces need a container driver")
            owner = int(getattr(driver, "id_base", DEFAULT_ID_BASE)) if transit else None
            netns_path, userns_path = await self._attach_network(request, owner)
            spec = self._spec(request, rootfs, netns_path)
            if userns_path is not None:
                # The bunker's user namespace owns its network namespace: its root
                # configures its own interfaces (L2 appliances, SPEC §8.6).
                spec = dataclasses.replace(
                    spec, userns_path=userns_path, extra_capabilities=TRANSIT_CAPABILITIES
                )
            if request.snapshot is not None:
                await progress({"stage": "snapshot"})
                archive = await self._fetch_snapshot(driver, request.snapshot)
                cleanup.callback(archive.unlink, missing_ok=True)
                spec = dataclasses.replace(
                    spec, populate_upper=self._unpacker(driver, request, archive)
                )
            record.handle = await driver.start(spec)
            record.agent = await self._first_contact(record.handle)
            if netns_path is not None:
                await self._point_resolver(record.agent, request.bunker_id)
            record.boot_ms = round((time.monotonic() - started) * 1000)
        except BaseException as exc:
            cleanup.close()
            await asyncio.shield(self._discard(record))
            record.booted.set()
            if isinstance(exc, LinkClosed):
                bound.info("bunker_create_abandoned", reason="link closed")
                raise
            if isinstance(exc, ImagePrepareFailed):
                bound.warning("bunker_boot_failed", stage="image", reason=str(exc))
                raise BootFailed(
                    f"image {request.image_name} could not be prepared: {exc}"
                ) from exc
            if isinstance(exc, NetworkError):
                bound.warning("bunker_boot_failed", stage="network", reason=str(exc))
                raise BootFailed(f"network setup failed: {exc}") from exc
            if isinstance(exc, DriverError):
                bound.warning("bunker_boot_failed", stage="driver", reason=str(exc))
                raise BootFailed(f"{driver.info.name} driver failed: {exc}") from exc
            if isinstance(exc, _AgentNeverAnswered):
                bound.warning("bunker_boot_failed", stage="agent", reason=str(exc))
                raise BootFailed(str(exc)) from exc
            if isinstance(exc, Exception) and not isinstance(exc, TaskFailed):
                bound.error("bunker_boot_crashed", exc_info=exc)
                raise BootFailed("internal error while booting the bunker") from exc
            raise
        cleanup.close()
        record.state = BunkerState.RUNNING
        record.creator = None
        record.booted.set()
        record.watcher = self._spawn(self._watch(record), f"watch:{record.bunker_id}")
        bound.info("bunker_running", driver=driver.info.name, boot_ms=record.boot_ms)
        return self._result(record)

    async def _fetch_snapshot(self, driver: Driver, snapshot: SnapshotSource) -> Path:
        """Download the snapshot's layer archive into the scratch dir."""
        if not hasattr(driver, "upper_dir") and not hasattr(driver, "frozen_layer"):
            raise TaskFailed(
                "VALIDATION_ERROR", f"the {driver.info.name} driver cannot restore snapshots"
            )
        await asyncio.to_thread(self.scratch_dir.mkdir, mode=0o700, parents=True, exist_ok=True)
        archive = self.scratch_dir / f"{snapshot.snapshot_id}-{os.urandom(4).hex()}.tar.zst"
        client = ObjectClient(snapshot.storage_url)
        await client.download(snapshot.key, snapshot.capability, archive)
        return archive

    @staticmethod
    def _unpacker(driver: Driver, request: CreateRequest, archive: Path) -> Callable[[Path], None]:
        assert request.snapshot is not None
        sha256 = request.snapshot.sha256
        base = layer_id_base(driver)
        # The layer's file content must fit the bunker's disk, ext4 metadata aside.
        limit = request.resources.disk_mb << 20

        def unpack(upper: Path) -> None:
            restore_layer(archive, upper, base, sha256, limit)

        return unpack

    @contextlib.asynccontextmanager
    async def frozen_upper(self, bunker_id: str) -> AsyncIterator[Path]:
        """Freeze a running or paused bunker and yield its writable layer (overlay upper
        dir); afterwards a bunker that was running is thawed, a paused one stays paused.

        Raises:
            BunkerNotFound, BunkerNotRunning: as :meth:`pause`.
            TaskFailed: ``VALIDATION_ERROR`` when the bunker's driver has neither
                ``upper_dir`` (a host directory) nor ``frozen_layer`` (VM drivers: the
                guest is synced through its agent, paused, and the driver exposes the layer
                read from its disk while the context lasts).
            DriverError: the bunker could not be frozen, synced or thawed.
        """
        record = self._live(bunker_id)
        upper_dir = getattr(record.driver, "upper_dir", None)
        frozen_layer = getattr(record.driver, "frozen_layer", None)
        if upper_dir is None and frozen_layer is None:
            raise TaskFailed(
                "VALIDATION_ERROR",
                f"the {record.driver.info.name} driver cannot snapshot bunkers",
            )
        was_running = record.state is BunkerState.RUNNING
        if frozen_layer is not None:
            # A guest's dirty page cache must reach its disk before the host reads it;
            # a paused guest is thawed for the flush and frozen again right after.
            await self.resume(bunker_id)
            try:
                await self._sync_guest(bunker_id)
            except BaseException:
                if not was_running:
                    await self.pause(bunker_id)
                raise
        await self.pause(bunker_id)
        try:
            if frozen_layer is not None:
                async with frozen_layer(bunker_id) as upper:
                    yield Path(upper)
            elif upper_dir is not None:
                yield Path(upper_dir(bunker_id))
        finally:
            if was_running and self._bunkers.get(bunker_id) is record:
                await self.resume(bunker_id)

    def layer_id_base(self, bunker_id: str) -> int:
        """Host id of uid 0 in the writable layer of ``bunker_id`` (see
        :func:`layer_id_base`).

        Raises:
            BunkerNotFound, BunkerNotRunning: as :meth:`pause`.
        """
        return layer_id_base(self._live(bunker_id).driver)

    async def _sync_guest(self, bunker_id: str) -> None:
        """Have the agent flush every filesystem of the guest (``POST /v1/sync``).

        Raises:
            DriverError: the agent could not be reached or did not answer in time.
        """
        try:
            agent = await self.agent(bunker_id)
            response = await agent.request("POST", "/v1/sync", {}, timeout_s=GUEST_SYNC_TIMEOUT_S)
            async with response:
                await response.json()
        except (AgentError, AgentConnectionLost, AgentUnavailable, TimeoutError) as exc:
            raise DriverError(f"the guest could not flush its disks: {exc}") from exc

    async def _existing_result(self, record: _Bunker) -> dict[str, Any]:
        await record.booted.wait()
        if record.state is BunkerState.RUNNING and self._bunkers.get(record.bunker_id) is record:
            return self._result(record)
        raise BootFailed(f"bunker {record.bunker_id} is {record.state} on this worker")

    @staticmethod
    def _result(record: _Bunker) -> dict[str, Any]:
        return {
            "driver": record.driver.info.name,
            "isolation": record.driver.info.isolation,
            "boot_ms": record.boot_ms,
        }

    async def _attach_network(
        self, request: CreateRequest, owner_id_base: int | None
    ) -> tuple[str | None, str | None]:
        """``(netns path, userns path)`` a non-``isolated`` bunker joins (``(None, None)`` for
        ``isolated``; the user namespace only with ``owner_id_base``, see
        :meth:`NetworkManager.attach`)."""
        if request.network is None:
            return None, None
        if self.network is None:
            raise NetworkError("this worker runs without bunker networking")
        attachment = await self.network.attach(
            request.bunker_id, request.network, owner_id_base=owner_id_base
        )
        return attachment.netns_path, attachment.userns_path

    async def _point_resolver(self, agent: AgentClient, bunker_id: str) -> None:
        """Write ``/etc/resolv.conf`` naming the bunker's DNS resolver (its gateway).

        A read-only or odd image only loses the file: the policy is enforced on the worker,
        so the bunker still reaches exactly what its profile allows.
        """
        attachment = self.network.attachment(bunker_id) if self.network is not None else None
        if attachment is None:
            return
        content = f"nameserver {attachment.gateway}\noptions timeout:2 attempts:2\n".encode()
        try:
            response = await agent.request(
                "PUT",
                "/v1/files",
                {"path": "/etc/resolv.conf", "user": "root", "mode": 0o644, "parents": True},
                content,
                timeout_s=AGENT_CONNECT_TIMEOUT_S,
            )
            async with response:
                await response.json()
        except (AgentError, AgentConnectionLost, TimeoutError) as exc:
            log.warning("bunker_resolv_conf_failed", bunker_id=bunker_id, error=str(exc))

    def _driver_for(self, request: CreateRequest) -> Driver:
        """The driver named in ``request`` (the scheduler's choice), else the first.

        Raises:
            BootFailed: the named driver does not run on this worker.
        """
        if request.driver is None:
            return self.drivers[0]
        for driver in self.drivers:
            if driver.info.name == request.driver:
                return driver
        raise BootFailed(f"driver {request.driver!r} does not run on this worker")

    def _spec(self, request: CreateRequest, rootfs: Path, netns_path: str | None) -> BunkerSpec:
        return BunkerSpec(
            bunker_id=request.bunker_id,
            rootfs=rootfs,
            resources=request.resources,
            netns_path=netns_path,
            env={**self._launch.env, **request.env_vars},
            agent_runtime=self._launch.runtime_dir,
            init_argv=self._launch.argv,
        )

    async def _prepare_image(self, request: CreateRequest, progress: Progress) -> Path:
        build = asyncio.ensure_future(
            self.images.ensure(request.image_id, request.image_source, request.image_artifact)
        )
        try:
            while True:
                await progress({"stage": "image"})
                done, _ = await asyncio.wait({build}, timeout=IMAGE_PROGRESS_EVERY_S)
                if done:
                    return build.result()
        finally:
            if not build.done():
                build.cancel()

    async def _first_contact(self, handle: BunkerHandle) -> AgentClient:
        deadline = time.monotonic() + AGENT_BOOT_TIMEOUT_S
        last_error = "no answer"
        while time.monotonic() < deadline:
            try:
                client = await self._connect_agent(handle)
            except (OSError, TimeoutError, AgentConnectionLost) as exc:
                last_error = str(exc) or type(exc).__name__
                await asyncio.sleep(_BOOT_RETRY_S)
                continue
            try:
                await client.ping(timeout_s=max(1.0, deadline - time.monotonic()))
            except (OSError, TimeoutError, AgentConnectionLost, AgentError) as exc:
                last_error = str(exc) or type(exc).__name__
                await client.close()
                await asyncio.sleep(_BOOT_RETRY_S)
                continue
            return client
        raise _AgentNeverAnswered(
            f"the guest agent did not answer within {AGENT_BOOT_TIMEOUT_S:.0f} s ({last_error})"
        )

    @staticmethod
    async def _connect_agent(handle: BunkerHandle) -> AgentClient:
        reader, writer = await handle.open_agent_stream()
        try:
            return await AgentClient.connect(reader, writer, timeout_s=AGENT_CONNECT_TIMEOUT_S)
        except BaseException:
            writer.close()
            raise

    async def _discard(self, record: _Bunker) -> None:
        """Undo a failed or cancelled create."""
        record.state = BunkerState.STOPPING
        with contextlib.suppress(Exception):
            await self._release(record)
        record.state = BunkerState.STOPPED
        if self._bunkers.get(record.bunker_id) is record:
            del self._bunkers[record.bunker_id]

    # -- destroy -----------------------------------------------------------------------

    async def destroy(self, bunker_id: str) -> None:
        """Stop ``bunker_id`` and release everything it held (idempotent).

        A bunker still booting has its create cancelled first. An id this supervisor does
        not hold is stopped on every driver anyway (leftovers of an earlier run).

        Raises:
            DriverError: a driver could not release the bunker's host resources.
        """
        record = self._bunkers.get(bunker_id)
        if record is None:
            for driver in self.drivers:
                await driver.stop(bunker_id)
            if self.network is not None:
                await self.network.detach(bunker_id)
            return
        creator = record.creator
        if creator is not None and not creator.done() and creator is not asyncio.current_task():
            creator.cancel()
            await asyncio.wait({creator})
        if record.teardown is None:
            record.teardown = self._spawn(self._teardown(record), f"destroy:{bunker_id}")
        await asyncio.shield(record.teardown)

    async def _teardown(self, record: _Bunker) -> None:
        if record.state is not BunkerState.STOPPED:
            record.state = BunkerState.STOPPING
        try:
            await self._release(record)
        finally:
            record.state = BunkerState.STOPPED
            if self._bunkers.get(record.bunker_id) is record:
                del self._bunkers[record.bunker_id]
        log.info("bunker_destroyed", bunker_id=record.bunker_id)

    async def _release(self, record: _Bunker) -> None:
        watcher = record.watcher
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        agent, record.agent = record.agent, None
        if agent is not None:
            await agent.close()
        await record.driver.stop(record.bunker_id)
        if self.network is not None:
            await self.network.detach(record.bunker_id)

    # -- pause and resume --------------------------------------------------------------

    async def pause(self, bunker_id: str) -> None:
        """Freeze every process of a running bunker (idempotent on a paused one).

        Raises:
            BunkerNotFound: ``BUNKER_NOT_FOUND``, this worker does not hold the bunker.
            BunkerNotRunning: ``BUNKER_NOT_RUNNING``, the bunker is neither running nor paused.
            DriverError: the driver could not freeze it.
        """
        record = self._live(bunker_id)
        if record.state is BunkerState.PAUSED:
            return
        assert record.handle is not None
        await record.driver.pause(record.handle)
        record.state = BunkerState.PAUSED
        log.info("bunker_paused", bunker_id=bunker_id)

    async def resume(self, bunker_id: str) -> None:
        """Thaw a paused bunker (idempotent on a running one).

        Raises:
            BunkerNotFound: ``BUNKER_NOT_FOUND``, this worker does not hold the bunker.
            BunkerNotRunning: ``BUNKER_NOT_RUNNING``, the bunker is neither running nor paused.
            DriverError: the driver could not thaw it.
        """
        record = self._live(bunker_id)
        if record.state is BunkerState.RUNNING:
            return
        assert record.handle is not None
        await record.driver.resume(record.handle)
        record.state = BunkerState.RUNNING
        log.info("bunker_resumed", bunker_id=bunker_id)

    def _live(self, bunker_id: str) -> _Bunker:
        record = self._bunkers.get(bunker_id)
        if record is None:
            raise BunkerNotFound(f"bunker {bunker_id} is not on this worker")
        live = (BunkerState.RUNNING, BunkerState.PAUSED)
        if record.state not in live or record.handle is None:
            raise BunkerNotRunning(f"bunker {bunker_id} is {record.state}")
        return record

    # -- agent access ------------------------------------------------------------------

    async def agent(self, bunker_id: str) -> AgentClient:
        """Return the agent connection of a running bunker, reconnecting once if it dropped.

        Raises:
            BunkerNotFound: ``BUNKER_NOT_FOUND``, this worker does not hold the bunker.
            BunkerNotRunning: ``BUNKER_NOT_RUNNING``, the bunker is not ``running``.
            AgentUnavailable: ``AGENT_UNAVAILABLE``, the agent cannot be reached.
        """
        record = self._bunkers.get(bunker_id)
        if record is None:
            raise BunkerNotFound(f"bunker {bunker_id} is not on this worker")
        if record.state is not BunkerState.RUNNING or record.handle is None:
            raise BunkerNotRunning(f"bunker {bunker_id} is {record.state}")
        async with record.agent_lock:
            client = record.agent
            if client is not None and not client.closed:
                return client
            record.agent = None
            try:
                client = await self._connect_agent(record.handle)
            except (OSError, TimeoutError, AgentConnectionLost) as exc:
                log.warning("agent_reconnect_failed", bunker_id=bunker_id, error=str(exc))
                if not record.agent_lost_reported and record.state is BunkerState.RUNNING:
                    record.agent_lost_reported = True
                    self._notify(bunker_id, "agent_lost")
                raise AgentUnavailable(f"the agent of bunker {bunker_id} is unreachable") from exc
            record.agent = client
            log.info("agent_reconnected", bunker_id=bunker_id)
            if record.agent_lost_reported:
                record.agent_lost_reported = False
                self._notify(bunker_id, "agent_ready")
            return client

    # -- exit watching -----------------------------------------------------------------

    async def _watch(self, record: _Bunker) -> None:
        assert record.handle is not None
        status = await record.handle.wait_exit()
        if record.state not in (BunkerState.RUNNING, BunkerState.PAUSED):
            return
        record.state = BunkerState.FAILED
        log.warning("bunker_exited", bunker_id=record.bunker_id, status=status)
        self._notify(record.bunker_id, "vm_exited")
        try:
            await self._release(record)
        except Exception as exc:
            log.error("bunker_release_failed", bunker_id=record.bunker_id, exc_info=exc)

    def _notify(self, bunker_id: str, event: str) -> None:
        sink = self._on_event
        if sink is not None:
            self._spawn(sink(bunker_id, event), f"event:{bunker_id}:{event}")

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task


class _AgentNeverAnswered(Exception):
    """The agent did not answer a ping before the boot deadline."""

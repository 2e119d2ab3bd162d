"""Configuration of the ``scaibunker-worker`` daemon (SPEC §10.8).

Every setting is read from an environment variable with the prefix ``SCAIBUNKER_``
(``controller_url`` ← ``SCAIBUNKER_CONTROLLER_URL``); command-line flags of
``scaibunker-worker`` override the environment.

- ``controller_url`` (``SCAIBUNKER_CONTROLLER_URL``, required): ScaiGrid base URL,
  ``http(s)://host[:port]``.
- ``join_token`` (``SCAIBUNKER_JOIN_TOKEN``): ``sbj_`` join token, needed only until a
  credential is stored.
- ``data_dir`` (``SCAIBUNKER_DATA_DIR``, default ``/var/lib/scaibunker``): credential, image
  cache, bunker state.
- ``drivers`` (``SCAIBUNKER_DRIVERS``, default every automatic driver that works on the host,
  i.e. ``container``): driver names in preference order, ``container,qemu``; the microVM
  driver ``qemu`` is used only when named.
- ``vm_kernel`` / ``vm_initramfs`` (``SCAIBUNKER_VM_KERNEL``, ``SCAIBUNKER_VM_INITRAMFS``,
  default derived from Debian's ``linux-image-cloud-amd64`` and cached under the data
  directory): uncompressed guest ``vmlinux`` and its initramfs for microVM drivers (set both
  or neither).
- ``vm_accel`` (``SCAIBUNKER_VM_ACCEL``, default probed): ``kvm`` or ``tcg`` for the ``qemu``
  driver; unset, KVM is used when ``/dev/kvm`` really boots a guest, else TCG.
- ``vm_boot_timeout_s`` (``SCAIBUNKER_VM_BOOT_TIMEOUT_S``, default the driver's: 90 for
  ``qemu``, 30 for ``firecracker``): seconds from VMM start to the guest agent's ready line
  before a microVM boot fails (its console tail is the reason).
- ``labels`` (``SCAIBUNKER_LABELS``): extra labels, ``k=v,k=v``.
- ``reserved_cpu_millicores`` / ``reserved_memory_mb`` (``SCAIBUNKER_RESERVED_CPU_MILLICORES``,
  ``SCAIBUNKER_RESERVED_MEMORY_MB``, default 0): host capacity kept out of ``capacity``.
- ``hostname`` (``SCAIBUNKER_HOSTNAME``, default the host name): name the worker registers
  under.
- ``cgroup_parent`` (``SCAIBUNKER_CGROUP_PARENT``, default ``scaibunker-<12 hex digits of
  the data directory's SHA-256>``): cgroup directory holding this worker's bunkers. It must
  differ between workers sharing a host: at start a worker destroys every bunker it finds
  there as a leftover of its previous run.
- ``network`` (``SCAIBUNKER_NETWORK``, default ``true``): bunker networking (every profile but
  ``isolated``, SPEC §8); ``false`` leaves only ``isolated`` bunkers.
- ``net_pool`` (``SCAIBUNKER_NET_POOL``, default a /20 of ``100.64.0.0/10`` chosen by the data
  directory's hash): IPv4 range cut into /30 blocks for the router uplink and every bunker.
- ``net_uplink_netns`` (``SCAIBUNKER_NET_UPLINK_NETNS``, default the root namespace): named
  network namespace the router namespace's uplink veth leads to. In the root namespace the
  operator routes (and NATs) ``net_pool`` onward; the worker never edits the host firewall.
- ``net_deny`` (``SCAIBUNKER_NET_DENY``): extra IPv4 CIDRs no bunker may reach, comma
  separated (the control plane, storage proxy, Redis, databases); the worker's own addresses,
  link-local, multicast and the pool are always denied.
- ``audit_dir`` (``SCAIBUNKER_AUDIT_DIR``, default unset): unset, egress audit batches are
  uploaded through the storage proxy with capabilities the controller grants (SPEC §8.7);
  set, they are written under this directory instead, with the object store's key layout
  (``scaibunker/audit/...``).
- ``image_cache_max_mb`` (``SCAIBUNKER_IMAGE_CACHE_MAX_MB``, default unset: no limit): size
  of the image cache (unpacked trees) in MiB; beyond it the least recently used images no
  bunker uses are evicted after each bake (see :mod:`scaigrid.worker.images`).
- ``log_level`` (``SCAIBUNKER_LOG_LEVEL``, default ``info``): ``debug``, ``info``,
  ``warning`` or ``error``.
- ``insecure_registries`` (``SCAIBUNKER_INSECURE_REGISTRIES``, default none): registry
  hosts (``host:port``, comma-separated) that OCI image pulls reach over plain HTTP without
  certificate checks, e.g. a registry on 127.0.0.1; every other registry needs valid HTTPS.
- ``registry_auth_file`` (``SCAIBUNKER_REGISTRY_AUTH_FILE``, default none): a
  containers-auth.json(5) file (as written by ``skopeo login``) with the operator's registry
  credentials for OCI pulls; without it pulls are anonymous.
"""

from __future__ import annotations

import hashlib
import socket
from ipaddress import IPv4Network
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LogLevel = Literal["debug", "info", "warning", "error"]


class WorkerSettings(BaseSettings):
    """Settings of one worker daemon; see the module docstring for the variables."""

    model_config = SettingsConfigDict(env_prefix="SCAIBUNKER_", extra="ignore")

    controller_url: str
    join_token: str | None = None
    data_dir: Path = Path("/var/lib/scaibunker")
    drivers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    labels: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    reserved_cpu_millicores: int = Field(default=0, ge=0)
    reserved_memory_mb: int = Field(default=0, ge=0)
    hostname: str = Field(default_factory=socket.gethostname, min_length=1)
    cgroup_parent: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*$"
    )
    network: bool = True
    net_pool: IPv4Network | None = None
    net_uplink_netns: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    net_deny: Annotated[list[IPv4Network], NoDecode] = Field(default_factory=list)
    audit_dir: Path | None = None
    image_cache_max_mb: int | None = Field(default=None, ge=1)
    log_level: LogLevel = "info"
    insecure_registries: Annotated[frozenset[str], NoDecode] = Field(default_factory=frozenset)
    registry_auth_file: Path | None = None
    vm_kernel: Path | None = None
    vm_initramfs: Path | None = None
    vm_accel: Literal["kvm", "tcg"] | None = None
    vm_boot_timeout_s: float | None = Field(default=None, gt=0)

    @field_validator("controller_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://", "ws://", "wss://")):
            raise ValueError("controller_url must start with http://, https://, ws:// or wss://")
        return value.rstrip("/")

    @field_validator("join_token")
    @classmethod
    def _blank_token_is_none(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("drivers", mode="before")
    @classmethod
    def _split_drivers(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("insecure_registries", mode="before")
    @classmethod
    def _split_registries(cls, value: Any) -> Any:
        if isinstance(value, str):
            return frozenset(host.strip() for host in value.split(",") if host.strip())
        return value

    @field_validator("net_deny", mode="before")
    @classmethod
    def _split_deny(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [cidr.strip() for cidr in value.split(",") if cidr.strip()]
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _split_labels(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        labels: dict[str, str] = {}
        for pair in value.split(","):
            if not pair.strip():
                continue
            key, sep, val = pair.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"label {pair!r} is not key=value")
            labels[key.strip()] = val.strip()
        return labels

    @property
    def credential_path(self) -> Path:
        """File holding the long-lived ``sbw_`` credential (mode 0600)."""
        return self.data_dir / "credential"

    def bunker_cgroup_parent(self) -> str:
        """``cgroup_parent``, or a name derived from the resolved data directory."""
        if self.cgroup_parent:
            return self.cgroup_parent
        digest = hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()
        return f"scaibunker-{digest[:12]}"

    def connect_url(self) -> str:
        """WebSocket URL of the controller's worker endpoint (http→ws, https→wss)."""
        base = self.controller_url
        if base.startswith("http://"):
            base = "ws://" + base[len("http://") :]
        elif base.startswith("https://"):
            base = "wss://" + base[len("https://") :]
        return base + "/v1/modules/scaibunker/workers/connect"

"""Typed views of the objects the ScaiBunker API returns (SPEC §2.1, §3.3, §4.2, §7.1).

Each dataclass keeps the whole JSON object in ``raw`` so fields a newer server adds stay
reachable. Timestamps are parsed into aware UTC :class:`~datetime.datetime` values; a field
the server left out reads as ``None`` (or an empty collection).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypedDict

BUNKER_STATES = (
    "pending",
    "provisioning",
    "running",
    "paused",
    "stopping",
    "terminated",
    "failed",
    "expired",
)
"""Every bunker ``status`` (SPEC §2.4)."""

GuestUser = Literal["user", "root"]
"""The guest user a call acts as: ``user`` (uid 1000) or ``root`` (needs ``scaibunker:root``)."""
LifecycleMode = Literal["ephemeral", "session", "persistent"]
NetworkProfile = Literal["isolated", "registry", "allowlisted", "unrestricted", "transit"]

TERMINAL_STATES = frozenset({"terminated", "failed", "expired"})
"""Bunker states a bunker never leaves."""

# Linux signal numbers: the guest is always Linux, whatever the client's platform.
_LINUX_SIGNALS = {
    "SIGHUP": 1,
    "SIGINT": 2,
    "SIGQUIT": 3,
    "SIGILL": 4,
    "SIGTRAP": 5,
    "SIGABRT": 6,
    "SIGBUS": 7,
    "SIGFPE": 8,
    "SIGKILL": 9,
    "SIGUSR1": 10,
    "SIGSEGV": 11,
    "SIGUSR2": 12,
    "SIGPIPE": 13,
    "SIGALRM": 14,
    "SIGTERM": 15,
    "SIGSTKFLT": 16,
    "SIGCHLD": 17,
    "SIGCONT": 18,
    "SIGSTOP": 19,
    "SIGTSTP": 20,
    "SIGTTIN": 21,
    "SIGTTOU": 22,
    "SIGURG": 23,
    "SIGXCPU": 24,
    "SIGXFSZ": 25,
    "SIGVTALRM": 26,
    "SIGPROF": 27,
    "SIGWINCH": 28,
    "SIGIO": 29,
    "SIGPWR": 30,
    "SIGSYS": 31,
}


def parse_time(value: Any) -> datetime | None:
    """Parse an RFC 3339 timestamp (``2026-05-09T12:00:00Z``); None stays None."""
    if not isinstance(value, str) or not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _str_map(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


@dataclass(frozen=True)
class Bunker:
    """A bunker (SPEC §2.1).

    Resources: ``cpu_millicores`` (1000 = one vCPU), ``memory_mb`` and ``disk_mb`` (MiB).
    Timers ``max_lifetime_s`` and ``idle_timeout_s`` are seconds, None meaning no timer.
    ``env_vars`` values are always ``"***"`` (write-only). ``status_history`` is only filled
    by ``bunkers.get`` (``[{"from", "to", "reason", "at"}]``, oldest first).
    """

    id: str
    status: str
    tenant_id: str | None
    owner_user_id: str | None
    name: str | None
    image: str | None
    image_id: str | None
    snapshot_id: str | None
    lifecycle_mode: str | None
    network_profile: str | None
    network_allowlist: list[str] | None
    cpu_millicores: int | None
    memory_mb: int | None
    disk_mb: int | None
    gpu_count: int | None
    gpu_type: str | None
    bandwidth_mbit: int | None
    max_lifetime_s: int | None
    idle_timeout_s: int | None
    session_type: str | None
    session_ref: str | None
    label_set: dict[str, str]
    env_vars: dict[str, str]
    interfaces: list[dict[str, Any]]
    status_reason: str | None
    status_changed_at: datetime | None
    status_history: list[dict[str, Any]]
    worker_id: str | None
    driver: str | None
    isolation: str | None
    created_at: datetime | None
    started_at: datetime | None
    last_activity_at: datetime | None
    expires_at: datetime | None
    ended_at: datetime | None
    final_snapshot_id: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Bunker:
        """Build a :class:`Bunker` from the API's JSON object."""
        allowlist = data.get("network_allowlist")
        return cls(
            id=str(data["id"]),
            status=str(data.get("status", "")),
            tenant_id=_str(data.get("tenant_id")),
            owner_user_id=_str(data.get("owner_user_id")),
            name=_str(data.get("name")),
            image=_str(data.get("image")),
            image_id=_str(data.get("image_id")),
            snapshot_id=_str(data.get("snapshot_id")),
            lifecycle_mode=_str(data.get("lifecycle_mode")),
            network_profile=_str(data.get("network_profile")),
            network_allowlist=list(allowlist) if isinstance(allowlist, list) else None,
            cpu_millicores=_int(data.get("cpu_millicores")),
            memory_mb=_int(data.get("memory_mb")),
            disk_mb=_int(data.get("disk_mb")),
            gpu_count=_int(data.get("gpu_count")),
            gpu_type=_str(data.get("gpu_type")),
            bandwidth_mbit=_int(data.get("bandwidth_mbit")),
            max_lifetime_s=_int(data.get("max_lifetime_s")),
            idle_timeout_s=_int(data.get("idle_timeout_s")),
            session_type=_str(data.get("session_type")),
            session_ref=_str(data.get("session_ref")),
            label_set=_str_map(data.get("label_set")),
            env_vars=_str_map(data.get("env_vars")),
            interfaces=list(data.get("interfaces") or []),
            status_reason=_str(data.get("status_reason")),
            status_changed_at=parse_time(data.get("status_changed_at")),
            status_history=list(data.get("status_history") or []),
            worker_id=_str(data.get("worker_id")),
            driver=_str(data.get("driver")),
            isolation=_str(data.get("isolation")),
            created_at=parse_time(data.get("created_at")),
            started_at=parse_time(data.get("started_at")),
            last_activity_at=parse_time(data.get("last_activity_at")),
            expires_at=parse_time(data.get("expires_at")),
            ended_at=parse_time(data.get("ended_at")),
            final_snapshot_id=_str(data.get("final_snapshot_id")),
            raw=data,
        )

    @property
    def is_terminal(self) -> bool:
        """True once the bunker is ``terminated``, ``failed`` or ``expired``."""
        return self.status in TERMINAL_STATES


@dataclass(frozen=True)
class ExecResult:
    """The result of a foreground exec (SPEC §3.3).

    ``stdout`` and ``stderr`` are the exact bytes the command wrote (the client always asks
    for ``encoding: base64``). When a stream exceeded ``max_output_bytes`` its first and
    last halves are kept, concatenated, and ``*_truncated`` is True.

    ``status`` is ``exited`` (``exit_code`` set), ``signaled`` (``signal`` set, e.g.
    ``"SIGTERM"``), ``timed_out``, ``oom_killed`` or ``agent_lost``. ``duration_ms`` is
    milliseconds from process start to its end.
    """

    exec_id: str | None
    pid: int | None
    status: str
    exit_code: int | None
    signal: str | None
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    duration_ms: int | None
    started_at: datetime | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], encoding: str = "base64") -> ExecResult:
        """Build an :class:`ExecResult`; ``encoding`` is the one the request asked for."""

        def output(name: str) -> bytes:
            text = str(data.get(name) or "")
            return base64.b64decode(text) if encoding == "base64" else text.encode()

        return cls(
            exec_id=_str(data.get("exec_id")),
            pid=_int(data.get("pid")),
            status=str(data.get("status", "")),
            exit_code=_int(data.get("exit_code")),
            signal=_str(data.get("signal")),
            stdout=output("stdout"),
            stderr=output("stderr"),
            stdout_truncated=bool(data.get("stdout_truncated")),
            stderr_truncated=bool(data.get("stderr_truncated")),
            duration_ms=_int(data.get("duration_ms")),
            started_at=parse_time(data.get("started_at")),
            raw=data,
        )

    @property
    def stdout_text(self) -> str:
        """``stdout`` decoded as UTF-8, invalid sequences replaced with U+FFFD."""
        return self.stdout.decode("utf-8", errors="replace")

    @property
    def stderr_text(self) -> str:
        """``stderr`` decoded as UTF-8, invalid sequences replaced with U+FFFD."""
        return self.stderr.decode("utf-8", errors="replace")

    @property
    def ok(self) -> bool:
        """True when the command exited on its own with code 0."""
        return self.status == "exited" and self.exit_code == 0

    @property
    def shell_exit_code(self) -> int:
        """The exit status a shell would report for this outcome (0-255).

        ``exited`` → ``exit_code``; ``timed_out`` → 124 (as ``timeout(1)``); ``oom_killed``
        → 137 (128 + SIGKILL); ``signaled`` → 128 + the Linux signal number (137 for
        SIGKILL; 255 for an unknown signal); ``agent_lost`` and anything else → 255.
        """
        if self.status == "exited" and self.exit_code is not None:
            return self.exit_code & 0xFF
        if self.status == "timed_out":
            return 124
        if self.status == "oom_killed":
            return 137
        if self.status == "signaled" and self.signal:
            name = self.signal.upper()
            number = _LINUX_SIGNALS.get(name if name.startswith("SIG") else f"SIG{name}")
            return 128 + number if number is not None else 255
        return 255


@dataclass(frozen=True)
class Image:
    """An image (SPEC §7.1).

    ``source`` is ``{"kind": "oci", "ref"}``, ``{"kind": "tar", "path"}`` or
    ``{"kind": "debootstrap", "suite", "variant", "packages"}``. ``size_mib`` is the ext4
    size in MiB; ``default_*`` fill bunkers that do not set them. ``status`` is ``pending``,
    ``baking``, ``ready``, ``failed`` or ``deactivated``.
    """

    id: str
    name: str
    status: str
    scope: str | None
    tenant_id: str | None
    partner_id: str | None
    source: dict[str, Any]
    digest: str | None
    size_mib: int | None
    default_cpu_millicores: int | None
    default_memory_mb: int | None
    default_disk_mb: int | None
    lazy_pull: bool
    status_reason: str | None
    scan: dict[str, Any] | None
    warm: dict[str, int]
    created_at: datetime | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Image:
        """Build an :class:`Image` from the API's JSON object."""
        scan = data.get("scan")
        warm = data.get("warm")
        return cls(
            id=str(data["id"]),
            name=str(data.get("name", "")),
            status=str(data.get("status", "")),
            scope=_str(data.get("scope")),
            tenant_id=_str(data.get("tenant_id")),
            partner_id=_str(data.get("partner_id")),
            source=dict(data.get("source") or {}),
            digest=_str(data.get("digest")),
            size_mib=_int(data.get("size_mib")),
            default_cpu_millicores=_int(data.get("default_cpu_millicores")),
            default_memory_mb=_int(data.get("default_memory_mb")),
            default_disk_mb=_int(data.get("default_disk_mb")),
            lazy_pull=bool(data.get("lazy_pull")),
            status_reason=_str(data.get("status_reason")),
            scan=dict(scan) if isinstance(scan, dict) else None,
            warm={str(k): int(v) for k, v in warm.items()} if isinstance(warm, dict) else {},
            created_at=parse_time(data.get("created_at")),
            raw=data,
        )


class FileEntry(TypedDict, total=False):
    """A filesystem entry (SPEC §4.2), as returned by list, stat, mkdir and move.

    ``type`` is ``file``, ``dir``, ``symlink`` or ``other``; ``size`` is bytes; ``mode`` an
    octal string such as ``"0644"``; ``mtime`` an RFC 3339 string; ``symlink_target`` is set
    for symlinks (which are described themselves, not their targets).
    """

    name: str
    path: str
    type: str
    size: int
    mode: str
    uid: int
    gid: int
    mtime: str
    symlink_target: str | None


class WrittenFile(TypedDict, total=False):
    """The answer to a file upload: the absolute ``path``, ``size`` in bytes, the hex
    ``sha256`` of the written bytes and ``mode`` (as the server reports it)."""

    path: str
    size: int
    sha256: str
    mode: str | int


class ExtractedArchive(TypedDict, total=False):
    """The answer to an archive upload: the absolute target ``path``, the number of
    ``entries`` extracted and the ``bytes`` of regular files among them."""

    path: str
    entries: int
    bytes: int


class DeletedFile(TypedDict, total=False):
    """The answer to a file delete: ``{"path", "deleted": True}``."""

    path: str
    deleted: bool


class BunkerSpec(TypedDict, total=False):
    """Optional create fields of ``bunkers.create`` (SPEC §2.2); omitted ones take the
    image's or the module's defaults, and so do fields given as ``None``.

    ``cpu_millicores`` ≥ 100 (1000 = one vCPU); ``memory_mb`` ≥ 128 and ``disk_mb`` ≥ 64
    (MiB); ``max_lifetime_s`` and ``idle_timeout_s`` in seconds; ``bandwidth_mbit`` 1-10000;
    ``label_set`` ≤ 64 entries; ``env_vars`` ≤ 128 entries named ``[A-Za-z_][A-Za-z0-9_]*``.
    """

    snapshot_id: str | None
    name: str | None
    lifecycle_mode: Literal["ephemeral", "session", "persistent"] | None
    network_profile: (
        Literal["isolated", "registry", "allowlisted", "unrestricted", "transit"] | None
    )
    network_allowlist: list[str] | None
    cpu_millicores: int | None
    memory_mb: int | None
    disk_mb: int | None
    gpu_count: int | None
    gpu_type: str | None
    bandwidth_mbit: int | None
    max_lifetime_s: int | None
    idle_timeout_s: int | None
    session_type: Literal["standalone", "scaicore", "scaiwave", "api"] | None
    session_ref: str | None
    label_set: dict[str, str] | None
    env_vars: dict[str, str] | None
    interfaces: list[dict[str, Any]] | None
    isolation: Literal["microvm", "container"] | None


class ImageSpec(TypedDict, total=False):
    """Optional fields of ``images.register`` (SPEC §7.4): ``size_mib`` 64-65536 (ext4 size,
    MiB), the ``default_*`` resources for bunkers that do not set them, ``scope`` and
    ``lazy_pull``."""

    size_mib: int | None
    default_cpu_millicores: int | None
    default_memory_mb: int | None
    default_disk_mb: int | None
    scope: Literal["tenant", "partner", "platform"] | None
    lazy_pull: bool | None


@dataclass(frozen=True)
class ExecEvent:
    """One event of a streaming exec (SPEC §3.5).

    ``kind`` is ``start`` (``exec_id``, ``pid``), ``stdout`` / ``stderr`` (``data``: the raw
    bytes, ``seq``: the byte offset of their first byte in the stream, usable with
    ``processes.output(offset=)``) or ``exit`` (``result``: the :class:`ExecResult` with
    empty output). ``exit`` is always the last event.
    """

    kind: Literal["start", "stdout", "stderr", "exit"]
    exec_id: str | None = None
    pid: int | None = None
    seq: int | None = None
    data: bytes = b""
    result: ExecResult | None = None

    @classmethod
    def from_sse(cls, event: str, data: dict[str, Any]) -> ExecEvent | None:
        """Build the event of an SSE frame; None for an event name this client ignores."""
        if event == "start":
            return cls("start", exec_id=_str(data.get("exec_id")), pid=_int(data.get("pid")))
        if event in ("stdout", "stderr"):
            payload = base64.b64decode(str(data.get("data") or ""))
            kind: Literal["stdout", "stderr"] = "stdout" if event == "stdout" else "stderr"
            return cls(kind, seq=_int(data.get("seq")), data=payload)
        if event == "exit":
            result = ExecResult.from_dict(data)
            return cls("exit", exec_id=result.exec_id, pid=result.pid, result=result)
        return None


@dataclass(frozen=True)
class ProcessRecord:
    """A bunker process (an exec, foreground or background; SPEC §3.6).

    ``status`` is ``running`` or one of :class:`ExecResult`'s end states; ``stdout_bytes``
    and ``stderr_bytes`` count everything each stream has produced so far.
    """

    exec_id: str | None
    pid: int | None
    command: str | list[str]
    user: str | None
    cwd: str | None
    background: bool
    status: str
    exit_code: int | None
    signal: str | None
    stdin_open: bool
    started_at: datetime | None
    ended_at: datetime | None
    stdout_bytes: int
    stderr_bytes: int
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProcessRecord:
        """Build a :class:`ProcessRecord` from the API object."""
        command = data.get("command")
        return cls(
            exec_id=_str(data.get("exec_id")),
            pid=_int(data.get("pid")),
            command=command if isinstance(command, str | list) else "",
            user=_str(data.get("user")),
            cwd=_str(data.get("cwd")),
            background=bool(data.get("background")),
            status=str(data.get("status", "")),
            exit_code=_int(data.get("exit_code")),
            signal=_str(data.get("signal")),
            stdin_open=bool(data.get("stdin_open")),
            started_at=parse_time(data.get("started_at")),
            ended_at=parse_time(data.get("ended_at")),
            stdout_bytes=_int(data.get("stdout_bytes")) or 0,
            stderr_bytes=_int(data.get("stderr_bytes")) or 0,
            raw=data,
        )


@dataclass(frozen=True)
class OutputChunk:
    """Output of a process from an offset (SPEC §3.6): ``data`` starts at byte ``offset``
    of the stream; ``dropped_bytes`` were overwritten in the ring buffer before they were
    read; resume at ``next_offset``. ``eof`` once the process ended and all was returned."""

    stream: str
    offset: int
    next_offset: int
    data: bytes
    dropped_bytes: int
    eof: bool

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OutputChunk:
        """Build an :class:`OutputChunk` from a ``base64`` output answer."""
        return cls(
            stream=str(data.get("stream", "stdout")),
            offset=_int(data.get("offset")) or 0,
            next_offset=_int(data.get("next_offset")) or 0,
            data=base64.b64decode(str(data.get("data") or "")),
            dropped_bytes=_int(data.get("dropped_bytes")) or 0,
            eof=bool(data.get("eof")),
        )

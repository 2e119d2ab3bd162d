"""The ``scaibunker`` command line, a thin shell over :class:`scaigrid.client.Client`.

Usage::

    scaibunker [--host URL] [--api-key KEY] [--timeout S] COMMAND ...
    scaibunker create [--image debian-12] [--name N] [--cpu M] [--memory MB] [--disk MB]
                      [--env K=V ...] [--label K=V ...] [--wait/--no-wait] [--json]
    scaibunker list [--status S[,S]] [--label K=V ...] [--limit N] [--json]
    scaibunker get BUNKER [--json]
    scaibunker exec BUNKER [--timeout S] [--cwd DIR] [--env K=V ...] [--user user|root]
                    [-i/--stdin] -- CMD [ARGS...]
    scaibunker cp SRC DST            # exactly one side is BUNKER:PATH; '-' is stdin/stdout
    scaibunker ls BUNKER [PATH] [--depth N] [--json]
    scaibunker rm BUNKER PATH [-r]
    scaibunker terminate BUNKER
    scaibunker shell BUNKER [--user user|root] [--command CMD] [--session shs_...]
    scaibunker images [--status S] [--json]
    scaibunker image-register NAME (--oci REF | --tar PATH) [--size-mib N] [--scope S]
                              [--lazy-pull] [--wait/--no-wait] [--timeout S]

``--host`` and ``--api-key`` default to ``$SCAIGRID_HOST`` and ``$SCAIGRID_API_KEY``.

Exit status: 0 on success; 1 for API, connection and local file errors, printed to stderr
as ``error CODE: message``; 2 for usage and configuration errors (``error USAGE: …``); 141,
silently, when the reader of stdout goes away;
``exec`` exits with the command's own status (124 timed out, 137 OOM-killed or SIGKILL,
128+N other signals, 255 agent lost); ``shell`` exits with the remote shell's status (255
when the session was lost). :func:`main` runs the CLI in-process and returns the
status, and :data:`cli` works with :class:`click.testing.CliRunner`.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn, cast

import click

from scaigrid import __version__
from scaigrid.client._io import DownloadTarget, UploadData
from scaigrid.client.client import Client
from scaigrid.client.errors import ConfigurationError, ScaiGridAPIError, ScaiGridClientError
from scaigrid.client.models import (
    Bunker,
    ExecResult,
    FileEntry,
    GuestUser,
    Image,
    LifecycleMode,
    NetworkProfile,
)
from scaigrid.client.shell_cli import shell_command

EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE, as a shell reports a process killed by writing to a closed pipe."""
DEFAULT_IMAGE = "debian-12"
CREATE_WAIT_S = 30
"""Seconds the server holds a ``create --wait`` answer before the CLI starts polling."""

_REMOTE = re.compile(r"^(?P<bunker>[A-Za-z0-9][A-Za-z0-9_.-]*):(?P<path>.*)$")
_PAIR = re.compile(r"^(?P<key>[^=]+)=(?P<value>.*)$", re.DOTALL)


def _echo_error(code: str, message: str) -> None:
    click.echo(f"error {code}: {message}", err=True)


def _fail_usage(exc: click.UsageError) -> NoReturn:
    """Print a usage error as ``error USAGE: …`` (after the usage line) and exit 2."""
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):
        exc.show()
        raise click.exceptions.Exit(EXIT_USAGE)
    if exc.ctx is not None:
        click.echo(exc.ctx.get_usage(), err=True)
    _echo_error("USAGE", exc.format_message())
    if exc.ctx is not None:
        click.echo(f"Try '{exc.ctx.command_path} --help' for help.", err=True)
    raise click.exceptions.Exit(EXIT_USAGE)


def _report(exc: ScaiGridClientError) -> int:
    """Print ``exc`` (with validation details, one per line) and return the exit status."""
    _echo_error(exc.code, exc.message)
    if isinstance(exc, ScaiGridAPIError) and isinstance(exc.details, list):
        for detail in exc.details:
            if isinstance(detail, dict) and "message" in detail:
                click.echo(f"  {detail.get('field', '-')}: {detail['message']}", err=True)
    return EXIT_USAGE if isinstance(exc, ConfigurationError) else EXIT_API_ERROR


def _silence_stdout() -> None:
    """Point stdout at /dev/null once its reader has gone (``… | head``), so the final flush
    at exit does not fail a second time (Python docs, "Note on SIGPIPE")."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


class _Command(click.Command):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            _fail_usage(exc)


class _Group(click.Group):
    """Turns every error into ``error CODE: message`` plus an exit status."""

    command_class = _Command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            _fail_usage(exc)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            _fail_usage(exc)
        except ScaiGridClientError as exc:
            ctx.exit(_report(exc))
        except BrokenPipeError:
            _silence_stdout()
            ctx.exit(EXIT_BROKEN_PIPE)
        except OSError as exc:
            target = f": {exc.filename}" if exc.filename else ""
            _echo_error("LOCAL_ERROR", f"{exc.strerror or exc}{target}")
            ctx.exit(EXIT_API_ERROR)


@dataclass
class _Session:
    """Global options; the client is built on first use so ``--help`` needs no host."""

    host: str | None
    api_key: str | None
    timeout_s: float
    _client: Client | None = field(default=None, repr=False)

    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.host, self.api_key, timeout_s=self.timeout_s)
            click.get_current_context().call_on_close(self._client.close)
        return self._client


def _client() -> Client:
    return cast(_Session, click.get_current_context().find_root().obj).client()


def _pairs(_ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> dict[str, str]:
    """Parse repeated ``K=V`` options into a dict (later keys win)."""
    pairs: dict[str, str] = {}
    for value in values:
        match = _PAIR.match(value)
        if match is None:
            raise click.BadParameter(f"expected K=V, got {value!r}", param=param)
        pairs[match["key"]] = match["value"]
    return pairs


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [
        ["-" if c is None or c == "" else str(c) for c in row] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _time(value: Any) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else "-"


def _print_bunker(bunker: Bunker) -> None:
    reason = f" ({bunker.status_reason})" if bunker.status_reason else ""
    message = bunker.raw.get("status_message")
    lines = {
        "id": bunker.id,
        "name": bunker.name or "-",
        "status": f"{bunker.status}{reason}" + (f": {message}" if message else ""),
        "image": f"{bunker.image or '-'} ({bunker.image_id or '-'})",
        "lifecycle": bunker.lifecycle_mode or "-",
        "network": bunker.network_profile or "-",
        "cpu_millicores": bunker.cpu_millicores,
        "memory_mb": bunker.memory_mb,
        "disk_mb": bunker.disk_mb,
        "labels": ", ".join(f"{k}={v}" for k, v in sorted(bunker.label_set.items())) or "-",
        "env": ", ".join(sorted(bunker.env_vars)) or "-",
        "worker": bunker.worker_id or "-",
        "created_at": _time(bunker.created_at),
        "started_at": _time(bunker.started_at),
        "expires_at": _time(bunker.expires_at),
        "ended_at": _time(bunker.ended_at),
    }
    width = max(len(key) for key in lines)
    for key, value in lines.items():
        click.echo(f"{key.ljust(width)}  {'-' if value is None else value}")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", envvar="SCAIGRID_HOST", metavar="URL", help="ScaiGrid base URL.")
@click.option("--api-key", envvar="SCAIGRID_API_KEY", metavar="KEY", help="API key or JWT.")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds to wait for each answer (exec extends it by its own timeout).",
)
@click.version_option(__version__, prog_name="scaibunker")
@click.pass_context
def cli(ctx: click.Context, host: str | None, api_key: str | None, timeout_s: float) -> None:
    """Create, use and remove ScaiBunker sandboxes."""
    ctx.obj = _Session(host, api_key, timeout_s)


@cli.command()
@click.option("--image", default=DEFAULT_IMAGE, show_default=True, help="Image name or id.")
@click.option("--name", help="Human-readable name.")
@click.option("--cpu", "cpu_millicores", type=int, help="CPU in millicores (1000 = 1 vCPU).")
@click.option("--memory", "memory_mb", type=int, help="Memory in MiB.")
@click.option("--disk", "disk_mb", type=int, help="Writable disk in MiB.")
@click.option("--env", multiple=True, metavar="K=V", callback=_pairs, help="Environment.")
@click.option("--label", multiple=True, metavar="K=V", callback=_pairs, help="Label.")
@click.option("--lifecycle", type=click.Choice(["ephemeral", "session", "persistent"]))
@click.option(
    "--network",
    type=click.Choice(["isolated", "registry", "allowlisted", "unrestricted", "transit"]),
)
@click.option("--allow", multiple=True, metavar="HOST", help="Allowlist entry (allowlisted).")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for running.")
@click.option("--wait-timeout", type=float, default=120.0, show_default=True, help="Seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole bunker as JSON.")
def create(
    image: str,
    name: str | None,
    cpu_millicores: int | None,
    memory_mb: int | None,
    disk_mb: int | None,
    env: dict[str, str],
    label: dict[str, str],
    lifecycle: str | None,
    network: str | None,
    allow: tuple[str, ...],
    wait: bool,
    wait_timeout: float,
    as_json: bool,
) -> None:
    """Create a bunker and print its id."""
    client = _client()
    bunker = client.bunkers.create(
        image,
        wait_s=CREATE_WAIT_S if wait else None,
        name=name,
        cpu_millicores=cpu_millicores,
        memory_mb=memory_mb,
        disk_mb=disk_mb,
        env_vars=env or None,
        label_set=label or None,
        lifecycle_mode=cast(LifecycleMode | None, lifecycle),
        network_profile=cast(NetworkProfile | None, network),
        network_allowlist=list(allow) or None,
    )
    if wait and bunker.status != "running":
        bunker = client.bunkers.wait_running(bunker.id, wait_timeout)
    if as_json:
        _print_json(bunker.raw)
    else:
        click.echo(bunker.id)


@cli.command("list")
@click.option("--status", help="State, or several separated by commas.")
@click.option("--label", multiple=True, metavar="K=V", callback=_pairs, help="Label filter.")
@click.option("--limit", type=click.IntRange(min=1), help="Show at most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def list_bunkers(
    status: str | None, label: dict[str, str], limit: int | None, as_json: bool
) -> None:
    """List bunkers, newest first."""
    statuses = [s for s in (status or "").split(",") if s] or None
    bunkers = _client().bunkers.list(status=statuses, label=label or None, limit=limit)
    if as_json:
        _print_json([b.raw for b in bunkers])
        return
    _print_table(
        ["ID", "NAME", "IMAGE", "STATUS", "CPU_M", "MEM_MB", "DISK_MB", "CREATED"],
        (
            [
                b.id,
                b.name,
                b.image,
                b.status,
                b.cpu_millicores,
                b.memory_mb,
                b.disk_mb,
                _time(b.created_at),
            ]
            for b in bunkers
        ),
    )


@cli.command()
@click.argument("bunker")
@click.option("--json", "as_json", is_flag=True, help="Print the whole bunker as JSON.")
def get(bunker: str, as_json: bool) -> None:
    """Show one bunker."""
    found = _client().bunkers.get(bunker)
    if as_json:
        _print_json(found.raw)
    else:
        _print_bunker(found)


def _exec_note(result: ExecResult, timeout_s: int | None) -> str | None:
    if result.status == "timed_out":
        limit = f" after {timeout_s} s" if timeout_s else ""
        return f"command timed out{limit} and was killed"
    if result.status == "oom_killed":
        return "command was killed by the out-of-memory killer"
    if result.status == "signaled":
        return f"command was killed by {result.signal}"
    if result.status == "agent_lost":
        return "lost contact with the bunker's agent; the command's outcome is unknown"
    return None


@cli.command("exec")
@click.argument("bunker")
@click.argument("command", nargs=-1, required=True, metavar="[--] CMD [ARGS]...")
@click.option("--timeout", "timeout_s", type=click.IntRange(min=1), help="Seconds.")
@click.option("--cwd", help="Working directory (relative to /home/user).")
@click.option("--env", multiple=True, metavar="K=V", callback=_pairs, help="Environment.")
@click.option("--user", type=click.Choice(["user", "root"]), default="user", show_default=True)
@click.option("-i", "--stdin", "use_stdin", is_flag=True, help="Send this process's stdin.")
@click.pass_context
def exec_(
    ctx: click.Context,
    bunker: str,
    command: tuple[str, ...],
    timeout_s: int | None,
    cwd: str | None,
    env: dict[str, str],
    user: str,
    use_stdin: bool,
) -> None:
    """Run CMD in BUNKER and exit with its status.

    Several words form an argv; a single word runs through /bin/sh -c. Put the command
    after -- when it has options of its own. Output is copied byte for byte.
    """
    stdin = sys.stdin.buffer.read() if use_stdin else None
    result = _client().bunkers.exec(
        bunker,
        command[0] if len(command) == 1 else list(command),
        timeout_s=timeout_s,
        cwd=cwd,
        env=env or None,
        stdin=stdin,
        user=cast(GuestUser, user),
    )
    for data, stream, truncated, name in (
        (result.stdout, sys.stdout, result.stdout_truncated, "stdout"),
        (result.stderr, sys.stderr, result.stderr_truncated, "stderr"),
    ):
        stream.flush()
        stream.buffer.write(data)
        stream.buffer.flush()
        if truncated:
            click.echo(f"scaibunker: {name} was truncated by the server (middle omitted)", err=True)
    note = _exec_note(result, timeout_s)
    if note is not None:
        click.echo(f"scaibunker: {note}", err=True)
    ctx.exit(result.shell_exit_code)


@dataclass(frozen=True)
class _Remote:
    bunker: str
    path: str


def _remote(spec: str) -> _Remote | None:
    """``BUNKER:PATH`` → :class:`_Remote`; anything with ``/`` before the first ``:`` (or no
    ``:``) is a local path, so ``./a:b`` names a local file."""
    match = _REMOTE.match(spec)
    if match is None:
        return None
    if not match["path"]:
        raise click.UsageError(f"{spec!r} has an empty bunker path")
    return _Remote(match["bunker"], match["path"])


def _upload(src: str, dst: _Remote, mode: int, user: str) -> None:
    path = dst.path
    if src == "-":
        if path.endswith("/"):
            raise click.UsageError("uploading stdin needs a file name, not a directory")
        _client().files.write(dst.bunker, path, sys.stdin.buffer, mode, user=cast(GuestUser, user))
        return
    local = Path(src)
    if local.is_dir():
        raise click.UsageError(f"{src} is a directory; only files can be copied")
    if path.endswith("/"):
        path += local.name
    _client().files.write(dst.bunker, path, local, mode, user=cast(GuestUser, user))


def _download(src: _Remote, dst: str, user: str) -> None:
    if src.path.endswith("/"):
        raise click.UsageError(f"{src.path} names a directory; only files can be copied")
    if dst == "-":
        _client().files.download(
            src.bunker, src.path, sys.stdout.buffer, user=cast(GuestUser, user)
        )
        return
    local = Path(dst)
    if dst.endswith(("/", os.sep)) or local.is_dir():
        local = local / PurePosixPath(src.path).name
    _client().files.download(src.bunker, src.path, local, user=cast(GuestUser, user))


def _octal(_ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o7777:
        raise click.BadParameter(f"expected an octal mode such as 0644, got {value!r}", param=param)
    return mode


@cli.command()
@click.argument("src")
@click.argument("dst")
@click.option("--mode", default="0644", show_default=True, callback=_octal, help="Upload mode.")
@click.option("--user", type=click.Choice(["user", "root"]), default="user", show_default=True)
def cp(src: str, dst: str, mode: int, user: str) -> None:
    """Copy a file into or out of a bunker, streamed.

    Exactly one of SRC and DST is BUNKER:PATH. A local side of '-' means stdin or stdout;
    a destination ending in '/' (or a local directory) keeps the source's file name.
    """
    source, target = _remote(src), _remote(dst)
    if (source is None) == (target is None):
        raise click.UsageError("exactly one of SRC and DST must be BUNKER:PATH")
    if target is not None:
        _upload(src, target, mode, user)
    else:
        _download(cast(_Remote, source), dst, user)


@cli.command("tar")
@click.argument("src")
@click.argument("dst")
@click.option("--user", type=click.Choice(["user", "root"]), default="user", show_default=True)
def tar_(src: str, dst: str, user: str) -> None:
    """Copy a directory into or out of a bunker as a tar stream.

    Exactly one of SRC and DST is BUNKER:DIR. Out of a bunker, DST is the tar file to
    write ('-' for stdout). Into a bunker, SRC is a local directory (its contents are
    packed on the fly), a tar file (plain, gzip, bzip2 or xz) or '-' for stdin, and DIR is
    created if missing. Members that would land outside DIR are refused.
    """
    source, target = _remote(src), _remote(dst)
    if (source is None) == (target is None):
        raise click.UsageError("exactly one of SRC and DST must be BUNKER:DIR")
    guest_user = cast(GuestUser, user)
    if target is not None:
        data: UploadData = sys.stdin.buffer if src == "-" else Path(src)
        result = _client().files.upload_archive(target.bunker, target.path, data, user=guest_user)
        click.echo(
            f"{result.get('entries', 0)} entries, {result.get('bytes', 0)} bytes"
            f" extracted to {result.get('path', target.path)}"
        )
        return
    remote = cast(_Remote, source)
    out: DownloadTarget = sys.stdout.buffer if dst == "-" else Path(dst)
    _client().files.download_archive(remote.bunker, remote.path, out, user=guest_user)


def _entry_line(entry: FileEntry, depth: int) -> list[str]:
    kind = entry.get("type", "other")
    type_bits = {"dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "file": stat.S_IFREG}.get(kind, 0)
    try:
        perms = stat.filemode(type_bits | int(entry.get("mode", "0"), 8))
    except ValueError:
        perms = "?"
    name = entry.get("path", "") if depth > 1 else entry.get("name", "")
    if kind == "dir":
        name += "/"
    elif kind == "symlink" and entry.get("symlink_target"):
        name += f" -> {entry.get('symlink_target')}"
    return [perms, str(entry.get("size", "-")), str(entry.get("mtime", "-")), name]


@cli.command()
@click.argument("bunker")
@click.argument("path", default=".")
@click.option("--depth", type=click.IntRange(1, 10), default=1, show_default=True)
@click.option("--user", type=click.Choice(["user", "root"]), default="user", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
def ls(bunker: str, path: str, depth: int, user: str, as_json: bool) -> None:
    """List a directory in a bunker (default: /home/user)."""
    entries = _client().files.list(bunker, path, depth, user=cast(GuestUser, user))
    if as_json:
        _print_json(entries)
        return
    _print_table(["MODE", "SIZE", "MTIME", "NAME"], (_entry_line(e, depth) for e in entries))


@cli.command()
@click.argument("bunker")
@click.argument("path")
@click.option("-r", "--recursive", is_flag=True, help="Delete directories and their contents.")
@click.option("--user", type=click.Choice(["user", "root"]), default="user", show_default=True)
def rm(bunker: str, path: str, recursive: bool, user: str) -> None:
    """Delete a file (or, with -r, a directory) in a bunker."""
    _client().files.delete(bunker, path, recursive, user=cast(GuestUser, user))


@cli.command()
@click.argument("bunker")
def terminate(bunker: str) -> None:
    """Terminate a bunker; prints its id and status."""
    ended = _client().bunkers.terminate(bunker)
    click.echo(f"{ended.id}\t{ended.status}")


@cli.command()
@click.option("--status", help="pending, baking, ready, failed or deactivated.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def images(status: str | None, as_json: bool) -> None:
    """List the images bunkers can boot from."""
    found: list[Image] = list(_client().images.list(status=status))
    if as_json:
        _print_json([i.raw for i in found])
        return
    _print_table(
        ["ID", "NAME", "SCOPE", "STATUS", "SIZE_MIB", "CREATED"],
        ([i.id, i.name, i.scope, i.status, i.size_mib, _time(i.created_at)] for i in found),
    )


#: Seconds between two polls of a baking image.
BAKE_POLL_S = 0.5
#: Progress-bar steps of a bake: registered → baking → ready; warm workers add one each.
_BAKE_STEPS = {"pending": 0, "baking": 1, "ready": 2}


@cli.command("image-register")
@click.argument("name")
@click.option("--oci", "oci_ref", help="OCI reference, e.g. docker.io/library/python:3.12-slim.")
@click.option("--tar", "tar_path", help="Root-filesystem tarball on the baking worker.")
@click.option("--size-mib", type=int, help="ext4 size in MiB (64-65536).")
@click.option("--scope", type=click.Choice(["tenant", "partner", "platform"]), help="Scope.")
@click.option("--lazy-pull", is_flag=True, help="Let workers pull the image on demand.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the bake.")
@click.option("--timeout", "timeout_s", type=float, default=1800.0, show_default=True)
def image_register(
    name: str,
    oci_ref: str | None,
    tar_path: str | None,
    size_mib: int | None,
    scope: str | None,
    lazy_pull: bool,
    wait: bool,
    timeout_s: float,
) -> None:
    """Register an image; with --wait show the bake (and warm-up) as a progress bar on stderr.

    Prints the image id and its final status; a failed bake exits 1 with the reason.
    """
    if (oci_ref is None) == (tar_path is None):
        raise click.UsageError("give exactly one of --oci and --tar")
    source = {"kind": "oci", "ref": oci_ref} if oci_ref else {"kind": "tar", "path": tar_path}
    fields: dict[str, Any] = {"lazy_pull": lazy_pull}
    if size_mib is not None:
        fields["size_mib"] = size_mib
    if scope is not None:
        fields["scope"] = scope
    client = _client()
    image = client.images.register(name, source, **fields)
    if wait:
        image = _follow_bake(client, image, timeout_s)
    click.echo(f"{image.id}\t{image.status}")
    if image.status == "failed":
        _echo_error("BAKE_FAILED", image.status_reason or "the bake failed")
        raise click.exceptions.Exit(EXIT_API_ERROR)


def _bake_position(image: Image) -> tuple[int, int]:
    warm = image.warm or {}
    workers = sum(int(v) for v in warm.values())
    settled = int(warm.get("ready", 0)) + int(warm.get("failed", 0))
    return _BAKE_STEPS.get(image.status, 2) + settled, 2 + workers


def _follow_bake(client: Client, image: Image, timeout_s: float) -> Image:
    """Poll ``image`` until it is ready (and warm) or failed, drawing a progress bar."""
    deadline = time.monotonic() + timeout_s
    done, total = _bake_position(image)
    with click.progressbar(
        length=total, label=f"baking {image.name}", file=sys.stderr, show_pos=True
    ) as bar:
        shown = 0
        while True:
            done, total = _bake_position(image)
            bar.length = total
            if done > shown:
                bar.update(done - shown)
                shown = done
            finished = image.status in ("failed", "deactivated") or (
                image.status == "ready" and int(image.warm.get("queued", 0)) == 0
            )
            if finished or time.monotonic() > deadline:
                return image
            time.sleep(BAKE_POLL_S)
            image = client.images.get(image.id)


cli.add_command(shell_command)


def main(args: Sequence[str] | None = None) -> int:
    """Run ``scaibunker`` with ``args`` (default ``sys.argv[1:]``) and return its exit status.

    Never calls :func:`sys.exit`, so tests and other tools can call it in-process.
    """
    try:
        result = cli.main(args=args, prog_name="scaibunker", standalone_mode=False)
    except click.exceptions.Abort:
        _echo_error("INTERRUPTED", "aborted")
        return EXIT_INTERRUPTED
    except click.ClickException as exc:
        _echo_error("USAGE", exc.format_message())
        return exc.exit_code
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())

"""OCI image source: pull from a registry (skopeo), check every layer, unpack (umoci).

Pipeline for ``{"kind": "oci", "ref": "registry/repo:tag"}`` (SPEC §7.2, HOST-NOTES §5):

1. :func:`resolve_digest` reads the raw manifest (or manifest list / OCI index) the reference
   names with ``skopeo inspect --raw`` and pins it: ``sha256`` of those exact bytes, the digest
   the registry serves under (Docker Registry HTTP API v2, "Content Digests").
2. :func:`pull` copies ``repo@digest`` into an OCI layout with ``skopeo copy``, choosing
   ``linux/amd64`` from a list or index (``--override-os/--override-arch``). skopeo speaks the
   registry protocol (bearer-token auth included) and verifies every blob against its digest,
   so a layer whose bytes do not match fails the pull.
3. :func:`check_layout_layers` streams every layer of the pulled manifest and refuses the image
   when a member has an absolute name or a ``..`` component, is a device node, is a symlink
   whose target leaves the root, or is a hard link that climbs out. umoci would otherwise
   clamp such paths silently (or, as root, create the device).
4. :func:`unpack` applies the layers in order with ``umoci unpack`` as root, which handles
   whiteouts (``.wh.<name>``) and opaque directories (``.wh..wh..opq``) and keeps owners,
   modes and extended attributes exactly.

Registries are reached over HTTPS with certificate checks, except the hosts named in
``insecure_hosts`` (plain HTTP, for a local test registry). Pulls are anonymous unless the
worker's operator gives an ``auth_file`` (containers-auth.json(5), the format of ``skopeo
login`` / ``docker login``): then skopeo presents the credentials it holds for the registry.
Tenants never supply credentials (SPEC §7.2).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import posixpath
import re
import subprocess
import tarfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, cast

import structlog

from scaigrid.worker.rootfs.commands import CommandError, run_command
from scaigrid.worker.rootfs.errors import ImageBuildError, UnsafeArchiveError

log = structlog.get_logger()

#: ``host[:port]/path[:tag][@sha256:hex]`` — the subset of the distribution reference grammar
#: accepted here (lower-case repository paths, no leading ``-`` anywhere).
_REFERENCE = re.compile(
    r"^(?P<name>[a-z0-9][a-z0-9._-]*(?::[0-9]{1,5})?(?:/[a-z0-9][a-z0-9._-]*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
_LAYOUT_TAG = "image"
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class OciReference:
    """A parsed, fully qualified image reference.

    Args:
        ref: ``[registry/]repo[:tag][@sha256:…]``. A name without a registry host means
            Docker Hub (``docker.io``, ``library/`` for single-component names); no tag and no
            digest means ``latest``.

    Raises:
        ImageBuildError: ``ref`` is not a valid reference.
    """

    def __init__(self, ref: str) -> None:
        match = _REFERENCE.match(ref) if len(ref) <= 512 else None
        if match is None:
            raise ImageBuildError(f"{ref!r} is not a valid OCI image reference")
        name = match["name"]
        first, _, rest = name.partition("/")
        if not rest or ("." not in first and ":" not in first and first != "localhost"):
            name = f"docker.io/{name}" if rest else f"docker.io/library/{name}"
        self.host = name.split("/", 1)[0]
        self.repository = name
        self.tag = match["tag"] or ("latest" if match["digest"] is None else None)
        self.digest: str | None = match["digest"]

    def transport(self, *, digest: str | None = None) -> str:
        """The ``docker://`` reference skopeo takes, pinned to ``digest`` when given."""
        if digest or self.digest:
            return f"docker://{self.repository}@{digest or self.digest}"
        return f"docker://{self.repository}:{self.tag}"


def _tls_flag(ref: OciReference, insecure_hosts: Collection[str], flag: str) -> list[str]:
    return [f"--{flag}=false"] if ref.host in insecure_hosts else []


def _auth_flag(auth_file: Path | None) -> list[str]:
    return ["--authfile", str(auth_file)] if auth_file is not None else []


def _registry_reason(exc: CommandError) -> str:
    """The registry's own words from a failed skopeo run (its last stderr line)."""
    if exc.result is None:
        return str(exc)
    lines = (exc.result.stderr.strip() or exc.result.stdout.strip()).splitlines()
    text = lines[-1] if lines else str(exc)
    text = re.sub(r'^time="[^"]*" level=\w+ msg="(.*)"$', r"\1", text)
    return text[:500]


async def resolve_digest(
    ref: OciReference,
    *,
    insecure_hosts: Collection[str] = (),
    auth_file: Path | None = None,
    timeout_s: float = 120.0,
) -> str:
    """Pin ``ref`` to the ``sha256:<hex>`` of the manifest (or list/index) it names now.

    Raises:
        ImageBuildError: the registry refused, the reference does not exist, the deadline
            passed, or a digest-pinned reference does not match what the registry serves.
    """
    argv = [
        "skopeo",
        "--command-timeout",
        f"{int(timeout_s)}s",
        "inspect",
        "--raw",
        "--retry-times",
        "2",
        *_tls_flag(ref, insecure_hosts, "tls-verify"),
        *_auth_flag(auth_file),
        ref.transport(),
    ]
    try:
        result = await run_command(*argv, timeout_s=timeout_s + 5)
    except CommandError as exc:
        raise ImageBuildError(
            f"cannot read {ref.transport()[9:]}: {_registry_reason(exc)}"
        ) from exc
    digest = (
        "sha256:" + hashlib.sha256(result.stdout.encode("utf-8", "surrogateescape")).hexdigest()
    )
    if ref.digest is not None and ref.digest != digest:
        raise ImageBuildError(f"registry served manifest {digest}, not the pinned {ref.digest}")
    return digest


async def pull(
    ref: OciReference,
    digest: str,
    layout: Path,
    *,
    insecure_hosts: Collection[str] = (),
    auth_file: Path | None = None,
    timeout_s: float = 1800.0,
    retries: int = 2,
) -> None:
    """Copy ``ref@digest`` (linux/amd64) into the OCI layout directory ``layout``.

    Args:
        ref: the reference (only its repository and host are used).
        digest: manifest digest from :func:`resolve_digest`.
        layout: directory for the OCI layout (created by skopeo).
        insecure_hosts: registry hosts reached over plain HTTP.
        auth_file: containers-auth.json with registry credentials (anonymous when ``None``).
        timeout_s: deadline of the whole copy; a registry that stalls is cut off here.
        retries: skopeo's retries of a failed request.

    Raises:
        ImageBuildError: the registry refused, a blob did not match its digest, or the
            deadline passed.
    """
    argv = [
        "skopeo",
        "--override-os",
        "linux",
        "--override-arch",
        "amd64",
        "--command-timeout",
        f"{int(timeout_s)}s",
        "copy",
        "--quiet",
        "--retry-times",
        str(retries),
        *_tls_flag(ref, insecure_hosts, "src-tls-verify"),
        *_auth_flag(auth_file),
        ref.transport(digest=digest),
        f"oci:{layout}:{_LAYOUT_TAG}",
    ]
    try:
        await run_command(*argv, timeout_s=timeout_s + 5)
    except CommandError as exc:
        raise ImageBuildError(
            f"pulling {ref.repository}@{digest} failed (deadline {timeout_s:g} s, "
            f"{retries} retries): {_registry_reason(exc)}"
        ) from exc
    log.info("rootfs.oci_pulled", repository=ref.repository, digest=digest)


def _read_json(layout: Path, digest: str) -> dict[str, Any]:
    data = json.loads(_blob_path(layout, digest).read_bytes())
    if not isinstance(data, dict):
        raise ImageBuildError(f"blob {digest} is not a JSON object")
    return data


def _blob_path(layout: Path, digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    if algorithm != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
        raise ImageBuildError(f"unsupported blob digest {digest!r}")
    return layout / "blobs" / "sha256" / hexdigest


def layer_digests(layout: Path) -> list[str]:
    """Digests of the layers of the layout's single image, bottom first.

    Raises:
        ImageBuildError: the layout does not hold exactly one image manifest.
    """
    index = json.loads((layout / "index.json").read_text())
    manifests = index.get("manifests") or []
    if len(manifests) != 1:
        raise ImageBuildError(f"expected one manifest in the pulled layout, found {len(manifests)}")
    manifest = _read_json(layout, str(manifests[0]["digest"]))
    return [str(layer["digest"]) for layer in manifest.get("layers") or []]


@contextmanager
def _open_layer(path: Path) -> Iterator[IO[bytes]]:
    with path.open("rb") as raw:
        magic = raw.read(4)
        raw.seek(0)
        if magic[:2] == _GZIP_MAGIC:
            with gzip.GzipFile(fileobj=raw) as stream:
                yield cast(IO[bytes], stream)
        elif magic == _ZSTD_MAGIC:
            with subprocess.Popen(
                ["zstd", "-dcq"], stdin=raw, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
            ) as proc:
                assert proc.stdout is not None
                try:
                    yield proc.stdout
                finally:
                    proc.kill()
        else:
            yield raw


def check_member(member: tarfile.TarInfo) -> None:
    """Refuse a layer member that could leave the root or create a device.

    Raises:
        UnsafeArchiveError: absolute name, ``..`` component, device node, symlink whose
            target leaves the root, or hard link whose target is absolute or climbs.
    """
    name = member.name
    if name.startswith("/"):
        raise UnsafeArchiveError(name, "absolute path")
    if ".." in name.split("/"):
        raise UnsafeArchiveError(name, "'..' component")
    if member.ischr() or member.isblk():
        raise UnsafeArchiveError(name, "device node")
    if member.issym():
        target = member.linkname
        base = "" if target.startswith("/") else posixpath.dirname(posixpath.normpath(name))
        resolved = posixpath.normpath(posixpath.join(base, target.lstrip("/")) or ".")
        if resolved == ".." or resolved.startswith("../"):
            raise UnsafeArchiveError(name, "symlink target leaves the root")
    if member.islnk():
        target = member.linkname
        if target.startswith("/") or ".." in target.split("/"):
            raise UnsafeArchiveError(name, "hard link target is absolute or climbs with '..'")


def check_layout_layers(layout: Path) -> int:
    """Check every member of every layer in ``layout`` with :func:`check_member`.

    Blocking (reads every layer): call it from a thread.

    Returns:
        The number of members checked.

    Raises:
        UnsafeArchiveError: a member is unsafe (the message names the layer's member).
        ImageBuildError: a layer is not a readable tar stream.
    """
    count = 0
    for digest in layer_digests(layout):
        try:
            with (
                _open_layer(_blob_path(layout, digest)) as stream,
                tarfile.open(fileobj=stream, mode="r|") as archive,
            ):
                for member in archive:
                    check_member(member)
                    count += 1
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ImageBuildError(f"layer {digest} is not a readable tar stream: {exc}") from exc
    return count


async def unpack(layout: Path, bundle: Path, *, timeout_s: float = 1800.0) -> Path:
    """Apply the layout's layers into ``bundle/rootfs`` with ``umoci unpack`` (as root).

    Returns:
        ``bundle/rootfs``.

    Raises:
        ImageBuildError: umoci failed (for instance a blob that does not match its digest)
            or ran past the deadline.
    """
    try:
        await run_command(
            "umoci",
            "unpack",
            "--image",
            f"{layout}:{_LAYOUT_TAG}",
            str(bundle),
            timeout_s=timeout_s,
        )
    except CommandError as exc:
        raise ImageBuildError(f"unpacking the image layers failed: {exc}") from exc
    return bundle / "rootfs"

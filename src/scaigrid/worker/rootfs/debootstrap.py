"""Build a Debian root tree with ``debootstrap`` from the host's configured apt mirror.

The mirror is never hard-coded: it is read from apt's own sources (``/etc/apt/sources.list``
and ``/etc/apt/sources.list.d/*.list`` in one-line format, ``*.sources`` in deb822 format,
https://manpages.debian.org/bookworm/apt/sources.list.5.en.html), preferring an entry that
lists the requested suite, else the first main-archive entry (a suite without ``-``, so not
``-security`` or ``-updates``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import structlog

from scaigrid.worker.rootfs.commands import CommandError, run_command
from scaigrid.worker.rootfs.errors import ImageBuildError

log = structlog.get_logger()

_SUITE_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{0,63}$")
_VARIANT_RE = re.compile(r"^[a-z][a-z-]{0,31}$")
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]{0,127}$")

APT_DIR = Path("/etc/apt")


@dataclass(frozen=True)
class AptSource:
    """One ``deb`` entry of the host's apt configuration.

    Attributes:
        uri: archive root, e.g. ``http://deb.debian.org/debian``.
        suites: suites the entry lists, e.g. ``("bookworm", "bookworm-updates")``.
    """

    uri: str
    suites: tuple[str, ...]


def _one_line_sources(text: str) -> list[AptSource]:
    found: list[AptSource] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        line = re.sub(r"\[[^\]]*\]", " ", line)
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "deb":
            found.append(AptSource(uri=parts[1], suites=(parts[2],)))
    return found


def _deb822_sources(text: str) -> list[AptSource]:
    found: list[AptSource] = []
    for paragraph in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for raw in paragraph.splitlines():
            if raw.startswith("#") or not raw.strip():
                continue
            if raw[0] in " \t" and key:
                fields[key] += " " + raw.strip()
            elif ":" in raw:
                key, value = raw.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        suites = tuple(fields.get("suites", "").split())
        found.extend(AptSource(uri=uri, suites=suites) for uri in fields.get("uris", "").split())
    return found


def apt_sources(apt_dir: Path = APT_DIR) -> list[AptSource]:
    """Return the host's ``deb`` sources in apt's reading order.

    Args:
        apt_dir: apt's configuration directory.
    """
    found: list[AptSource] = []
    main = apt_dir / "sources.list"
    if main.is_file():
        found += _one_line_sources(main.read_text())
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".list":
                found += _one_line_sources(path.read_text())
            elif path.suffix == ".sources":
                found += _deb822_sources(path.read_text())
    return found


def find_mirror(suite: str, apt_dir: Path = APT_DIR) -> str:
    """Pick the archive URI debootstrap should use for ``suite``.

    Raises:
        ImageBuildError: the host has no usable ``deb`` source.
    """
    sources = [
        s for s in apt_sources(apt_dir) if s.uri.startswith(("http://", "https://", "file:"))
    ]
    for source in sources:
        if suite in source.suites:
            return source.uri
    for source in sources:
        if any("-" not in s and "/" not in s for s in source.suites):
            return source.uri
    raise ImageBuildError("the host has no apt source debootstrap could use")


async def run_debootstrap(
    target: Path,
    *,
    suite: str,
    variant: str = "minbase",
    packages: list[str] | tuple[str, ...] = (),
    timeout_s: float = 1800.0,
    apt_dir: Path = APT_DIR,
) -> None:
    """Run ``debootstrap --variant=V --include=P suite target mirror`` (as root).

    Args:
        target: empty directory to build the tree in.
        suite: e.g. ``bookworm``.
        variant: debootstrap variant, e.g. ``minbase`` or ``buildd``.
        packages: extra packages to include.
        timeout_s: deadline; the whole debootstrap process group is killed past it.
        apt_dir: apt configuration directory the mirror is read from.

    Raises:
        ImageBuildError: bad arguments, no mirror, debootstrap failed or timed out; the
            message carries the tail of debootstrap's output. ``target`` is left as is; it
            holds no mounts (debootstrap runs in its own mount namespace).
    """
    if not _SUITE_RE.match(suite):
        raise ImageBuildError(f"invalid debootstrap suite {suite!r}")
    if not _VARIANT_RE.match(variant):
        raise ImageBuildError(f"invalid debootstrap variant {variant!r}")
    bad = [p for p in packages if not _PACKAGE_RE.match(p)]
    if bad:
        raise ImageBuildError(f"invalid package names: {', '.join(bad)}")
    mirror = find_mirror(suite, apt_dir)
    # In a container-like host debootstrap bind-mounts the host's /dev/null, /dev/zero, …
    # into the target. A private mount namespace keeps those mounts away from the host:
    # they vanish with debootstrap, so no later chown, shift or delete of the tree can
    # reach a host device node, even when debootstrap is killed half way.
    argv = ["unshare", "--mount", "--propagation", "private", "--"]
    argv += ["debootstrap", f"--variant={variant}"]
    if packages:
        argv.append("--include=" + ",".join(packages))
    argv += [suite, str(target), mirror]
    log.info("rootfs.debootstrap_started", suite=suite, variant=variant, mirror=mirror)
    try:
        result = await run_command(*argv, timeout_s=timeout_s, check=False)
    except CommandError as exc:
        raise ImageBuildError(f"debootstrap {suite}: {exc}") from exc
    if not result.ok:
        raise ImageBuildError(f"debootstrap {suite} failed: {result.describe()}")
    log.info("rootfs.debootstrap_done", suite=suite, target=str(target))

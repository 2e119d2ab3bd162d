"""Make sure an unpacked root tree has the guest user ``user`` (SPEC §3.2, §7.4 step 3).

The guest user is ``user``, uid 1000, gid 1000 (group ``user``), home ``/home/user``, shell
``/bin/bash`` when the image has it, else ``/bin/sh``. When the image already gives uid 1000 to
another account (``ubuntu`` in Ubuntu 24.04 images), that account is renamed to ``user`` so
uid 1000 has one name. The same holds for gid 1000 and group names.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog

from scaigrid.worker.rootfs.errors import ImageBuildError

log = structlog.get_logger()

GUEST_USER = "user"
GUEST_UID = 1000
GUEST_GID = 1000
GUEST_HOME = "/home/user"


def _read_lines(path: Path) -> list[str] | None:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return None


def _write_lines(path: Path, lines: list[str], default_mode: int) -> None:
    """Replace ``path`` atomically, keeping its mode and owner; never follow a symlink."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        mode, owner = default_mode, (0, 0)
    else:
        if not os.path.isfile(path) or os.path.islink(path):
            raise ImageBuildError(f"/etc/{path.name} is not a regular file; refusing to edit it")
        mode, owner = st.st_mode & 0o7777, (st.st_uid, st.st_gid)
    tmp = path.with_name(f".{path.name}.scaibunker-tmp")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(f"{line}\n" for line in lines))
        os.fchown(fh.fileno(), *owner)
        os.fchmod(fh.fileno(), mode)
    os.replace(tmp, path)


def _rename_in_members(fields: list[str], old: str, new: str) -> None:
    members = [new if m == old else m for m in fields[3].split(",") if m]
    fields[3] = ",".join(members)


def _ensure_passwd(etc: Path, shell: str) -> str | None:
    """Add or fix the ``user`` line; return the old name when an account was renamed."""
    lines = _read_lines(etc / "passwd") or ["root:x:0:0:root:/root:/bin/sh"]
    renamed: str | None = None
    by_name = {line.split(":", 1)[0]: i for i, line in enumerate(lines) if ":" in line}
    if GUEST_USER in by_name:
        fields = lines[by_name[GUEST_USER]].split(":")
        if len(fields) != 7 or fields[2] != str(GUEST_UID):
            raise ImageBuildError(f"the image defines {GUEST_USER!r} with a uid other than 1000")
        fields[5] = GUEST_HOME
        lines[by_name[GUEST_USER]] = ":".join(fields)
    else:
        for i, line in enumerate(lines):
            fields = line.split(":")
            if len(fields) == 7 and fields[2] == str(GUEST_UID):
                renamed = fields[0]
                fields[0], fields[5] = GUEST_USER, GUEST_HOME
                lines[i] = ":".join(fields)
                break
        else:
            lines.append(f"{GUEST_USER}:x:{GUEST_UID}:{GUEST_GID}::{GUEST_HOME}:{shell}")
    _write_lines(etc / "passwd", lines, 0o644)
    return renamed


def _ensure_group(etc: Path, renamed_user: str | None) -> None:
    lines = _read_lines(etc / "group") or ["root:x:0:"]
    names = [line.split(":", 1)[0] for line in lines]
    out: list[str] = []
    has_gid = False
    for line in lines:
        fields = line.split(":")
        if len(fields) != 4:
            out.append(line)
            continue
        if renamed_user:
            _rename_in_members(fields, renamed_user, GUEST_USER)
        if fields[2] == str(GUEST_GID):
            has_gid = True
            if fields[0] != GUEST_USER and GUEST_USER not in names:
                fields[0] = GUEST_USER
        elif fields[0] == GUEST_USER:
            raise ImageBuildError(
                f"the image defines group {GUEST_USER!r} with a gid other than 1000"
            )
        out.append(":".join(fields))
    if not has_gid:
        out.append(f"{GUEST_USER}:x:{GUEST_GID}:")
    _write_lines(etc / "group", out, 0o644)


def _ensure_shadow(etc: Path, name: str, renamed: str | None, line: str) -> None:
    lines = _read_lines(etc / name)
    if lines is None:
        return
    fields_of = [entry.split(":") for entry in lines]
    if renamed:
        for fields in fields_of:
            if fields[0] == renamed:
                fields[0] = GUEST_USER
    if not any(fields[0] == GUEST_USER for fields in fields_of):
        fields_of.append(line.split(":"))
    _write_lines(etc / name, [":".join(fields) for fields in fields_of], 0o640)


def _has_bash(root: Path) -> bool:
    """True when ``/bin/bash`` exists in the tree, without following links out of it."""
    if os.path.lexists(root / "usr" / "bin" / "bash") and not (root / "usr").is_symlink():
        return True
    bin_dir = root / "bin"
    return bin_dir.is_dir() and not bin_dir.is_symlink() and os.path.lexists(bin_dir / "bash")


def ensure_guest_user(root: Path) -> None:
    """Create or fix the guest user ``user`` (uid/gid 1000) in the unshifted tree ``root``.

    Edits ``etc/passwd`` and ``etc/group`` (created when missing), ``etc/shadow`` and
    ``etc/gshadow`` when they exist (locked password ``!``), and creates ``home/user``
    (mode 0755, owner 1000:1000). Run it before :func:`shift_tree`. Blocking; call it from a
    thread.

    Args:
        root: the unpacked root filesystem (owners not yet shifted).

    Raises:
        ImageBuildError: the image already defines ``user`` with another uid or gid, or one
            of the account files is a symlink.
    """
    etc = root / "etc"
    if etc.is_symlink():
        raise ImageBuildError("/etc is a symlink; refusing to edit it")
    etc.mkdir(mode=0o755, exist_ok=True)
    shell = "/bin/bash" if _has_bash(root) else "/bin/sh"
    renamed = _ensure_passwd(etc, shell)
    _ensure_group(etc, renamed)
    _ensure_shadow(etc, "shadow", renamed, f"{GUEST_USER}:!:19000:0:99999:7:::")
    _ensure_shadow(etc, "gshadow", renamed, f"{GUEST_USER}:!::")
    home = root / "home"
    if home.is_symlink() or (home / GUEST_USER).is_symlink():
        raise ImageBuildError("/home or /home/user is a symlink; refusing to create the home")
    home.mkdir(mode=0o755, exist_ok=True)
    (home / GUEST_USER).mkdir(mode=0o755, exist_ok=True)
    os.chown(home / GUEST_USER, GUEST_UID, GUEST_GID)
    log.info("rootfs.guest_user", root=str(root), renamed_from=renamed, shell=shell)

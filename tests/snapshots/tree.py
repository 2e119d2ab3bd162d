"""A tree hash for comparing bunker layers and root filesystems in tests."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def tree_hash(root: Path, base: int = 0, skip_xattrs: tuple[str, ...] = ()) -> str:
    """sha256 over every entry under ``root``: relative path, type, mode, owner minus
    ``base``, content digest, link target, device number, xattrs (except ``skip_xattrs``),
    mtime in whole seconds and which names share an inode."""
    lines: list[str] = []
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [".", *sorted(dirnames), *sorted(filenames)]:
            path = os.path.join(dirpath, name) if name != "." else dirpath
            if name == "." and dirpath != str(root):
                continue
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            kind = stat.S_IFMT(st.st_mode)
            extra = ""
            if stat.S_ISREG(st.st_mode):
                extra = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                if st.st_nlink > 1:
                    extra += " link-group=" + inodes.setdefault(st.st_ino, rel)
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = f"dev={st.st_rdev}"
            xattrs = sorted(
                (n, os.getxattr(path, n, follow_symlinks=False).hex())
                for n in os.listxattr(path, follow_symlinks=False)
                if n not in skip_xattrs
            )
            mtime = "" if stat.S_ISDIR(st.st_mode) else str(int(st.st_mtime))
            lines.append(
                f"{rel} {kind:o} {stat.S_IMODE(st.st_mode):o} {st.st_uid - base} "
                f"{st.st_gid - base} {st.st_size} {extra} {xattrs} {mtime}"
            )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()

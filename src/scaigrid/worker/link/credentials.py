"""The worker's long-lived credential on disk (SPEC §10.3).

The controller hands out an ``sbw_`` credential once, in the ``registered`` answer to a
join-token connect; the join token is consumed. The credential is the only way back in,
so it is written atomically (temporary file, fsync, rename, fsync of the directory) with
mode 0600 before the worker relies on it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def load_credential(path: Path) -> str | None:
    """Return the stored credential, or ``None`` when the file does not exist or is empty.

    Raises:
        OSError: the file exists but cannot be read.
    """
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return text or None


def store_credential(path: Path, credential: str) -> None:
    """Atomically replace ``path`` with ``credential``, readable by the owner only (0600).

    Creates the parent directory (0700) if missing.

    Raises:
        OSError: the file could not be written; the old content (if any) is unchanged.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(credential + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

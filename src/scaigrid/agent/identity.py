"""The two guest users an operation can act as (SPEC §3.2, §4.1).

``user`` is uid/gid 1000 with home ``/home/user``; ``root`` is uid/gid 0. Images need
not list either in ``/etc/passwd``: the agent never resolves names through NSS.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

HOME = "/home/user"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Identity(NamedTuple):
    """A guest user.

    Attributes:
        name: ``"user"`` or ``"root"`` (also ``USER``/``LOGNAME`` of execs).
        uid, gid: numeric ids inside the bunker.
        groups: supplementary groups.
        home: ``HOME`` of execs.
    """

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


USER = Identity("user", 1000, 1000, (1000,), HOME)
ROOT = Identity("root", 0, 0, (0,), "/root")
IDENTITIES = {"user": USER, "root": ROOT}


def can_switch() -> bool:
    """True when the agent runs as root and can take on another user's ids."""
    return os.geteuid() == 0


@contextmanager
def acting_as(identity: Identity) -> Iterator[None]:
    """Run the enclosed synchronous syscalls with ``identity``'s effective ids.

    The kernel then checks permissions exactly as for that user. Only the effective
    ids (and supplementary groups) change, so the agent gets root back afterwards.
    Never ``await`` inside: the ids are process-wide. A no-op for root or when the
    agent itself is not root.
    """
    if identity.uid == 0 or not can_switch():
        yield
        return
    saved_groups = os.getgroups()
    os.setgroups(list(identity.groups))
    try:
        os.setegid(identity.gid)
        try:
            os.seteuid(identity.uid)
            try:
                yield
            finally:
                os.seteuid(0)
        finally:
            os.setegid(0)
    finally:
        os.setgroups(saved_groups)

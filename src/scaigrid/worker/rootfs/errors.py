"""Errors raised while building root filesystems."""

from __future__ import annotations


class ImageBuildError(Exception):
    """An image root could not be built; the message is safe to show to the image's owner."""


class UnsafeArchiveError(ImageBuildError):
    """A rootfs archive has a member that could write outside the tree or create a device.

    Attributes:
        member: the offending member's name as stored in the archive.
    """

    def __init__(self, member: str, reason: str) -> None:
        self.member = member
        super().__init__(f"unsafe archive member {member!r}: {reason}")

"""Request shapes of the image routes (SPEC §7.2, §7.4)."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Image states (SPEC §7.1).
ImageStatus = Literal["pending", "baking", "ready", "failed", "deactivated"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_SUITE = re.compile(r"^[a-z][a-z0-9-]*$")
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]*$")
#: ``[host[:port]/]repo[:tag][@sha256:hex]`` (the worker checks the full grammar again).
_OCI_REF = re.compile(
    r"^[a-z0-9][a-z0-9._-]*(?::[0-9]{1,5})?(?:/[a-z0-9][a-z0-9._-]*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TarSource(_Strict):
    """A root-filesystem tarball on the baking worker's disk."""

    kind: Literal["tar"]
    path: str = Field(min_length=1, max_length=4096)

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or "\0" in value:
            raise ValueError("path must be an absolute path on the worker")
        return value


class OciSource(_Strict):
    """An OCI image pulled anonymously from a registry (API v2) by the baking worker."""

    kind: Literal["oci"]
    ref: str = Field(min_length=1, max_length=512)

    @field_validator("ref")
    @classmethod
    def _reference(cls, value: str) -> str:
        if not _OCI_REF.match(value) or "/../" in f"/{value}/":
            raise ValueError("ref must be an image reference like registry/repo:tag[@sha256:…]")
        return value

    def registry_is_internal(self) -> bool:
        """True when the reference names a registry on this host or a private network by
        address (``localhost``, loopback, private, link-local or shared ranges): pulling from
        it makes the worker connect inside the platform's own network."""
        first = self.ref.split("/", 1)[0]
        if "/" not in self.ref or not ("." in first or ":" in first or first == "localhost"):
            return False  # a Docker Hub name such as library/python
        host = first.rsplit(":", 1)[0] if first.count(":") == 1 else first
        host = host.strip("[]").lower()
        if host == "localhost" or host.endswith(".localhost"):
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return not address.is_global


class DebootstrapSource(_Strict):
    """A Debian/Ubuntu root built with debootstrap."""

    kind: Literal["debootstrap"]
    suite: str = Field(min_length=1, max_length=32)
    variant: str = Field(default="minbase", min_length=1, max_length=32)
    packages: list[str] = Field(default_factory=list, max_length=256)

    @field_validator("suite", "variant")
    @classmethod
    def _word(cls, value: str) -> str:
        if not _SUITE.match(value):
            raise ValueError(f"{value!r} is not a valid suite or variant name")
        return value

    @field_validator("packages")
    @classmethod
    def _packages(cls, value: list[str]) -> list[str]:
        for package in value:
            if not _PACKAGE.match(package):
                raise ValueError(f"{package!r} is not a valid Debian package name")
        return value


ImageSource = Annotated[OciSource | TarSource | DebootstrapSource, Field(discriminator="kind")]


class RegisterImageRequest(_Strict):
    """Body of ``POST /images`` (SPEC §7.4)."""

    name: str = Field(min_length=1, max_length=63)
    source: ImageSource
    size_mib: int = Field(default=2048, ge=64, le=65536)
    default_cpu_millicores: int | None = Field(default=None, ge=100)
    default_memory_mb: int | None = Field(default=None, ge=128)
    default_disk_mb: int | None = Field(default=None, ge=64)
    scope: Literal["tenant", "partner", "platform"] = "tenant"
    lazy_pull: bool = False
    bake_worker_id: str | None = Field(default=None, min_length=1, max_length=32)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("name must match [a-z0-9][a-z0-9._-]*")
        return value


class WarmRequest(_Strict):
    """Body of ``POST /images/{id}/warm``: target workers, or groups (default: all groups)."""

    worker_ids: list[str] | None = Field(default=None, max_length=1000)
    availability_group_ids: list[str] | None = Field(default=None, max_length=1000)


class GroupRequest(_Strict):
    """Body of ``POST /availability-groups``."""

    name: str = Field(min_length=1, max_length=63)
    scope: Literal["tenant", "platform"] = "tenant"
    worker_ids: list[str] = Field(default_factory=list, max_length=1000)
    image_ids: list[str] = Field(default_factory=list, max_length=1000)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("name must match [a-z0-9][a-z0-9._-]*")
        return value


class GroupPatch(_Strict):
    """Body of ``PATCH /availability-groups/{id}`` (arrays replace)."""

    name: str | None = Field(default=None, min_length=1, max_length=63)
    worker_ids: list[str] | None = Field(default=None, max_length=1000)
    image_ids: list[str] | None = Field(default=None, max_length=1000)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.match(value):
            raise ValueError("name must match [a-z0-9][a-z0-9._-]*")
        return value

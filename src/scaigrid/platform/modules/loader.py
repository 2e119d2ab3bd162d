"""Finding and loading platform modules (``scaigrid.modules.<name>``).

Rule: a module is present when ``scaigrid.modules.<name>.module`` exists as a file. A present
module is imported and must expose ``MODULE`` satisfying :class:`PlatformModule`; any error
while importing it is a real error and stops the app. An absent module is skipped with a log
line. Only names in :data:`KNOWN_MODULES` are looked for.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Protocol, runtime_checkable

import structlog
from fastapi import APIRouter, FastAPI

log = structlog.get_logger(__name__)

#: Modules the platform looks for, in load (and startup) order.
KNOWN_MODULES: tuple[str, ...] = ("scaibunker",)


@runtime_checkable
class PlatformModule(Protocol):
    """What ``scaigrid.modules.<name>.module.MODULE`` must provide.

    Attributes:
        name: the module id, also its URL segment: routes live under ``/v1/modules/<name>``.
        router: mounted at ``/v1/modules/<name>`` in ``full`` mode.

    Optional: ``config_model`` (a pydantic model class: the module's config keys with their
    global defaults, SPEC §1.10) and ``on_disable`` (see :class:`DisableAwareModule`).
    """

    name: str
    router: APIRouter

    async def startup(self, app: FastAPI) -> None:
        """Start background work; called in the lifespan after migrations and bootstrap."""

    async def shutdown(self, app: FastAPI) -> None:
        """Stop background work; called in reverse load order when the app stops."""


@runtime_checkable
class ProxyCapableModule(PlatformModule, Protocol):
    """A module that can also run in ``bunker_proxy`` mode.

    Attributes:
        proxy_router: mounted instead of ``router`` at ``/v1/modules/<name>`` in
            ``bunker_proxy`` mode; it must not touch the database.
    """

    proxy_router: APIRouter


@runtime_checkable
class DisableAwareModule(PlatformModule, Protocol):
    """A module that must act when it is disabled for a tenant (SPEC §1.10)."""

    async def on_disable(self, app: FastAPI, tenant_id: str) -> None:
        """End what the module runs for ``tenant_id`` (its data is kept)."""


def module_file_exists(dotted: str) -> bool:
    """Return True when the dotted module (and every parent package) exists, without
    importing anything but the parent packages."""
    parts = dotted.split(".")
    for end in range(1, len(parts) + 1):
        if importlib.util.find_spec(".".join(parts[:end])) is None:
            return False
    return True


def load_modules() -> list[PlatformModule]:
    """Import every present module's ``MODULE``.

    Raises:
        TypeError: a present module's ``MODULE`` lacks the :class:`PlatformModule` surface.
        ImportError: raised inside a present module (never swallowed).
    """
    loaded: list[PlatformModule] = []
    for name in KNOWN_MODULES:
        dotted = f"scaigrid.modules.{name}.module"
        if not module_file_exists(dotted):
            log.info("module.absent", module=name)
            continue
        module = getattr(importlib.import_module(dotted), "MODULE", None)
        if not isinstance(module, PlatformModule) or module.name != name:
            raise TypeError(f"{dotted}.MODULE must be a PlatformModule named {name!r}")
        loaded.append(module)
        log.info("module.loaded", module=name)
    return loaded

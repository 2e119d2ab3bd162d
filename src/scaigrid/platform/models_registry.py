"""Imports every ORM model so ``Base.metadata`` is complete (Alembic, tests).

Platform models are always imported. Each module in
:data:`scaigrid.platform.modules.loader.KNOWN_MODULES` may ship
``scaigrid.modules.<name>.models``; it is imported when that file exists, and an import error
inside it is raised, not hidden.
"""

from __future__ import annotations

import importlib

from scaigrid.platform.modules.loader import KNOWN_MODULES, module_file_exists

PLATFORM_MODEL_MODULES: tuple[str, ...] = (
    "scaigrid.platform.tenancy.models",
    "scaigrid.platform.auth.models",
    "scaigrid.platform.audit.models",
    "scaigrid.platform.iam.models",
    "scaigrid.platform.modules.models",
    "scaigrid.platform.events.models",
)


def import_all_models() -> list[str]:
    """Import platform and module model modules; return the dotted names imported."""
    names = list(PLATFORM_MODEL_MODULES)
    names += [
        f"scaigrid.modules.{module}.models"
        for module in KNOWN_MODULES
        if module_file_exists(f"scaigrid.modules.{module}.models")
    ]
    for name in names:
        importlib.import_module(name)
    return names

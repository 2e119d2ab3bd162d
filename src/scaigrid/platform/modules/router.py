"""Module catalogue (SPEC §1.10): ``GET /v1/modules`` and ``GET /v1/modules/{name}``.

Enable, disable and configuration routes come with module administration in a later issue.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from scaigrid import __version__, errors
from scaigrid.platform.auth import CurrentPrincipal
from scaigrid.platform.envelope import ok, ok_list
from scaigrid.platform.modules.loader import PlatformModule

router = APIRouter(prefix="/v1/modules", tags=["modules"])


def _record(module: PlatformModule) -> dict[str, Any]:
    return {"id": module.name, "name": module.name, "status": "active", "version": __version__}


def _loaded(request: Request) -> dict[str, PlatformModule]:
    modules: dict[str, PlatformModule] = request.app.state.modules
    return modules


@router.get("")
async def list_modules(request: Request, _principal: CurrentPrincipal) -> JSONResponse:
    """Every loaded module as ``{id, name, status, version}``; status is ``active``."""
    return ok_list([_record(m) for m in _loaded(request).values()], None)


@router.get("/{name}")
async def get_module(name: str, request: Request, _principal: CurrentPrincipal) -> JSONResponse:
    """One module record.

    Raises:
        NotFound: no module ``name`` is loaded.
    """
    module = _loaded(request).get(name)
    if module is None:
        raise errors.NotFound(f"No module {name!r}")
    return ok(_record(module))

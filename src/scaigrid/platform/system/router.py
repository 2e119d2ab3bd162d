"""The two unauthenticated endpoints (SPEC §1.2): ``GET /health`` and ``GET /metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from scaigrid import __version__
from scaigrid.platform.envelope import ok

router = APIRouter(tags=["system"])


@router.get("/health")
async def health() -> JSONResponse:
    """Liveness: ``{"status": "ok", "data": {"status": "healthy", "version": "x.y.z"}}``."""
    return ok({"status": "healthy", "version": __version__})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this app's registry (``app.state.metrics_registry``)."""
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

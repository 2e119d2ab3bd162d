"""The controller's FastAPI application factory.

``create_app(settings)`` builds one independent app (own metrics registry, own database
engine), so tests can run several in one process. What the app holds in ``app.state``:

* ``settings`` — :class:`~scaigrid.settings.Settings`
* ``db`` — :class:`~scaigrid.platform.db.Database` (set by the lifespan; None in
  ``bunker_proxy`` mode)
* ``metrics_registry`` — the :class:`prometheus_client.CollectorRegistry` served at /metrics;
  modules register their metrics here
* ``modules`` — ``{name: PlatformModule}`` of the loaded modules
* ``webhooks`` — :class:`~scaigrid.platform.events.service.WebhookDispatcher` (``full``
  mode; delivers events to webhooks in the background)
* ``jwt_verifier`` — :class:`~scaigrid.platform.auth.jwt.JwtVerifier` when a JWT issuer
  is configured, else None
* ``rate_limiter`` — :class:`~scaigrid.platform.ratelimit.RateLimiter` (Redis when
  ``SCAIGRID_REDIS_URL`` is set, in-process otherwise), applied on authentication
* ``audit`` — :class:`~scaigrid.platform.audit.service.AuditLog` (set by the lifespan in
  ``full`` mode; every POST/PUT/PATCH/DELETE is appended by the audit middleware)

Start-up order (lifespan): schema (migrate, or require it migrated — see
``Settings.migrate_on_start``), bootstrap of the first administrator, then each module's
``startup(app)``. Shutdown runs each module's ``shutdown(app)`` in reverse, then closes the
database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.middleware import Middleware

from scaigrid import __version__
from scaigrid.modules.scaibunker.accounting.router import router as accounting_router
from scaigrid.platform.audit.middleware import AuditMiddleware
from scaigrid.platform.audit.router import router as audit_router
from scaigrid.platform.audit.service import AuditLog
from scaigrid.platform.auth.jwt import JwtVerifier
from scaigrid.platform.auth.router import router as api_keys_router
from scaigrid.platform.auth.service import PrincipalCache
from scaigrid.platform.bootstrap import bootstrap
from scaigrid.platform.db import Database
from scaigrid.platform.events.router import router as webhooks_router
from scaigrid.platform.events.service import WebhookDispatcher
from scaigrid.platform.handlers import EXCEPTION_HANDLERS
from scaigrid.platform.iam.router import router as iam_router
from scaigrid.platform.logging import configure_logging
from scaigrid.platform.middleware import BodyLimitMiddleware, HttpMetrics, RequestContextMiddleware
from scaigrid.platform.migrate import prepare_schema
from scaigrid.platform.modules.loader import PlatformModule, ProxyCapableModule, load_modules
from scaigrid.platform.modules.router import module_guard
from scaigrid.platform.modules.router import router as modules_router
from scaigrid.platform.modules.service import EnabledCache
from scaigrid.platform.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from scaigrid.platform.system.router import router as system_router
from scaigrid.platform.tenancy.router import router as tenancy_router
from scaigrid.settings import Settings, get_settings

log = structlog.get_logger(__name__)

MODULES_PREFIX = "/v1/modules"


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    modules: dict[str, PlatformModule] = app.state.modules
    db: Database | None = None
    started: list[PlatformModule] = []
    try:
        if settings.mode == "full":
            await prepare_schema(settings)
            db = Database(settings.database_url)
            app.state.db = db
            app.state.audit = AuditLog(db)
            app.state.audit.start()
            webhooks = WebhookDispatcher(
                db, settings.webhook_retry_base_s, settings.webhook_allow_private
            )
            webhooks.start()
            app.state.webhooks = webhooks
            await bootstrap(db, settings)
        for module in modules.values():
            await module.startup(app)
            started.append(module)
        log.info("app.started", mode=settings.mode, modules=list(modules))
        yield
    finally:
        for module in reversed(started):
            try:
                await module.shutdown(app)
            except Exception:
                # One module failing to stop must not keep the others running.
                log.exception("module.shutdown_failed", module=module.name)
        if app.state.audit is not None:
            await app.state.audit.close()
        if app.state.webhooks is not None:
            await app.state.webhooks.close()
        if db is not None:
            await db.dispose()
        await app.state.rate_limiter.close()
        log.info("app.stopped")


def _mount_modules(app: FastAPI, settings: Settings, modules: list[PlatformModule]) -> None:
    for module in modules:
        prefix = f"{MODULES_PREFIX}/{module.name}"
        if settings.mode == "full":
            app.include_router(
                module.router, prefix=prefix, dependencies=[module_guard(module.name)]
            )
        elif isinstance(module, ProxyCapableModule):
            app.include_router(module.proxy_router, prefix=prefix)
        else:
            log.warning("module.no_proxy_router", module=module.name)


def _rate_limiter(settings: Settings) -> RateLimiter:
    if settings.redis_url:
        return RedisRateLimiter(settings.redis_url, settings.redis_prefix)
    return MemoryRateLimiter()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the controller app for ``settings`` (default: :func:`get_settings`).

    Routes: ``GET /health`` and ``GET /metrics`` (no auth) always; in ``full`` mode also the
    module catalogue ``/v1/modules`` and each module's ``router`` at ``/v1/modules/<name>``;
    in ``bunker_proxy`` mode each module's ``proxy_router`` instead.

    Raises:
        TypeError, ImportError: a present module is broken (see
            :mod:`scaigrid.platform.modules.loader`).
    """
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    registry = CollectorRegistry()
    modules = load_modules()
    app = FastAPI(
        title="ScaiGrid",
        version=__version__,
        lifespan=_lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[
            Middleware(RequestContextMiddleware, metrics=HttpMetrics(registry)),
            Middleware(AuditMiddleware),
            Middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes),
        ],
    )
    app.state.settings = settings
    app.state.db = None
    app.state.audit = None
    app.state.webhooks = None
    app.state.metrics_registry = registry
    app.state.principal_cache = PrincipalCache(settings.auth_cache_ttl_s)
    app.state.module_enabled_cache = EnabledCache(settings.auth_cache_ttl_s)
    app.state.read_audit_cache = EnabledCache(settings.auth_cache_ttl_s)
    app.state.rate_limiter = _rate_limiter(settings)
    app.state.jwt_verifier = JwtVerifier.from_settings(settings)
    app.state.modules = {module.name: module for module in modules}
    app.include_router(system_router)
    if settings.mode == "full":
        app.include_router(modules_router)
        app.include_router(audit_router)
        app.include_router(tenancy_router)
        app.include_router(api_keys_router)
        app.include_router(iam_router)
        app.include_router(webhooks_router)
        app.include_router(accounting_router)
    _mount_modules(app, settings, modules)
    return app

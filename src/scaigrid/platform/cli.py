"""``scaigrid`` command line: serve the controller, migrate, and administer tenancy.

Settings come from ``SCAIGRID_*`` environment variables (see :mod:`scaigrid.settings`);
logs go to stderr, command results (ids, the new API key) to stdout.

Admin commands open the database the way the server does: migrate it (or require it
migrated) and bootstrap the first administrator when needed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
import uvicorn
from sqlalchemy.ext.asyncio import AsyncSession

from scaigrid import errors
from scaigrid.platform.app import create_app
from scaigrid.platform.audit.service import verify_chain
from scaigrid.platform.auth.service import create_api_key, revoke_api_key
from scaigrid.platform.bootstrap import bootstrap
from scaigrid.platform.db import Database
from scaigrid.platform.logging import configure_logging
from scaigrid.platform.migrate import (
    PLATFORM_BRANCH,
    DatabaseNotMigrated,
    make_revision,
    migrate,
    prepare_schema,
)
from scaigrid.platform.permissions import Role
from scaigrid.platform.tenancy import service as tenancy
from scaigrid.settings import Settings

T = TypeVar("T")


def _settings(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _run_in_session(settings: Settings, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Prepare the database like the server does, run ``work`` in one committed session."""

    async def run() -> T:
        await prepare_schema(settings)
        db = Database(settings.database_url)
        try:
            await bootstrap(db, settings)
            async with db.sessionmaker() as session:
                result = await work(session)
                await session.commit()
                return result
        finally:
            await db.dispose()

    try:
        return asyncio.run(run())
    except errors.ScaiGridError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from exc
    except DatabaseNotMigrated as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
def main() -> None:
    """ScaiGrid controller."""


@main.command()
@click.option("--host", default=None, help="Listen address (default SCAIGRID_BIND_HOST).")
@click.option("--port", type=int, default=None, help="Listen port (default SCAIGRID_PORT).")
@click.option("--dev", is_flag=True, help="Also run one local worker (SCAIGRID_DEV_WORKER).")
def serve(host: str | None, port: int | None, dev: bool) -> None:
    """Run the controller HTTP server (HTTP and WebSocket) until interrupted."""
    settings = _settings(bind_host=host, port=port, dev_worker=dev or None)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.bind_host,
        port=settings.port,
        log_config=None,
        log_level=settings.log_level.lower(),
        access_log=False,
    )


@main.command("migrate")
def migrate_command() -> None:
    """Upgrade the database to the latest revision of every branch."""
    settings = _settings()
    configure_logging(settings.log_level)
    asyncio.run(migrate(settings))
    click.echo("database is at the latest revision")


@main.command()
@click.option("-m", "--message", required=True, help="What the revision changes.")
@click.option(
    "--branch",
    default=PLATFORM_BRANCH,
    show_default=True,
    help="`platform` or a module name; a module's first revision starts its branch.",
)
@click.option("--autogenerate", is_flag=True, help="Diff the models against the database.")
def revision(message: str, branch: str, autogenerate: bool) -> None:
    """Write a new migration file (review it before committing)."""
    settings = _settings()
    configure_logging(settings.log_level)
    try:
        path = asyncio.run(make_revision(settings, message, branch, autogenerate=autogenerate))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(str(path))


@main.group()
def admin() -> None:
    """Tenancy administration straight on the database."""
    configure_logging(_settings().log_level)


@admin.command("create-tenant")
@click.option("--name", required=True, help="Display name.")
@click.option("--slug", default=None, help="Unique DNS-label slug (default: from the name).")
@click.option("--partner-id", default=None, help="Owning partner (default: the first one).")
def create_tenant(name: str, slug: str | None, partner_id: str | None) -> None:
    """Create a tenant; print its id."""

    async def work(session: AsyncSession) -> str:
        partner = partner_id or (await tenancy.default_partner(session)).id
        tenant_slug = slug or tenancy.slugify(name)
        return (await tenancy.create_tenant(session, partner, name, tenant_slug)).id

    click.echo(_run_in_session(_settings(), work))


@admin.command("create-user")
@click.option("--tenant", "tenant_ref", required=True, help="Tenant id or slug.")
@click.option("--email", required=True)
@click.option("--role", type=click.Choice([r.value for r in Role]), default=Role.TENANT_USER.value)
@click.option("--display-name", default=None)
def create_user(tenant_ref: str, email: str, role: str, display_name: str | None) -> None:
    """Create a user in a tenant; print its id."""

    async def work(session: AsyncSession) -> str:
        tenant = await tenancy.get_tenant(session, tenant_ref)
        return (await tenancy.create_user(session, tenant.id, email, role, display_name)).id

    click.echo(_run_in_session(_settings(), work))


@admin.command("create-key")
@click.option("--user", "email", required=True, help="Email of the key's owner.")
@click.option(
    "--tenant", "tenant_ref", default=None, help="Tenant id or slug, if the email is in several."
)
@click.option("--name", default="cli", show_default=True, help="Label shown in key lists.")
def create_key(email: str, tenant_ref: str | None, name: str) -> None:
    """Mint an API key and print it once to stdout; it cannot be shown again."""

    async def work(session: AsyncSession) -> str:
        user = await tenancy.find_user_by_email(session, email, tenant_ref)
        _key, secret = await create_api_key(session, user, name)
        return secret

    click.echo(_run_in_session(_settings(), work))


@admin.command("revoke-key")
@click.argument("key")
def revoke_key(key: str) -> None:
    """Revoke an API key given its id (``key_…``) or the key itself; print its id."""

    async def work(session: AsyncSession) -> str:
        return (await revoke_api_key(session, key)).id

    click.echo(_run_in_session(_settings(), work))


@admin.command("audit-verify")
def audit_verify() -> None:
    """Check the audit log's hash chain; print the first broken link and exit 1, or
    ``ok <n> records`` and exit 0."""

    settings = _settings()

    async def run() -> str | None:
        await prepare_schema(settings)
        db = Database(settings.database_url)
        try:
            report = await verify_chain(db)
        finally:
            await db.dispose()
        if report.broken_seq is None:
            click.echo(f"ok {report.checked} records")
            return None
        return f"broken at seq {report.broken_seq}: {report.reason}"

    try:
        broken = asyncio.run(run())
    except DatabaseNotMigrated as exc:
        raise click.ClickException(str(exc)) from exc
    if broken is not None:
        click.echo(broken)
        raise SystemExit(1)


if __name__ == "__main__":
    main()

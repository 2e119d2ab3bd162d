"""Controller configuration: every ``SCAIGRID_*`` environment variable, in one place.

:class:`Settings` is the single list of settings; :meth:`Settings.describe` turns it into
``(environment variable, default, description)`` rows for the README table, and a test keeps
the two in step. Defaults that depend on another setting (``database_url`` on ``data_dir``,
``public_url`` on ``port``) are computed at load time from the values actually given.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "SCAIGRID_"


def _default_data_dir() -> Path:
    return Path("var").resolve()


class Settings(BaseSettings):
    """Controller settings, read from ``SCAIGRID_<NAME>`` environment variables.

    Fields are validated in declaration order, so derived defaults (``database_url``,
    ``admin_key_file``, ``public_url``) see the final ``data_dir`` and ``port``.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Directory for the embedded database, the admin key file and local state; "
        "relative paths are resolved against the working directory.",
        json_schema_extra={"default_doc": "./var (resolved to an absolute path)"},
    )
    database_url: str = Field(
        default_factory=lambda data: f"sqlite+aiosqlite:///{data['data_dir'] / 'scaigrid.db'}",
        description="SQLAlchemy async URL of the database: sqlite+aiosqlite, "
        "postgresql+asyncpg or mysql+aiomysql (MariaDB).",
        json_schema_extra={"default_doc": "sqlite+aiosqlite:///<data_dir>/scaigrid.db"},
    )
    bind_host: str = Field(
        default="127.0.0.1",
        description="Address `scaigrid serve` listens on (SCAIGRID_HOST is the client's URL).",
    )
    port: int = Field(
        default=8080, ge=1, le=65535, description="TCP port `scaigrid serve` listens on."
    )
    mode: Literal["full", "bunker_proxy"] = Field(
        default="full",
        description="`full` runs the whole controller; `bunker_proxy` runs only the "
        "storage proxy routes plus /health and /metrics, with no database and no Redis.",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis URL (redis://host:port/db) for multi-replica state; "
        "unset means the in-process embedded default.",
    )
    admin_key_file: Path = Field(
        default_factory=lambda data: data["data_dir"] / "admin-api-key",
        description="Where the first start writes the bootstrap super_admin API key "
        "(mode 0600). The key is never logged.",
        json_schema_extra={"default_doc": "<data_dir>/admin-api-key"},
    )
    admin_email: str = Field(
        default="admin@scaigrid.local",
        min_length=3,
        max_length=320,
        description="Email of the super_admin user created on first start.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Lowest log level written (structured JSON on stderr)."
    )
    public_url: str = Field(
        default_factory=lambda data: f"http://127.0.0.1:{data['port']}",
        description="Base URL that workers and clients dial to reach this controller.",
        json_schema_extra={"default_doc": "http://127.0.0.1:<port>"},
    )
    max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1,
        description="Largest JSON request body in bytes; larger bodies get 413 "
        "VALIDATION_ERROR. Streaming upload routes are exempt.",
    )
    dev_worker: bool = Field(
        default=False,
        description="Run one local worker beside the controller (the embedded default; "
        "`scaigrid serve --dev` sets it).",
    )
    auth_cache_ttl_s: float = Field(
        default=5.0,
        ge=0,
        description="Seconds a resolved API key is kept in memory, saving a database round "
        "trip per request; a key revoked elsewhere keeps working at most this long (0 = off).",
    )
    rate_limit_key_per_min: int = Field(
        default=60, ge=1, description="Requests per sliding 60 s window per API key (SPEC §1.6)."
    )
    rate_limit_user_per_min: int = Field(
        default=120, ge=1, description="Requests per sliding 60 s window per user."
    )
    rate_limit_tenant_per_min: int = Field(
        default=1000, ge=1, description="Requests per sliding 60 s window per tenant."
    )
    rate_limit_partner_per_min: int = Field(
        default=5000, ge=1, description="Requests per sliding 60 s window per partner."
    )
    redis_prefix: str = Field(
        default="scaigrid:",
        max_length=100,
        description="Prefix of every Redis key this controller writes (several deployments "
        "may share one Redis).",
    )
    jwt_issuer: str | None = Field(
        default=None,
        description="Issuer (`iss`) of accepted RS256 JWTs; unset disables JWT authentication.",
    )
    jwt_audience: str = Field(
        default="scaigrid", description="Audience (`aud`) accepted JWTs must carry."
    )
    jwt_public_key: str | None = Field(
        default=None, description="PEM public key that signs the issuer's JWTs."
    )
    jwt_jwks_url: str | None = Field(
        default=None,
        description="The issuer's JWKS URL (used when no PEM key is set; cached 5 minutes).",
    )
    webhook_retry_base_s: float = Field(
        default=2.0,
        gt=0,
        description="First webhook retry delay in seconds; each later retry waits twice as "
        "long as the one before.",
    )
    webhook_allow_private: bool = Field(
        default=False,
        description="Allow webhook URLs on loopback, private and link-local addresses "
        "(off: such targets are refused, so tenants cannot reach internal services).",
    )
    usage_interval_s: float = Field(
        default=60.0,
        ge=1,
        description="Seconds between usage records of live bunkers (SPEC §1.9); figures are "
        "exact to the second of state changes whatever the interval.",
    )
    migrate_on_start: bool = Field(
        default=True,
        description="Run database migrations when the server starts. With several "
        "replicas set it to false and run `scaigrid migrate` once per release; the "
        "server then refuses to start on a database that is not at the latest revision.",
    )

    @field_validator("data_dir", "admin_key_file")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("public_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """Return one ``(environment variable, default, description)`` row per setting.

        The default column is the literal default, or for computed defaults the rule that
        computes it (e.g. ``sqlite+aiosqlite:///<data_dir>/scaigrid.db``); ``""`` for none.
        """
        rows: list[tuple[str, str, str]] = []
        for name, field in cls.model_fields.items():
            extra = field.json_schema_extra
            if isinstance(extra, dict) and "default_doc" in extra:
                default = str(extra["default_doc"])
            elif field.default is None:
                default = ""
            elif isinstance(field.default, bool):
                default = str(field.default).lower()
            else:
                default = str(field.default)
            rows.append((f"{ENV_PREFIX}{name.upper()}", default, field.description or ""))
        return rows


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read from the environment once."""
    return Settings()

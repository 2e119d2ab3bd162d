"""Structured logging for every controller process: JSON lines on stderr.

Every entry is one event name plus fields (``log.info("bootstrap.done", tenant_id=...)``);
the request id is merged in from context variables while a request is served.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(level: str) -> None:
    """Route structlog and the standard library (uvicorn, alembic) to stderr at ``level``.

    Args:
        level: ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``.
    """
    numeric = logging.getLevelName(level.upper())
    logging.basicConfig(format="%(levelname)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(numeric)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # Plain-text tracebacks: the dict form records local variables, which may hold
            # secrets (API keys, tokens).
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )

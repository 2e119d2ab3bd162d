"""Unauthenticated system endpoints: ``/health`` and ``/metrics``."""

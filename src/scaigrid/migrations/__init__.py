"""Alembic migration scripts of the controller database (run through ``scaigrid migrate``).

Platform revisions live in ``versions/`` on the branch labelled ``platform``; each module keeps
its own branch in ``scaigrid/modules/<name>/migrations/versions/`` (see
:mod:`scaigrid.platform.migrate`).
"""

"""Tamper-evident audit log of mutating requests (SPEC §1.7)."""

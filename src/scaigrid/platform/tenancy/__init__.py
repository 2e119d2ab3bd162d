"""Partners → tenants → users (SPEC §1.3): models and services."""

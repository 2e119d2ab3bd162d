"""Platform events and signed webhook deliveries (SPEC §1.8)."""

"""Snapshots of bunkers' writable layers (SPEC §6): records, routes and the controller side of
taking, listing, deleting and restoring them."""

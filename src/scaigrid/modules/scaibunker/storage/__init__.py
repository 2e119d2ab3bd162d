"""Object storage for scaibunker (SPEC §11): the object store backends, capability tokens and
the storage proxy routes served by the controller and by ``SCAIGRID_MODE=bunker_proxy``."""

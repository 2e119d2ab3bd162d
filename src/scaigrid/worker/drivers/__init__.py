"""Drivers turn (rootfs, resources, network attachment) into a running bunker.

- :mod:`.base` — the :class:`Driver` / :class:`BunkerHandle` contract every driver implements.
- :mod:`.container` — :class:`ContainerDriver`: OCI containers run by crun, else runc.
- :mod:`.seccomp` — the container driver's default seccomp profile.
"""

"""Bunker networking on a worker (SPEC §8): router namespace, per-bunker namespaces, nftables
policy and the per-bunker DNS resolver. :class:`~scaigrid.worker.net.manager.NetworkManager` is
the entry point.
"""

"""ScaiGrid: the multi-tenant platform, the ScaiBunker module, its worker daemon and guest agent.

Top-level packages map one-to-one to processes (see ARCHITECTURE.md):
``platform`` + ``modules.scaibunker`` (controller), ``worker``, ``agent`` and ``client``;
``protocol`` holds only the wire formats that several processes share.
"""

__version__ = "0.1.0"

"""``python -m scaigrid.client`` runs the ``scaibunker`` CLI."""

from scaigrid.client.cli import main

raise SystemExit(main())

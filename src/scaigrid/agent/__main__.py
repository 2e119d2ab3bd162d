"""``python -m scaigrid.agent --listen PATH``: see :mod:`scaigrid.agent.main`."""

from scaigrid.agent.main import main

raise SystemExit(main())

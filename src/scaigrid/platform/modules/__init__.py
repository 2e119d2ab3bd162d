"""Platform modules: loading ``scaigrid.modules.<name>`` and the ``/v1/modules`` catalogue."""

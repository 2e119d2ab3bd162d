"""The guest agent: PID 1 of every bunker, serving exec, processes and files.

Imports nothing from ScaiGrid except :mod:`scaigrid.protocol.agent`: it runs from a
self-contained runtime that holds only ``scaigrid/__init__.py``, ``scaigrid/protocol``,
``scaigrid/agent`` and ``h2``/``hpack``/``hyperframe``.
"""

"""Network profiles on the controller side (SPEC §8): allowlist validation, permissions and
the network part of ``bunker.create``.
"""

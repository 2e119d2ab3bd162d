"""Name matching for ``registry`` and ``allowlisted`` bunkers (SPEC §8.4).

Entries arrive validated and normalised by the controller (lower case, no trailing dot). A
plain entry matches exactly that name; ``*.example.com`` matches names with exactly one more
label than ``example.com``.
"""

from __future__ import annotations

from collections.abc import Iterable


class NamePolicy:
    """The names one bunker may resolve.

    Args:
        entries: allowlist entries; ``None`` allows every name (``unrestricted``/``transit``).
    """

    def __init__(self, entries: Iterable[str] | None) -> None:
        self.open = entries is None
        exact: set[str] = set()
        parents: set[str] = set()
        for entry in entries or ():
            name = entry.lower().rstrip(".")
            if name.startswith("*."):
                parents.add(name[2:])
            else:
                exact.add(name)
        self._exact = frozenset(exact)
        self._parents = frozenset(parents)

    def allows(self, qname: str) -> bool:
        """Whether ``qname`` (any case, with or without the trailing dot) may be resolved."""
        if self.open:
            return True
        name = qname.lower().rstrip(".")
        if name in self._exact:
            return True
        label, dot, parent = name.partition(".")
        return bool(dot) and bool(label) and parent in self._parents

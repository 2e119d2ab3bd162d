"""Authentication and authorisation of callers (SPEC §1.2, §1.11).

Public surface: :class:`Principal`, :func:`current_principal`, :data:`CurrentPrincipal`,
:func:`require`.
"""

from scaigrid.platform.auth.dependencies import CurrentPrincipal, current_principal, require
from scaigrid.platform.auth.principal import Principal

__all__ = ["CurrentPrincipal", "Principal", "current_principal", "require"]

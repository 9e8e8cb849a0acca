"""
Where services register and clients find them.

@see: L{skynet.registry.base.IRegistry}
"""

from skynet.registry.base import (
    Address,
    IInstanceListener,
    Instance,
    IRegistry,
    IWatch,
    Query,
    RegistryError,
)

__all__ = [
    "Address",
    "IInstanceListener",
    "IRegistry",
    "IWatch",
    "Instance",
    "Query",
    "RegistryError",
]

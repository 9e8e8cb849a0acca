"""
C{MemoryHog.Allocate}: a service that grows its memory on demand, to test
the daemon's memory guard.

    {megabytes: int} -> {megabytes: total held, rss: resident bytes}

C{MemoryHog.Free {}} lets it all go.
"""

import os

from skynet.errors import ServiceError
from skynet.service import Service

#: The most one call may allocate.
MAX_MEGABYTES = 4096


def resident_bytes() -> int:
    """
    This process's resident memory, in bytes.
    """
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


class MemoryHog(Service):
    name = "MemoryHog"

    def __init__(self) -> None:
        self.blocks: list[bytes] = []

    def Allocate(self, request_info, params):
        megabytes = params.get("megabytes", 0)
        if not isinstance(megabytes, int) or not 0 <= megabytes <= MAX_MEGABYTES:
            raise ServiceError(f"megabytes must be an integer in 0..{MAX_MEGABYTES}")
        # Written, not just reserved: every page becomes resident.
        self.blocks.append(b"\x01" * (megabytes * 1024 * 1024))
        held = sum(len(b) for b in self.blocks) // (1024 * 1024)
        return {"megabytes": held, "rss": resident_bytes()}

    def Free(self, request_info, params):
        self.blocks.clear()
        return {"megabytes": 0, "rss": resident_bytes()}

"""
Give start-up's transient heap back to the system.

Start-up allocates and frees a lot (imports, the code snapshot in a worker
thread, TLS contexts); glibc keeps the freed pages of every arena resident.
One C{malloc_trim(0)} once start-up is over returns them (glibc >= 2.8 also
releases free pages inside the heaps, not only at their top), which is most
of the difference between an agent that just started and one that has run a
while.  A no-op where glibc is not the C library.
"""

from __future__ import annotations

import ctypes
import ctypes.util


def release_free_heap() -> bool:
    """True if glibc's malloc_trim ran."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True

"""Give freed host memory back to the OS between phases of a long upscale.

glibc keeps freed heap blocks for reuse; small long-lived allocations made between large transient ones (a hint
latent cached after a window's encoder ran, say) pin the heap, so the RSS would carry every window's temporaries
forward and grow with the number of windows. ``malloc_trim`` releases the free pages (also inside the heap).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def trim() -> bool:
    """Return free heap pages to the OS; False where the C library has no ``malloc_trim`` (not glibc)."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True

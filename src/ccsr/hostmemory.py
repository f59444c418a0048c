"""Host heap policy for a long upscale: reuse freed pages inside a phase, give them back between phases.

glibc serves allocations above 32 MiB (and, by its dynamic threshold, many smaller ones) with a fresh ``mmap`` and
unmaps them on free, so a network evaluation that frees and re-allocates the same large buffers (oneDNN's reordered
weights and activations) page-faults and zeroes them again every time: on a 2-core CPU that kernel work cost 14-16 %
of each UNet + ControlNet evaluation (bench/README.md). :func:`reuse_freed` keeps freed memory in the heap while it
is active, so the next allocation of that size reuses it. Between phases, :func:`trim` returns the free pages to the
OS: glibc keeps freed heap blocks, and small long-lived allocations made between large transient ones (a hint latent
cached after a window's encoder ran, say) pin the heap, so the RSS would otherwise carry every window's temporaries
forward and grow with the number of windows.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import threading
from collections.abc import Iterator

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# Setting any threshold ends glibc's dynamic adjustment, so leaving restores the values it settles at once large
# blocks have been freed (mmap threshold at its 32 MiB maximum, trim threshold twice that), not its start values.
_SETTLED_MMAP_THRESHOLD = 32 * 1024 * 1024
_SETTLED_TRIM_THRESHOLD = 2 * _SETTLED_MMAP_THRESHOLD
_DEFAULT_MMAP_MAX = 65536
_KEEP_ALL = 2**31 - 1  # mallopt takes an int

_lock = threading.Lock()
_active = 0


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def trim() -> bool:
    """Return free heap pages to the OS; False where the C library has no ``malloc_trim`` (not glibc)."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@contextlib.contextmanager
def reuse_freed() -> Iterator[bool]:
    """While active (in any thread), large allocations come from the heap and freed memory stays there for reuse;
    on leaving the last one, glibc's usual policy comes back and the free pages go back to the OS. Yields whether the
    policy applies (glibc). The policy is process-wide: what other threads free meanwhile (a server's request
    buffers) is kept too, until then. Threads other than the main one allocate from arenas of at most 64 MiB, so
    their larger blocks are still mapped per allocation."""
    global _active
    libc = _libc()
    if libc is None:
        yield False
        return
    with _lock:
        if _active == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_ALL)
        _active += 1
    try:
        yield True
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_MMAP_THRESHOLD, _SETTLED_MMAP_THRESHOLD)
                libc.mallopt(_M_TRIM_THRESHOLD, _SETTLED_TRIM_THRESHOLD)
                libc.malloc_trim(0)

"""Giving freed memory back to the operating system (glibc's `malloc_trim`; a no-op elsewhere)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process's own symbols (libc)
    except OSError:
        return None


_malloc_trim = _find_malloc_trim()


def trim_free_memory() -> None:
    """Return every free page of the allocator's heaps, the arenas of other threads included."""
    if _malloc_trim is not None:
        _malloc_trim(0)

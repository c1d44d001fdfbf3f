"""A process-wide allocator setting for training on CPUs, applied by the command line (a library leaves it to
its caller: `mfr_sae.cpu_memory.keep_freed_cpu_memory()`)."""

from __future__ import annotations

import ctypes
import sys


def keep_freed_cpu_memory() -> bool:
    """Ask glibc to keep freed memory in the heap. By default it hands every freed block over 32 MB back to
    the OS, so each step's weight-sized gradient buffers are page-faulted in anew (bench/RESULTS.md);
    jemalloc or tcmalloc (LD_PRELOAD) do the same job. Process-wide; a no-op off Linux/glibc. True when
    applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))

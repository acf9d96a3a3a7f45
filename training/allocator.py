"""Keeping freed memory for reuse in glibc's ``malloc``, for training on a CPU (``training/README.md``, Speed).

glibc serves every block above its mmap threshold (at most 32 MB; e.g. a 64-channel 32 px activation at batch
128) with a fresh ``mmap`` and unmaps it when it is freed, so each new tensor that large page-faults on first
use, which costs several times the arithmetic of an element-wise operation over it. A training step allocates
and frees the same sizes again and again; a gradient-denoising step allocates more of them than a standard one.
"""

import ctypes
import sys

__all__ = ["keep_freed_memory"]

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # the parameters of mallopt(3), from glibc's malloc.h
TRIM_THRESHOLD = 1 << 30  # bytes of free memory at the top of the heap that glibc keeps before returning any


def keep_freed_memory() -> bool:
    """Make this process's glibc ``malloc`` keep freed memory for reuse, as the environment variables
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824`` do at start-up: no block is mmapped, and up to
    1 GiB of free memory stays in the heap. Blocks allocated before keep their memory. The price is a resident
    size that stays at its peak. True when applied; False (nothing changed) where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: other allocators, other parameters
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))

"""glibc's malloc, tuned for a training loop on the CPU.

A training step allocates and frees the same large activation tensors every step. By
default glibc serves each block above a threshold (128 KiB at first, raised as blocks are
freed) with a fresh mmap and hands freed memory back to the OS, so a step keeps touching new
pages: thousands of page faults, each page zero-filled by the kernel, and element-wise ops
that run 2-3x slower than on memory already mapped. Raising the mmap threshold to glibc's
maximum (32 MiB) and never trimming the heap keeps freed blocks in the process for the next
step, as jemalloc or tcmalloc would (PyTorch's CPU performance guide), without preloading a
library. The cost: the resident size stays at the step's peak instead of falling between
steps. scripts/bench_presets.py measures the effect.
"""
from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_THRESHOLD_MAX = 32 * 2**20  # the most glibc accepts on 64-bit systems
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: free memory at the heap's top below 2 GiB stays


def tune_glibc_malloc() -> bool:
    """Keep freed blocks for reuse (see the module docstring). False where the C library is
    not glibc, or refuses: the system's behaviour stays."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))

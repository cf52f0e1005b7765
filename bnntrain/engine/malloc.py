"""glibc's malloc, tuned for a training loop on the CPU.

A training step allocates and frees the same large activation tensors every step. By
default glibc serves each block above a threshold (128 KiB at first, raised as blocks are
freed) with a fresh mmap and hands freed memory back to the OS, so a step keeps touching new
pages: thousands of page faults, each page zero-filled by the kernel, and element-wise ops
that run 2-3x slower than on memory already mapped. Serving every block from the heap (no
block gets its own mmap) and never trimming the heap keeps freed blocks in the process for
the next step, as jemalloc or tcmalloc would (PyTorch's CPU performance guide), without
preloading a library. Raising the mmap threshold is not enough: glibc caps it at 32 MiB, and
a 224 px network's largest activations are over it (16 x 64 x 112 x 112 floats: 49 MiB), so
each of those still cost a fresh mapping and 12,500 page faults every step. The cost: the
resident size stays at the step's peak instead of falling between steps.
scripts/bench_presets.py measures the effect.
"""
from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's <malloc.h>
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
    # The threshold first: with mmap off it no longer matters, but where glibc refused to turn
    # mmap off, blocks up to 32 MiB would still be kept. (A block the heap cannot hold, in a
    # thread's own arena, still gets a mapping: glibc falls back to one.)
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, NEVER_TRIM), (M_MMAP_MAX, 0))
    return all([bool(libc.mallopt(option, value)) for option, value in settings])

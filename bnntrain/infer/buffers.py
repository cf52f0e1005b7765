"""Output buffers reused from one call to the next.

Each packed layer writes its output (and the packed signs it hands on) into a fresh array.
Large fresh arrays come from the operating system page by page: after other work has given
the memory back (a float model run in between, say), every call pays the page faults and the
zeroing again, and a binary network at batch 16 writes hundreds of megabytes per call. The pool
keeps the arrays and hands one out again once nothing else refers to it: not the tensor made
from it, nor any view of that tensor, nor the packed signs travelling with one. Python's
reference count says so exactly, so a buffer still held by a caller (a feature map kept from
the last call) is never overwritten.
"""
from __future__ import annotations

import sys
import threading

import numpy as np

MAX_PER_SHAPE = 4           # arrays kept of one shape and type
MAX_POOLED_BYTES = 1 << 30  # beyond this, arrays no one holds are let go


def _references(arrays: list[np.ndarray], i: int) -> int:
    return sys.getrefcount(arrays[i])


# The count of an array only its list refers to, measured here, so that how this interpreter
# counts the call's own references cannot make a held array look free.
_FREE = _references([np.empty(0)], 0)


class BufferPool:
    """Arrays by (shape, dtype), each handed out again once only the pool refers to it."""

    def __init__(self) -> None:
        self._arrays: dict[tuple, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        """An array of `shape` and `dtype`, its contents undefined, as `np.empty` would give.

        Args:
            shape: the array's shape, a tuple.
            dtype: its element type (np.float32, ...).

        Returns:
            A pooled array no one else refers to, or a new one (pooled from then on).
        """
        key = (shape, dtype)
        with self._lock:
            arrays = self._arrays.get(key)
            if arrays is None:
                arrays = self._arrays[key] = []
            for i in range(len(arrays)):
                if _references(arrays, i) == _FREE:
                    return arrays[i]
            array = np.empty(shape, dtype)
            if len(arrays) < MAX_PER_SHAPE:
                arrays.append(array)
                if self.nbytes() > MAX_POOLED_BYTES:
                    self._release_free()
            return array

    def nbytes(self) -> int:
        """The bytes of all pooled arrays."""
        return sum(a.nbytes for arrays in self._arrays.values() for a in arrays)

    def _release_free(self) -> None:
        for key, arrays in list(self._arrays.items()):
            kept = [arrays[i] for i in range(len(arrays)) if _references(arrays, i) > _FREE]
            if kept:
                self._arrays[key] = kept
            else:
                del self._arrays[key]


POOL = BufferPool()

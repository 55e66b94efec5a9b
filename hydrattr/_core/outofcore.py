"""Keep disk-backed (memmap) arrays out of the process's resident memory.

Pages of a file mapping that the process has touched count in its resident set size
(RSS) until the kernel reclaims them, so a 12 GB per-sample store in a memmap would
show as 12 GB of RSS after one pass even though the data live on disk. :func:`touch`
counts the bytes read or written through a mapping and, past a budget, calls
``madvise(MADV_DONTNEED)`` on it: the process drops its page-table entries, the data
stay in the file (dirty pages of a shared file mapping are kept by the page cache and
written back by the kernel), and the next access faults them back in from the page
cache or the disk. RSS then stays O(budget) whatever the array's size.

:func:`owned_tempfile` creates the backing files: each belongs to the object that
created it and is deleted when that object is garbage-collected (or at interpreter
exit), also in a directory the user chose (``store_dir``), where a temporary directory's
own cleanup does not apply. Without it every fit with ``store_dir`` left its trajectory
(gigabytes at the paper's size) on disk.
"""
from __future__ import annotations

import mmap
import os
import tempfile
import weakref

import numpy as np

__all__ = ["release", "touch", "owned_tempfile", "DEFAULT_BUDGET"]

DEFAULT_BUDGET = 256 * 2**20  # bytes touched between releases


def _mapping(arr):
    while arr is not None:
        mm = getattr(arr, "_mmap", None)
        if mm is not None:
            return mm
        arr = getattr(arr, "base", None)
    return None


def release(arr):
    """Drop the resident pages of ``arr``'s file mapping (no-op for in-memory arrays)."""
    mm = _mapping(arr) if isinstance(arr, np.ndarray) else None
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


def touch(arr, nbytes, budget=None):
    """Count ``nbytes`` accessed through ``arr`` (a memmap); release past ``budget``
    (default :data:`DEFAULT_BUDGET`)."""
    if not isinstance(arr, np.memmap):
        return
    budget = DEFAULT_BUDGET if budget is None else budget
    n = getattr(arr, "_hydrattr_touched", 0) + int(nbytes)
    if n >= budget:
        release(arr)
        n = 0
    arr._hydrattr_touched = n


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def owned_tempfile(owner, directory, prefix, suffix):
    """A new empty file in ``directory``, deleted when ``owner`` is garbage-collected.

    Returns ``(fd, path)`` as :func:`tempfile.mkstemp` does. On POSIX systems a file that
    is still memory-mapped can be unlinked: its space is freed when the last mapping
    goes. Copies made by pickling hold the data in memory, not the file.
    """
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    weakref.finalize(owner, _unlink, path)
    return fd, path

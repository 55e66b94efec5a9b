"""Keep disk-backed (memmap) arrays out of the process's resident memory.

Pages of a file mapping that the process has touched count in its resident set size
(RSS) until the kernel reclaims them, so a 12 GB per-sample store in a memmap would
show as 12 GB of RSS after one pass even though the data live on disk. :func:`touch`
counts the bytes read or written through a mapping and, past a budget, calls
``madvise(MADV_DONTNEED)`` on it: the process drops its page-table entries, the data
stay in the file (dirty pages of a shared file mapping are kept by the page cache and
written back by the kernel), and the next access faults them back in from the page
cache or the disk. RSS then stays O(budget) whatever the array's size.

:func:`anonymous_file` creates the backing files: files without a name (on POSIX the
name is gone before the first byte is written), so nothing is left on disk however the
process ends, SIGKILL included, also in a directory the user chose (``store_dir``). The
space is freed when the file is closed and its last mapping is dropped (why: see
docs/architecture.rst, Decision 5).
"""
from __future__ import annotations

import errno
import mmap
import os
import tempfile

import numpy as np

__all__ = ["release", "touch", "anonymous_file", "map_file", "reserve", "check_directory",
           "DEFAULT_BUDGET"]

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


def check_directory(directory, name="store_dir"):
    """Make sure files can be created in ``directory`` (created if missing); raise an
    ``OSError`` naming the parameter ``name`` otherwise."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(errno.ENOTDIR, f"{name}={os.fspath(directory)!r} is a file, "
                                 f"not a directory")
    anonymous_file(directory, "hydrattr-probe-", name=name).close()


def anonymous_file(directory, prefix, name="store_dir"):
    """A new empty binary file (``w+b``) in ``directory`` (the system's temporary
    directory when None) that has no name on disk: :func:`tempfile.TemporaryFile`,
    which on POSIX unlinks it at once, so it disappears with its last handle or mapping,
    whatever ends the process. Failures raise an ``OSError`` naming ``name=directory``."""
    try:
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
        return tempfile.TemporaryFile(mode="w+b", prefix=prefix, suffix=".bin", dir=directory)
    except OSError as err:
        where = "the temporary directory" if directory is None else \
            f"{name}={os.fspath(directory)!r}"
        raise OSError(err.errno, f"cannot create a file in {where}: {err.strerror}; "
                                 f"pass a writable directory as {name}") from err


def reserve(f, nbytes, directory, name="store_dir"):
    """Give ``f`` a size of ``nbytes`` with its disk blocks allocated up front
    (``os.posix_fallocate``), so that a full disk is an ``OSError`` now instead of a
    SIGBUS when a page of a sparse mapping is first written. Falls back to a sparse
    ``truncate`` where the file system cannot preallocate."""
    nbytes = int(nbytes)
    if nbytes > 0 and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(f.fileno(), 0, nbytes)
            return
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                where = "the temporary directory" if directory is None else \
                    f"{name}={os.fspath(directory)!r}"
                raise OSError(err.errno, f"cannot reserve {nbytes / 2**30:.3g} GiB in {where}: "
                                         f"{err.strerror}; free space there or pass "
                                         f"another {name}") from err
    f.truncate(nbytes)


def map_file(f, dtype, shape, mode="r"):
    """Memory-map the open file ``f`` as an array of ``shape`` and close ``f``: the
    mapping keeps the data (and the disk space) alive until it is dropped."""
    f.flush()
    try:
        return np.memmap(f, dtype=dtype, mode=mode, shape=shape)
    finally:
        f.close()

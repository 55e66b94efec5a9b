"""Per-sample state storage: one ``n_params`` vector per tracked training sample.

Fast-mode HYDRA accumulates, for every tracked sample ``i``,
``S_i = sum_{t: i in B_t} w_t * coef_t * g_{t,i}``; attribution is then one matrix
product ``C = -S @ G_test.T``. ``S`` is ``n_tracked x n_params``: 50,000 x 61,706 is
12.3 GB in float32, so the store can be float32 in RAM (``"dense"``), float16 in RAM
(``"half"``: half the memory, about 3 significant digits, accumulation done in float32
per step) or float32 in a disk memmap (``"memmap"``: out of core, RAM O(batch)).
"""
from __future__ import annotations

import numpy as np
import torch

from .outofcore import anonymous_file, map_file, reserve, touch

__all__ = ["SampleStore", "STORE_KINDS"]

STORE_KINDS = ("dense", "half", "memmap")


class SampleStore:
    """A ``(n_rows, n_params)`` array with scatter-add and chunked matrix products.

    Parameters
    ----------
    n_rows, n_params : int
    kind : {"dense", "half", "memmap"}
    dtype : torch.dtype
        Accumulation dtype (float32 or float64); ``"half"`` stores float16.
    directory : str or None
        Where ``"memmap"`` writes its file (a temporary directory when None). Its space
        is reserved (``os.posix_fallocate``) at creation: ``OSError`` naming the
        directory when there is no room.
    zero : bool, default=True
        False: a dense or half store is allocated without being written (no memory is
        touched until a filler writes it; :meth:`ensure_zero` zeroes it when needed).
    """

    def __init__(self, n_rows, n_params, kind="dense", dtype=torch.float32, directory=None,
                 zero=True):
        if kind not in STORE_KINDS:
            raise ValueError(f"storage must be one of {STORE_KINDS + ('replay',)}, got {kind!r}")
        self.kind = kind
        self.dtype = dtype
        self.shape = (int(n_rows), int(n_params))
        # zero=False: an in-memory store left unwritten (its pages untouched) until a
        # filler writes every row or calls ensure_zero
        self.zeroed = bool(zero) or kind == "memmap"
        new = torch.zeros if self.zeroed else torch.empty
        if kind == "dense":
            self.data = new(self.shape, dtype=dtype)
        elif kind == "half":
            self.data = new(self.shape, dtype=torch.float16)
        else:  # a zero-filled file without a name: gone however the process ends
            np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
            f = anonymous_file(directory, "hydrattr-store-")
            try:  # disk space reserved now: a full disk is an OSError, not a SIGBUS later
                reserve(f, self.shape[0] * self.shape[1] * np_dtype.itemsize, directory)
            except BaseException:
                f.close()
                raise
            self.data = map_file(f, np_dtype, self.shape, mode="r+")

    def zero(self, chunk_rows=4096):
        """Set every entry to zero (a memmap chunk by chunk); returns the store."""
        if isinstance(self.data, np.ndarray):
            for s in range(0, self.shape[0], chunk_rows):
                self.data[s:s + chunk_rows] = 0
        else:
            self.data.zero_()
        self.zeroed = True
        return self

    def ensure_zero(self):
        """Zero the store if it was created with ``zero=False``; returns it."""
        return self if self.zeroed else self.zero()

    def add(self, rows, values):
        """``store[rows] += values`` (rows unique within a call)."""
        values = values.detach().to("cpu")
        if self.kind == "memmap":
            rows = np.asarray(rows)
            self.data[rows] += values.to(self.dtype).numpy()
            touch(self.data, 2 * values.numel() * self.data.itemsize)  # keep RSS bounded
        elif self.kind == "half":
            rows = torch.as_tensor(rows)
            self.data[rows] = (self.data[rows].to(torch.float32) + values.float()).half()
        else:
            self.data.index_add_(0, torch.as_tensor(rows), values.to(self.dtype))

    def matmul_t(self, other, chunk_rows=4096, progress=None):
        """``store @ other.T`` computed in row chunks; ``other`` is ``(m, n_params)``."""
        other = other.detach().to("cpu", self.dtype)
        out = torch.empty(self.shape[0], other.shape[0], dtype=self.dtype)
        if isinstance(self.data, np.memmap):  # read at most ~256 MiB of the file at a time
            row_bytes = self.shape[1] * self.data.itemsize
            chunk_rows = max(1, min(chunk_rows, (256 * 2**20) // max(row_bytes, 1)))
        elif self.kind == "half":  # each chunk is converted: at most ~256 MiB converted
            row_bytes = self.shape[1] * torch.finfo(self.dtype).bits // 8
            chunk_rows = max(1, min(chunk_rows, (256 * 2**20) // max(row_bytes, 1)))
        for start in range(0, self.shape[0], chunk_rows):
            stop = min(start + chunk_rows, self.shape[0])
            block = self.data[start:stop]
            if isinstance(block, np.ndarray):
                block = torch.from_numpy(np.asarray(block))
            out[start:stop] = block.to(self.dtype) @ other.T
            touch(self.data, block.numel() * block.element_size())
            if progress is not None:
                progress.update(stop - start)
        return out

    @property
    def nbytes(self):
        return int(self.data.nbytes) if isinstance(self.data, np.ndarray) else \
            self.data.numel() * self.data.element_size()

    def __getstate__(self):
        state = self.__dict__.copy()
        if isinstance(self.data, np.memmap):
            state["data"] = torch.from_numpy(np.array(self.data))
            state["kind"] = "dense"
        return state

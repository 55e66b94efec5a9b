"""Fast mode with ``Linear`` weights kept as a log of factors, never summed into rows.

A ``Linear`` weight's per-sample gradient at a step is ``go x^T`` (see
:mod:`~hydrattr._core.factors`), and its fast-mode contribution to a row's ``S`` is that
outer product times a coefficient ``c_t`` that depends only on the step (and the
parameter group): the no-Hessian recurrence applies the same transitions to every row.
So a row's block of ``S`` is ``sum_t c_t go_t x_t^T`` over the steps it entered, and it
can be kept as those pairs, ``E (n_out + n_in)`` numbers for ``E`` entries instead of
``n_out n_in``: LeNet-5's ``fc1`` over 20 epochs takes 10,400 numbers a row instead of
48,000.

:class:`FactorLogStore` is the training-time filler: the dense part of every term goes
through :class:`~hydrattr._core.deferred.DeferredStore` (into a store of the dense
part's width only), the factors are appended to a log with their row and step, and
:meth:`FactorLogStore.finish` scales each logged ``go`` by its step's final coefficient
(one backward pass over the steps' 2x2 transitions). Nothing is written back to full
rows during training, and the full ``(n, P)`` store is never allocated.

:class:`FactoredStore` is what it returns, with :class:`~hydrattr._core.store.SampleStore`'s
``matmul_t``: each chunk of rows is materialised (a batched product of each row's
logged pairs) and multiplied by the test gradients, so ``C`` equals the full store's to
float rounding.

Pure torch and numpy: nothing here knows skorch.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .deferred import DeferredStore
from .factors import FactorLayout
from .fused import cached_transition
from .sgd import group_slices
from .store import SampleStore

__all__ = ["FactorLogStore", "FactoredStore", "step_coefficients_backward"]


def step_coefficients_backward(transitions):
    """Final fast-mode coefficients of every step's injection: ``c[t] = e0 . M_{T-1} ...
    M_{t+1} b_t`` per parameter group, for ``transitions`` the steps' ``(M_t, b_t)``
    (each ``(G, 2, 2)`` and ``(G, 2)``, :func:`~hydrattr._core.fused.sgd_transition`).

    Returns
    -------
    c : ndarray of shape (T, G), float64
    """
    T = len(transitions)
    if T == 0:
        return np.zeros((0, 0))
    G = np.asarray(transitions[0][1]).shape[0]
    c = np.zeros((T, G))
    u = np.tile([1.0, 0.0], (G, 1))  # e0^T M_{T-1} ... M_{t+1}, one row vector per group
    for t in range(T - 1, -1, -1):
        M, b = transitions[t]
        c[t] = (u * b).sum(1)
        u = np.einsum("gi,gij->gj", u, M)
    return c


class FactorLogStore(DeferredStore):
    """:class:`~hydrattr._core.deferred.DeferredStore` whose factored ``Linear`` terms go
    to a log instead of its ring; see the module docstring. Same use; :meth:`set_layout`
    (before the first commit) switches the log on, and :meth:`finish` then returns a
    :class:`FactoredStore` (without a factored layout it is a plain
    :class:`~hydrattr._core.deferred.DeferredStore` and returns ``store``).

    Parameters
    ----------
    store : SampleStore
        The full store (kind ``"dense"`` or ``"half"``); used only if no layout is set.
    group_sizes, ring_rows, tol : see :class:`~hydrattr._core.deferred.DeferredStore`.
    capacity : int
        Expected number of logged entries (rows x epochs); the log grows past it.
    """

    def __init__(self, store, group_sizes, ring_rows=256, tol=None, capacity=1024):
        if store.kind not in ("dense", "half"):
            raise ValueError(f"FactorLogStore: a dense or half store, got {store.kind!r}.")
        super().__init__(store, group_sizes, ring_rows=ring_rows, tol=tol)
        self.full_store = store
        self.capacity = max(int(capacity), 1)
        self.steps_mb = []  # every registered step's (M, b)
        self.logging = False
        self._log_reserved = None

    def set_layout(self, layout):
        if not layout.factored:
            return super().set_layout(layout)
        if self.entries or (self.rho != 0).any():
            raise RuntimeError("FactorLogStore.set_layout after terms were committed")
        if layout.n_params != self.full_store.shape[1]:
            raise ValueError(f"FactorLogStore.set_layout: the layout has {layout.n_params} "
                             f"coordinates, the store {self.full_store.shape[1]}.")
        full = self.full_store
        # the group sizes within the dense part (a weight lies in one group)
        sizes = list(self.group_sizes)
        bounds = np.cumsum([0] + sizes)
        self.block_groups = []
        for off, o, i, _ in layout.blocks:
            g = int(np.searchsorted(bounds, off, side="right") - 1)
            sizes[g] -= o * i
            self.block_groups.append(g)
        self.store = SampleStore(full.shape[0], layout.dense_width, kind=full.kind,
                                 dtype=full.dtype)
        self.layout = layout
        self._ring_layout = FactorLayout(layout.dense_width)
        self.dense_sizes = sizes
        self.slices = group_slices(sizes, layout.dense_width)
        self.ring = self._new_ring(self.ring.shape[0])
        self.fring = None
        self.scale = np.ones(self.ring.shape[0])
        self.log = torch.empty(self.capacity, layout.factor_width, dtype=self.compute_dtype)
        self.log_slots = np.zeros(self.capacity, dtype=np.int64)
        self.log_steps = np.zeros(self.capacity, dtype=np.int64)
        self.count = 0
        self.logging = True

    def step(self, h):
        t = super().step(h)
        self.steps_mb.append(cached_transition(h, self._transitions))
        return t

    def reset(self):
        super().reset()
        self.count = 0  # the logged entries so far no longer count

    def _log_room(self, n):
        """Start of ``n`` free log rows (the log grows by half when full)."""
        if self.count + n > self.log.shape[0]:
            cap = max(self.count + n, self.log.shape[0] * 3 // 2)
            log = torch.empty(cap, self.log.shape[1], dtype=self.log.dtype)
            log[:self.count] = self.log[:self.count]
            self.log = log
            for name in ("log_slots", "log_steps"):
                a = getattr(self, name)
                setattr(self, name, np.concatenate([a[:self.count],
                                                    np.zeros(cap - self.count, np.int64)]))
        return self.count

    def reserve(self, n, dtype):
        self._log_reserved = None
        out = super().reserve(n, dtype)
        if out is None or not self.logging:
            return out
        if self.log.dtype != dtype:
            self._reserved = None
            return None
        start = self._log_room(n)
        self._log_reserved = (start, self.log[start:start + n])
        return out[0], self._log_reserved[1]

    def commit(self, slots, values, factors=None):
        if not self.logging:
            return super().commit(slots, values, factors)
        reserved, self._log_reserved = self._log_reserved, None
        slots = np.asarray(slots, dtype=np.int64)
        n = len(slots)
        if factors is None or tuple(factors.shape) != (n, self.layout.factor_width) or \
                (values is not None and tuple(values.shape) != (n, self.layout.dense_width)):
            raise ValueError(
                f"FactorLogStore.commit: expected {n} rows of {self.layout.dense_width} dense "
                f"values (or None) and {self.layout.factor_width} factors, got values "
                f"{None if values is None else tuple(values.shape)} and factors "
                f"{None if factors is None else tuple(factors.shape)}.")
        if self.n_steps == 0:
            raise RuntimeError("FactorLogStore.commit before any step")
        if values is not None:
            super().commit(slots, values)
        else:
            self._reserved = None
        if not n:
            return
        tic = time.perf_counter()
        if reserved is not None and factors.data_ptr() == reserved[1].data_ptr():
            start = self.count  # written in place already (moved if a reset came between)
            if reserved[0] != start:
                self.log[start:start + n] = self.log[reserved[0]:reserved[0] + n].clone()
        else:
            start = self._log_room(n)
            self.log[start:start + n] = factors.detach().to("cpu", self.log.dtype)
        self.log_slots[start:start + n] = slots
        self.log_steps[start:start + n] = self.n_steps - 1
        self.count = start + n
        self.seconds["commit"] += time.perf_counter() - tic

    def release(self):
        super().release()
        self.log = None

    def finish(self, chunk_rows=256):
        if not self.logging:
            return super().finish(chunk_rows)
        dense = super().finish(chunk_rows)
        tic = time.perf_counter()
        coefs = step_coefficients_backward(self.steps_mb)  # (T, G)
        n = self.count
        log = self.log[:n] if n * 5 >= self.log.shape[0] * 4 else self.log[:n].clone()
        self.log = None
        steps = self.log_steps[:n]
        for (off, o, i, f), g in zip(self.layout.blocks, self.block_groups):
            c = torch.from_numpy(coefs[steps, g]).to(log.dtype)
            log[:, f:f + o].mul_(c[:, None])
        out = FactoredStore(dense, self.layout, log, self.log_slots[:n].copy())
        self.seconds["finish"] += time.perf_counter() - tic
        return out


class FactoredStore:
    """The fast-mode store ``S`` with some ``Linear`` weights' blocks kept as logged
    pairs (``S``'s block of row ``r`` is ``sum_e go_e x_e^T`` over the entries ``e`` of
    ``r``, each ``go_e`` already times its coefficient); see the module docstring.

    Parameters
    ----------
    dense : SampleStore
        ``S``'s dense part (n, ``layout.dense_width``).
    layout : FactorLayout
    log : Tensor of shape (E, layout.factor_width)
    slots : ndarray of int, shape (E,)
        Each entry's row.
    """

    def __init__(self, dense, layout, log, slots):
        self.dense = dense
        self.layout = layout
        self.log = log
        self.shape = (dense.shape[0], layout.n_params)
        slots = np.asarray(slots, dtype=np.int64)
        self.order = np.argsort(slots, kind="stable")
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(slots,
                                                                  minlength=self.shape[0]))])

    @property
    def kind(self):
        return self.dense.kind

    @property
    def dtype(self):
        return self.dense.dtype

    @property
    def nbytes(self):
        return int(self.dense.nbytes + self.log.numel() * self.log.element_size()
                   + self.order.nbytes + self.indptr.nbytes)

    def rows(self, start, stop, out=None):
        """Full rows ``start:stop`` of ``S`` (compute dtype), into ``out`` if given."""
        n = stop - start
        dt = self.log.dtype
        if out is None:
            out = torch.empty(n, self.shape[1], dtype=dt)
        d = self.dense.data[start:stop]
        d = torch.from_numpy(np.asarray(d)) if isinstance(d, np.ndarray) else d
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        idx = torch.from_numpy(self.order[lo:hi])
        counts = np.diff(self.indptr[start:stop + 1])
        width = int(counts.max()) if n and len(idx) else 0
        row = torch.from_numpy(np.repeat(np.arange(n), counts))
        pos = torch.from_numpy(np.arange(hi - lo) - np.repeat(self.indptr[start:stop] - lo,
                                                             counts))
        entries = self.log.index_select(0, idx)
        for s0, s1, r0 in self.layout.segments:
            out[:, s0:s1].copy_(d[:, r0:r0 + s1 - s0])
        for off, o, i, f in self.layout.blocks:
            blk = out[:, off:off + o * i].view(n, o, i)
            if width == 0:
                blk.zero_()
                continue
            go = torch.zeros(n, width, o, dtype=dt)
            x = torch.zeros(n, width, i, dtype=dt)
            go[row, pos] = entries[:, f:f + o]
            x[row, pos] = entries[:, f + o:f + o + i]
            blk.copy_(torch.bmm(go.transpose(1, 2), x))
        return out

    @property
    def data(self):
        """Every row of ``S`` as one dense tensor (n, P): for checks on small stores."""
        return self.rows(0, self.shape[0])

    def matmul_t(self, other, chunk_rows=256, progress=None):
        """``S @ other.T`` (``other`` of shape (m, n_params)), chunk by chunk of rows."""
        other = other.detach().to("cpu", self.log.dtype)
        out = torch.empty(self.shape[0], other.shape[0], dtype=self.log.dtype)
        buf = None
        for start in range(0, self.shape[0], chunk_rows):
            stop = min(start + chunk_rows, self.shape[0])
            if buf is None or buf.shape[0] != stop - start:
                buf = torch.empty(stop - start, self.shape[1], dtype=self.log.dtype)
            torch.matmul(self.rows(start, stop, out=buf), other.T, out=out[start:stop])
            if progress is not None:
                progress.update(stop - start)
        return out

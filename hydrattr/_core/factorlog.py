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
        self.steps_mb.append((self.M, self.b))
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
        self.slots = slots = np.asarray(slots, dtype=np.int64)
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
                   + self.slots.nbytes + self.order.nbytes + self.indptr.nbytes)

    def _pairs(self, start, stop, blocks, views):
        """Write each block ``b`` in ``blocks`` (indices into ``layout.blocks``) of rows
        ``start:stop`` into ``views[b]`` (n, n_out, n_in): one batched product of each
        row's logged pairs, zero-padded to the row with the most entries."""
        n = stop - start
        dt = self.log.dtype
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        counts = np.diff(self.indptr[start:stop + 1])
        width = int(counts.max()) if n and hi > lo else 0
        if width == 0:
            for b in blocks:
                views[b].zero_()
            return
        entries = self.log.index_select(0, torch.from_numpy(self.order[lo:hi]))
        row = torch.from_numpy(np.repeat(np.arange(n), counts))
        pos = torch.from_numpy(np.arange(hi - lo) - np.repeat(self.indptr[start:stop] - lo,
                                                             counts))
        for b in blocks:
            off, o, i, f = self.layout.blocks[b]
            go = torch.zeros(n, width, o, dtype=dt)
            x = torch.zeros(n, width, i, dtype=dt)
            go[row, pos] = entries[:, f:f + o]
            x[row, pos] = entries[:, f + o:f + o + i]
            views[b].copy_(torch.bmm(go.transpose(1, 2), x))

    def _dense_rows(self, start, stop):
        d = self.dense.data[start:stop]
        d = torch.from_numpy(np.asarray(d)) if isinstance(d, np.ndarray) else d
        return d.to(self.log.dtype)

    def rows(self, start, stop, out=None):
        """Full rows ``start:stop`` of ``S`` (compute dtype), into ``out`` if given."""
        n = stop - start
        if out is None:
            out = torch.empty(n, self.shape[1], dtype=self.log.dtype)
        d = self._dense_rows(start, stop)
        for s0, s1, r0 in self.layout.segments:
            out[:, s0:s1].copy_(d[:, r0:r0 + s1 - s0])
        views = {b: out[:, off:off + o * i].view(n, o, i)
                 for b, (off, o, i, _) in enumerate(self.layout.blocks)}
        self._pairs(start, stop, list(views), views)
        return out

    @property
    def data(self):
        """Every row of ``S`` as one dense tensor (n, P): for checks on small stores."""
        return self.rows(0, self.shape[0])

    def _rank_one(self, other, b, chunk=64):
        """``(u, v)`` with ``other``'s block ``b`` of every row equal to ``u_j v_j^T`` to
        100 eps of its norm (a ``Linear`` layer's per-sample gradient, run once on one
        position), else None."""
        off, o, i, _ = self.layout.blocks[b]
        m = other.shape[0]
        tol = 100 * float(torch.finfo(other.dtype).eps)
        us, vs = [], []
        for s in range(0, m, chunk):
            A = other[s:s + chunk, off:off + o * i].reshape(-1, o, i)
            r = A.norm(dim=2).argmax(1)
            v = A[torch.arange(A.shape[0]), r]  # (k, i): one row of each block
            vn = (v * v).sum(1)
            u = torch.bmm(A, v[:, :, None])[..., 0] / torch.where(vn > 0, vn, 1.0)[:, None]
            res = (A - u[:, :, None] * v[:, None, :]).flatten(1).norm(dim=1)
            if bool((res > tol * A.flatten(1).norm(dim=1)).any()):
                return None
            us.append(u)
            vs.append(v)
        return torch.cat(us), torch.cat(vs)

    def matmul_t(self, other, chunk_rows=256, progress=None, chunk_entries=8192):
        """``S @ other.T`` (``other`` of shape (m, n_params)).

        A block whose logged pairs take fewer numbers a row than the block itself, and
        whose rows of ``other`` are each rank one (per-test-point gradients of a
        ``Linear`` layer run once), is multiplied as factors: ``sum_e (go_e . u_j)
        (x_e . v_j)`` over each row's entries. The dense part and every other block are
        materialised chunk by chunk of rows and multiplied by ``other``'s columns."""
        dt = self.log.dtype
        other = other.detach().to("cpu", dt)
        m = other.shape[0]
        if m == 0:
            return torch.zeros(self.shape[0], 0, dtype=dt)
        per_row = self.log.shape[0] / max(self.shape[0], 1)
        factored = {}
        for b, (off, o, i, _) in enumerate(self.layout.blocks):
            if per_row * (o + i) < o * i:
                uv = self._rank_one(other, b)
                if uv is not None:
                    factored[b] = uv
        self.factored_blocks_ = sorted(factored)  # which blocks the last call factored
        rest = [b for b in range(len(self.layout.blocks)) if b not in factored]
        # the materialised rows' columns: the dense part, then each remaining block
        cols = [other[:, s0:s1] for s0, s1, _ in self.layout.segments]
        cols += [other[:, off:off + o * i] for b in rest
                 for off, o, i, _ in [self.layout.blocks[b]]]
        G = torch.cat(cols, 1) if cols else other[:, :0]
        width = G.shape[1]
        out = torch.zeros(self.shape[0], m, dtype=dt)
        buf = None
        for start in range(0, self.shape[0], chunk_rows):
            stop = min(start + chunk_rows, self.shape[0])
            n = stop - start
            if buf is None or buf.shape[0] != n:
                buf = torch.empty(n, width, dtype=dt)
            buf[:, :self.layout.dense_width].copy_(self._dense_rows(start, stop))
            pos, views = self.layout.dense_width, {}
            for b in rest:
                _, o, i, _ = self.layout.blocks[b]
                views[b] = buf[:, pos:pos + o * i].view(n, o, i)
                pos += o * i
            self._pairs(start, stop, rest, views)
            torch.matmul(buf, G.T, out=out[start:stop])
            if progress is not None:
                progress.update(n)
        slots = torch.from_numpy(self.slots)
        for b, (u, v) in factored.items():
            _, o, i, f = self.layout.blocks[b]
            for e0 in range(0, self.log.shape[0], chunk_entries):
                e1 = min(e0 + chunk_entries, self.log.shape[0])
                A = self.log[e0:e1, f:f + o] @ u.T
                A.mul_(self.log[e0:e1, f + o:f + o + i] @ v.T)
                out.index_add_(0, slots[e0:e1], A)
        return out

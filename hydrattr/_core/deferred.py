"""Fast mode during training in one vector per row: terms folded once their momentum fades.

The no-Hessian tangent of a step's term ``g`` (:mod:`~hydrattr._core.fused`) is a 2-vector
per parameter group, ``q = (dtheta, dv)`` coefficients, carried forward by the same 2x2
transition ``M_t`` for every row: ``q <- M_t q``. ``M_t`` has a slow mode (eigenvalue
near 1) and a fast one (near the momentum ``p``), so after ``k`` steps every term's
``q`` points along one common direction ``z_t`` (the transitions' product applied to
anything) up to a part of relative size about ``p^k``. Terms whose ``q`` is that close
to ``z_t`` are folded into one vector per row::

    S_i <- S_i + (q . z_t / kappa_t) g        (state of the folded terms: S_i (x) kappa_t z_t)

where ``kappa_t z_t`` (``z`` a unit vector, ``kappa`` a float64 scale) follows the
transitions exactly from then on. Until then a term waits in a ring of the last steps'
gradients, and :meth:`DeferredStore.finish` adds the waiting terms with their exact
final coefficients and scales each row by ``kappa_T z_T[0]``. The only approximation
is the part of ``q`` left out when a term is folded, at most ``tol |q|`` (``tol`` a
fraction of the store dtype's rounding), so the result equals the two-pass fit's
``S`` to float rounding, as :class:`~hydrattr._core.fused.LazyStore`'s does.

Against :class:`~hydrattr._core.fused.LazyStore` (two vectors per row, the parameter
and velocity parts, read and written each time the row enters a batch) this keeps one
vector per row plus the ring, ``K x B`` rows for ``K`` steps (about
``log(tol) / log(p)``: 200 at momentum 0.9 for a float32 store), whatever the number of
rows, and folds a term in one pass over its row. :func:`ring_rows` says how many rows
the ring takes, so the caller can pick whichever of the two needs less memory.

A row's vector is held with a float64 scale of its own (``S_i = rho_i X_i``): adding a
term is one vector operation, ``X += (A / rho) g`` or, when the new coefficient is the
larger, ``X <- (rho / A) X + g``, so the stored values stay the size of the gradients
(what a float16 store needs). A float16 store keeps its ring in float16 too, each ring
row divided by its largest entry.

With a :class:`~hydrattr._core.factors.FactorLayout` (:meth:`DeferredStore.set_layout`)
the ring holds each term's dense part and its ``Linear`` factors instead of the full
row, and a ring entry is written back to full rows, in a reused block, just before it is
folded.

Pure torch and numpy: nothing here knows skorch.
"""
from __future__ import annotations

import math
import time
from collections import deque

import numpy as np
import torch

from .factors import FactorLayout
from .fused import cached_transition
from .sgd import group_slices
from .outofcore import release, touch
from .store import SampleStore

__all__ = ["DeferredStore", "fold_steps", "ring_rows"]


def _tolerance(dtype):
    """Relative part of a term that may be left out when it is folded: a hundredth of the
    store dtype's rounding (float16: a tenth), and no less than what the float64 2x2
    products resolve (a float64 store: 32 eps)."""
    if dtype == torch.float16:
        return 1e-4
    return max(float(torch.finfo(dtype).eps) / 100, 32 * float(np.finfo(np.float64).eps))


def fold_steps(momentum, dtype=torch.float32):
    """Steps after which a term's momentum part is below the fold tolerance (an estimate
    for sizing the ring: the fold itself checks each term)."""
    p = float(momentum)
    if p <= 0:
        return 2
    # the fold's measure of a fresh term's momentum part starts near 1 and decays as p^k
    # (measured: the first fold at 196 steps for p = 0.9 and a float32 store, 88 for
    # float16, at any learning rate); a few steps more for dampening, Nesterov, decay
    return int(math.ceil(math.log(_tolerance(dtype)) / math.log(p))) + 4


def ring_rows(momentum, batch_size, dtype=torch.float32):
    """Rows of the ring of waiting terms for a run at ``momentum`` and ``batch_size``."""
    return (fold_steps(momentum, dtype) + 2) * int(batch_size)


class DeferredStore:
    """The fast-mode store filled during training, one vector per row; see the module
    docstring. Same use as :class:`~hydrattr._core.fused.LazyStore`.

    Parameters
    ----------
    store : SampleStore
        Receives ``S``; any kind (dense, half, memmap).
    group_sizes : list of int
        Flat coordinates per optimizer parameter group.
    ring_rows : int
        Initial rows of the ring of waiting terms (:func:`ring_rows`); it grows if the
        terms take longer to fold than that.
    directory : str or None
        For a memmap ring (``store.kind == "memmap"``).
    tol : float or None
        Fold tolerance (None: from the store's dtype).

    Use: for every optimizer step, :meth:`step` with its hyperparameters, then
    :meth:`commit` with the tracked rows' slots and ``w_t g_{t,i}``; :meth:`reset`
    forgets every row's terms so far; :meth:`finish` returns ``store`` holding ``S``.
    :meth:`set_layout`, before the first commit, makes the ring hold the terms as a
    dense part and ``Linear`` factors (then :meth:`commit` takes both).
    """

    def __init__(self, store, group_sizes, ring_rows=256, directory=None, tol=None):
        self.store = store
        # the terms' form (``layout``) and the ring's (the same here; a subclass may
        # hold the factors elsewhere)
        self.layout = self._ring_layout = FactorLayout(store.shape[1])  # nothing factored
        self.fring = None  # the ring's factor part (rows, factor_width), compute dtype
        self.group_sizes = [int(s) for s in group_sizes]
        self.slices = group_slices(self.group_sizes, store.shape[1])
        self.directory = directory
        self.tol = _tolerance(store.data.dtype if isinstance(store.data, torch.Tensor)
                              else store.dtype) if tol is None else float(tol)
        n_groups = len(self.group_sizes)
        self.compute_dtype = torch.float64 if store.dtype == torch.float64 else torch.float32
        self.z = np.tile([1.0, 0.0], (n_groups, 1))   # the common direction, unit per group
        self.kappa = np.ones(n_groups)                # its scale
        self.rho = np.zeros((store.shape[0], n_groups))  # row scales (0: no term yet)
        self._transitions = {}
        self.n_steps = 0
        self.start = 0
        self.M = self.b = None  # the last step's transition (G, 2, 2) and injection (G, 2)
        self.w = np.ones((n_groups, 2))  # the fold's metric (_metric)
        # the ring of waiting terms: entries (start, n, slots), their q (m, G, 2)
        self.ring = self._new_ring(max(int(ring_rows), 1))
        self.scale = np.ones(self.ring.shape[0])      # ring row r holds g / scale[r]
        self.entries = deque()
        self.q = np.zeros((0, n_groups, 2))
        self.q0 = np.zeros((0, n_groups))  # |q| when the entry was committed
        self.head = 0
        self._reserved = None
        self.seconds = {"commit": 0.0, "finish": 0.0}

    # -- the ring ------------------------------------------------------------------------
    def set_layout(self, layout):
        """Hold the terms as ``layout`` says (:class:`FactorLayout` of the store's width):
        :meth:`commit` then takes the dense part and the factors. Only before the first
        commit."""
        if self.entries or (self.rho != 0).any():
            raise RuntimeError("DeferredStore.set_layout after terms were committed")
        if layout.n_params != self.store.shape[1]:
            raise ValueError(f"DeferredStore.set_layout: the layout has {layout.n_params} "
                             f"coordinates, the store {self.store.shape[1]}.")
        self.layout = self._ring_layout = layout
        rows = self.ring.shape[0]
        self.ring = self._new_ring(rows)
        self.fring = self._new_fring(rows)

    def _new_ring(self, rows):
        s = self.store
        width = self._ring_layout.dense_width
        if s.kind == "memmap":
            return SampleStore(rows, width, kind="memmap", dtype=s.dtype,
                               directory=self.directory).data
        dtype = torch.float16 if s.kind == "half" else s.data.dtype
        return torch.empty(rows, width, dtype=dtype)

    def _new_fring(self, rows):
        if not self._ring_layout.factored:
            return None
        return torch.empty(rows, self._ring_layout.factor_width, dtype=self.compute_dtype)

    def _alloc(self, n):
        """Start of ``n`` contiguous free ring rows (the ring grows when there are none)."""
        cap = self.ring.shape[0]
        if not self.entries:
            self.head = 0
            if n <= cap:
                return 0
        else:
            tail = self.entries[0][0]
            if self.head > tail:
                if self.head + n <= cap:
                    return self.head
                if n <= tail:
                    return 0
            elif self.head < tail and self.head + n <= tail:
                return self.head
        self._grow(n)
        return self.head

    def _grow(self, n):
        """A larger ring holding the waiting entries from row 0, in order."""
        cap = self.ring.shape[0]
        new = self._new_ring(max(2 * cap, cap + 4 * n))
        fnew = self._new_fring(new.shape[0])
        scale = np.ones(new.shape[0])
        pos, entries = 0, deque()
        for start, k, slots in self.entries:
            new[pos:pos + k] = self.ring[start:start + k]
            if fnew is not None:
                fnew[pos:pos + k] = self.fring[start:start + k]
            scale[pos:pos + k] = self.scale[start:start + k]
            entries.append((pos, k, slots))
            pos += k
        self.ring, self.fring, self.scale, self.entries, self.head = \
            new, fnew, scale, entries, pos

    def _ring_rows(self, start, n):
        """Ring rows ``start:start+n`` as a compute-dtype tensor."""
        block = self.ring[start:start + n]
        if isinstance(block, np.ndarray):
            out = torch.from_numpy(np.asarray(block))
            touch(self.ring, out.numel() * out.element_size())
            return out
        return block if block.dtype == self.compute_dtype else block.to(self.compute_dtype)

    def _terms(self, start, n):
        """``(g, scale)``: ring rows ``start:start+n`` as full compute-dtype rows and the
        per-row factor they are still to be multiplied by (with a factored layout the
        rows are written back into a reused block, already scaled)."""
        if not self._ring_layout.factored:
            return self._ring_rows(start, n), self._pending_scale(start, n)
        return self._full(self.ring[start:start + n], self.fring[start:start + n],
                          self.scale[start:start + n]), self._pending_scale(start, n)

    def _pending_scale(self, start, n):
        """The per-row factor ring rows ``start:start+n`` are still to be multiplied by
        once read: their ``scale``, or 1 with a factored layout (whose rows are written
        back already scaled)."""
        return np.ones(n) if self._ring_layout.factored else self.scale[start:start + n]

    def _gathered(self, idx):
        """With a factored layout: ring rows ``idx`` as full rows, scaled (a reused
        block)."""
        t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        dense = self.ring[idx] if isinstance(self.ring, np.ndarray) else \
            self.ring.index_select(0, t)
        return self._full(dense, self.fring.index_select(0, t), self.scale[idx])

    def _full(self, dense, factors, scale):
        """Dense parts and factors written back to full compute-dtype rows in a reused
        block (a float16 ring's rows times their ``scale``)."""
        if isinstance(dense, np.ndarray):
            dense = torch.from_numpy(np.asarray(dense))
            touch(self.ring, dense.numel() * dense.element_size())
        scale = torch.from_numpy(scale).to(self.compute_dtype) \
            if self.store.kind == "half" else None
        out = self._block("_gbuf", dense.shape[0], self.store.shape[1])
        return self._ring_layout.materialize(dense, factors, out, scale)

    # -- steps ---------------------------------------------------------------------------
    def __len__(self):
        return self.n_steps

    def step(self, h):
        """Register the next optimizer step's hyperparameters (``SGDHyper.at`` dict or a
        recorded row); returns its index."""
        M, b = cached_transition(h, self._transitions)
        z = np.einsum("gij,gj->gi", M, self.z)
        norm = np.sqrt((z * z).sum(1))
        for j in np.flatnonzero(norm == 0):  # everything so far maps to zero
            self.rho[:, j] = 0.0
            z[j], norm[j], self.kappa[j] = (1.0, 0.0), 1.0, 1.0
        self.z = z / norm[:, None]
        self.kappa = self.kappa * norm
        far = (self.kappa < 1e-100) | (self.kappa > 1e100)
        if far.any():  # fold kappa into the row scales (float64, rarely)
            self.rho[:, far] *= self.kappa[far]
            self.kappa[far] = 1.0
        if len(self.q):
            self.q = np.einsum("gij,mgj->mgi", M, self.q)
        self.M, self.b = M, b
        self.w = self._metric(h)
        self.n_steps += 1
        return self.n_steps - 1

    @staticmethod
    def _metric(h):
        """Per group, the weight of a tangent's velocity part against its parameter part
        when measuring what a fold leaves out: ``lr / (1 - momentum)``, what a velocity
        of 1 still adds to the parameters (at this step's rate), so a term folds after
        the same number of steps whatever the learning rate; 1 where the rate is zero."""
        lr = np.asarray(h["lr"], dtype=float).ravel()
        p = np.asarray(h["momentum"], dtype=float).ravel()
        with np.errstate(divide="ignore", invalid="ignore"):
            wv = np.where(lr > 0, lr / np.maximum(1.0 - p, 1e-12), 1.0)
        return np.stack([np.ones_like(wv), wv], -1)  # (G, 2)

    def reset(self):
        """Forget every row's terms: the next step is the first that counts."""
        self.rho[:] = 0.0
        self.entries.clear()
        self.q, self.q0 = self.q[:0], self.q0[:0]
        self.head = 0
        self.start = self.n_steps

    def reserve(self, n, dtype):
        """Ring rows for the next commit's ``n`` terms, to be written in place (the
        backward hooks' buffers): ``(dense, factors)`` (``factors`` None without a
        factored layout), or None where the ring cannot take them as they are (float16,
        memmap, another dtype). A :meth:`commit` of those very blocks copies nothing."""
        self._reserved = None
        if not isinstance(self.ring, torch.Tensor) or self.ring.dtype != dtype or \
                self.store.kind == "half":
            return None
        start = self._alloc(n)
        fac = None if self.fring is None else self.fring[start:start + n]
        self._reserved = (start, self.ring[start:start + n], fac)
        return self._reserved[1:]

    def commit(self, slots, values, factors=None):
        """Add the last registered step's terms ``w_t g_{t,i}`` of the rows in store slots
        ``slots``: ``values`` (n, P), or with a factored layout its dense part
        (n, dense_width; None: zero) and ``factors`` (n, factor_width). A slot may appear
        more than once (its terms add)."""
        if self.n_steps == 0:
            raise RuntimeError("DeferredStore.commit before any step")
        slots = np.asarray(slots, dtype=np.int64)
        reserved, self._reserved = getattr(self, "_reserved", None), None
        if not len(slots):
            return
        n = len(slots)
        width = self._ring_layout.dense_width
        if (factors is None) == self._ring_layout.factored or \
                (values is not None and tuple(values.shape) != (n, width)) or \
                (factors is not None and tuple(factors.shape) != (n, self._ring_layout.factor_width)):
            raise ValueError(
                f"DeferredStore.commit: expected {n} rows of {width} dense values"
                + (f" and {self._ring_layout.factor_width} factors" if self._ring_layout.factored
                   else "") + f", got values {None if values is None else tuple(values.shape)}"
                f" and factors {None if factors is None else tuple(factors.shape)}.")
        tic = time.perf_counter()
        if reserved is not None and values is not None and \
                values.data_ptr() == reserved[1].data_ptr() and \
                (factors is None or factors.data_ptr() == reserved[2].data_ptr()):
            start = reserved[0]  # written in place already
            self.scale[start:start + n] = 1.0
        else:
            start = self._alloc(n)
            if values is None:
                self.ring[start:start + n] = 0
                self.scale[start:start + n] = 1.0
            else:
                self._write_ring(start, values.detach().to("cpu"))
            if factors is not None:
                self.fring[start:start + n] = factors.detach().to("cpu", self.compute_dtype)
        self.entries.append((start, n, slots))
        b = self.b[None].astype(np.float64)
        self.q = np.concatenate([self.q, b])
        wb = b * self.w[None]
        self.q0 = np.concatenate([self.q0, np.sqrt((wb * wb).sum(2))])
        self.head = start + n
        self._fold_ready()
        self.seconds["commit"] += time.perf_counter() - tic

    def _write_ring(self, start, values):
        n = values.shape[0]
        if self.store.kind == "half":  # each float16 ring row divided by its largest entry
            # reused: a fresh block a step costs page faults
            scaled = self._scratch(n, values.shape[1])
            peak = torch.abs(values, out=scaled).amax(1).to(torch.float64)
            # a row of zeros (or of values 1/peak would overflow) is kept as it is
            peak = torch.where(peak > float(torch.finfo(values.dtype).tiny) * 4, peak, 1.0)
            self.scale[start:start + n] = peak.numpy()
            torch.mul(values, (1.0 / peak).to(values.dtype)[:, None], out=scaled)
            values = scaled
        else:
            self.scale[start:start + n] = 1.0
        block = self.ring[start:start + n]
        if isinstance(block, np.ndarray):
            block[:] = values.numpy().astype(block.dtype, copy=False)
            touch(self.ring, values.numel() * block.itemsize)
        else:
            block.copy_(values)

    def _scratch(self, n, width=None):
        """A reused ``(n, width)`` compute-dtype block (``width``: the store's)."""
        return self._block("_buf", n, self.store.shape[1] if width is None else width)

    def _block(self, name, n, width):
        """A reused ``(n, width)`` compute-dtype block kept in attribute ``name``."""
        buf = getattr(self, name, None)
        if buf is None or buf.numel() < n * width:
            buf = torch.empty(n * width, dtype=self.compute_dtype)
            setattr(self, name, buf)
        return buf[:n * width].view(n, width)

    def _fold_ready(self):
        """Fold the oldest waiting entries whose ``q`` lies along ``z`` (the part across
        it at most ``tol`` of ``q``), or has decayed below ``tol`` of its size when
        committed (a group at learning rate zero only decays its velocity part)."""
        k = 0
        wz = self.z * self.w  # the metric of _metric
        wzn = np.sqrt((wz * wz).sum(1))
        while k < len(self.entries):
            q = self.q[k] * self.w
            qn = np.sqrt((q * q).sum(1))
            cross = np.abs(q[:, 0] * wz[:, 1] - q[:, 1] * wz[:, 0]) / wzn
            if np.any((cross > self.tol * qn) & (qn > self.tol * self.q0[k])):
                break
            k += 1
        for _ in range(k):
            start, n, slots = self.entries.popleft()
            # the component along z (least squares in the same metric)
            coef = ((self.q[0] * self.w) * wz).sum(1) / (wzn * wzn) / self.kappa  # (G,)
            self.q, self.q0 = self.q[1:], self.q0[1:]
            self._fold(start, n, slots, coef)

    def _fold(self, start, n, slots, coef):
        """``S[slots] += coef * g`` for a ring entry, row by row, one pass per group part."""
        g, scale = self._terms(start, n)
        data = self.store.data
        half = data.dtype == torch.float16 if isinstance(data, torch.Tensor) else False
        memmap = isinstance(data, np.ndarray)
        parts = list(enumerate(self.slices))
        row = torch.empty(self.store.shape[1], dtype=self.compute_dtype) if half else None
        for k, r in enumerate(slots.tolist()):
            x = torch.from_numpy(data[r]) if memmap else \
                (row.copy_(data[r]) if half else data[r])
            for j, sl in parts:
                A = float(coef[j] * scale[k])
                if A == 0.0:
                    continue
                xs = x if len(parts) == 1 else x[sl]
                gs = g[k] if len(parts) == 1 else g[k][sl]
                rho = self.rho[r, j]
                if rho == 0.0:
                    xs.copy_(gs)
                    self.rho[r, j] = A
                elif abs(A) <= abs(rho):
                    xs.add_(gs, alpha=A / rho)
                else:
                    torch.add(gs, xs, alpha=rho / A, out=xs)
                    self.rho[r, j] = A
            if half:
                data[r].copy_(x)
        if memmap:
            touch(data, 2 * n * self.store.shape[1] * data.itemsize)

    def release(self):
        """Drop the ring (the store is abandoned: filled again another way)."""
        self.ring = self.fring = self._buf = self._gbuf = None
        self.entries.clear()

    def finish(self, chunk_rows=256):
        """Scale each row to ``S`` and add the terms still waiting (with their exact final
        coefficients ``q[0]``), chunk by chunk of the store: one pass over it."""
        tic = time.perf_counter()
        data = self.store.data
        n_rows = self.store.shape[0]
        factor = self.rho * (self.kappa * self.z[:, 0])[None, :]  # (N, G)
        # the waiting terms: store slot, ring row and coefficient per group, by slot
        slots, ring_idx, coefs = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], \
            [np.zeros((0, len(self.slices)))]
        for (start, n, sl), q in zip(self.entries, self.q):
            slots.append(sl)
            ring_idx.append(np.arange(start, start + n))
            coefs.append(self._pending_scale(start, n)[:, None] * q[None, :, 0])
        slots, ring_idx, coefs = (np.concatenate(a) for a in (slots, ring_idx, coefs))
        order = np.argsort(slots, kind="stable")
        slots, ring_idx, coefs = slots[order], ring_idx[order], coefs[order]
        in_place = isinstance(data, torch.Tensor) and data.dtype == self.compute_dtype
        for s in range(0, n_rows, chunk_rows):
            e = min(s + chunk_rows, n_rows)
            f = torch.from_numpy(factor[s:e])
            if isinstance(data, np.ndarray):
                block = torch.from_numpy(np.asarray(data[s:e]))  # a view of the file
            else:
                block = data[s:e] if in_place else self._scratch(e - s).copy_(data[s:e])
            for j, sl in enumerate(self.slices):
                part = block[:, sl]
                part.mul_(f[:, j, None].to(block.dtype))
                empty = torch.nonzero(f[:, j] == 0).flatten()
                if len(empty):  # rows without a folded term (whatever was left there)
                    part[empty] = 0.0
            lo, hi = np.searchsorted(slots, [s, e])
            for k in range(lo, hi):  # row by row: the ring row is read once, not gathered
                if not self._ring_layout.factored:
                    g = self._ring_rows(int(ring_idx[k]), 1)[0]
                else:  # full rows written back a few dozen at a time
                    if (k - lo) % 64 == 0:
                        rows = self._gathered(ring_idx[k:min(k + 64, hi)])
                    g = rows[(k - lo) % 64]
                x = block[int(slots[k]) - s]
                for j, sl in enumerate(self.slices):
                    c = float(coefs[k, j])
                    if c != 0.0:
                        x[sl].add_(g[sl], alpha=c)
            if isinstance(data, np.ndarray):  # both mappings released every chunk: the
                release(data)                 # ring rows are read in random order, and
                release(self.ring)            # the kernel maps more than each row around
            elif not in_place:
                data[s:e].copy_(block)
        self.entries.clear()
        self.q, self.q0 = self.q[:0], self.q0[:0]
        self.ring = self.fring = self._buf = self._gbuf = None
        self.seconds["finish"] += time.perf_counter() - tic
        return self.store

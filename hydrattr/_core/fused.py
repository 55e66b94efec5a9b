"""Fast mode during training: per-sample terms committed with a lazily propagated coefficient.

Fast mode (Hessian dropped) needs ``S_i = sum_{t: i in B_t} w_t coef_t * g_{t,i}``, and
``coef_t`` depends on every learning rate *after* step ``t``, so it is unknown when
``g_{t,i}`` is computed. Forward, the same sum is the tangent of the SGD recurrence
without its Hessian term (:func:`~hydrattr._core.sgd.tangent_step`), which is linear
with one 2x2 transition per parameter group, the same for every row::

    (dtheta, dv)_t+1 = M_t (dtheta, dv)_t + b_t * [i in B_t] w_t g_{t,i}

So each tracked row keeps its state (parameter part ``P_i``, velocity part ``V_i``) as
of the last step it entered, and is brought forward only when it enters the next batch,
by the product of the transitions since (:class:`LazyStore`). Products of any range of
steps come from an online sparse table of the per-step 2x2 matrices (float64, O(log T)
small products per query, no inverses: the momentum part decays as ``p^k``, so prefix
products are not invertible in floating point). After the last step a final sweep
applies each row's remaining product; ``P`` is then ``S`` exactly as the two-pass fit
(:func:`~hydrattr._core.sweep.build_fast_store`) fills it, up to float rounding.

The row update is memory-bound (a LeNet-5 row's two parts are 2 x 247 KB, read and
written back each time the row enters a batch), so it is written in as few passes over
the row as torch's vector operations allow: a row's state is held as two coordinate
vectors in a 2x2 basis of its own (float64, per row and group), the transition is
applied to the basis, and the vectors only take the injected gradient and one shear
that keeps the basis orthogonal (:func:`_step_part`: three passes where the direct form
takes six, one for a row's first term); the final sweep computes the parameter part
from the coordinates.

Per-sample gradients come from the training backward itself (:class:`PerSampleHooks`):
each ``Linear`` / ``Conv2d`` layer's input times its output gradient, as Opacus computes
them. The output gradient of the batch loss already carries each sample's weight ``w``,
so the hooks give ``w g_{t,i}`` directly, and they only observe: training is the plain
``net.fit``, bit for bit.

Pure torch and numpy: nothing here knows skorch.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn
from torch.func import vmap

from .sgd import SGDHyper, group_slices, tangent_step
from .outofcore import touch
from .store import SampleStore
from .trajectory import Trajectory

__all__ = ["sgd_transition", "RangeProducts", "LazyStore", "PerSampleHooks",
           "LeanTrajectory"]


def sgd_transition(h):
    """One SGD step's no-Hessian tangent map, per group: ``M`` (G, 2, 2) and ``b`` (G, 2).

    The state is ``(dtheta, dv)``; ``M`` and ``b`` are read off
    :func:`~hydrattr._core.sgd.tangent_step` applied to unit inputs (so momentum,
    dampening, Nesterov, weight decay and the first-step buffer follow that one
    implementation). ``h`` is a step's hyperparameters (:meth:`SGDHyper.at`).
    """
    n_groups = h["lr"].shape[0]
    one = torch.ones(n_groups, dtype=torch.float64)
    zero = torch.zeros(n_groups, dtype=torch.float64)
    ident = lambda x: x  # noqa: E731 (per-group scalars need no expansion)
    p0, v0 = tangent_step(one, zero, zero, h, ident)    # from dtheta
    p1, v1 = tangent_step(zero, one, zero, h, ident)    # from dv
    pb, vb = tangent_step(zero, zero, one, h, ident)    # from the injected gradient
    M = torch.stack([torch.stack([p0, p1], -1), torch.stack([v0, v1], -1)], -2)
    return M.numpy(), torch.stack([pb, vb], -1).numpy()


def cached_transition(h, cache):
    """:func:`sgd_transition` of a step's hyperparameters; a recorded row (dict of
    lists) is looked up in ``cache`` first: steps with the same hyperparameters share one
    transition (most steps of a run; computing it takes ~0.2 ms, a tenth of a small
    step)."""
    if isinstance(h, dict) and not isinstance(h.get("lr"), torch.Tensor):
        key = tuple((k, tuple(v)) for k, v in h.items())
        if key not in cache:
            cache[key] = sgd_transition(hyper_of(h))
        return cache[key]
    return sgd_transition(h)


def hyper_of(row):
    """A recorded hyperparameter row (dict of per-group lists) as :meth:`SGDHyper.at`."""
    return SGDHyper.from_rows([row]).at(0)


class RangeProducts:
    """Products ``M_{s+L-1} ... M_s`` of per-step (G, 2, 2) matrices, appended online.

    Level ``j`` holds the product of the ``2^j`` steps from each ``k``; a level-``j``
    entry is known once step ``k + 2^j - 1`` is appended. A query of length ``L`` takes
    one entry per set bit of ``L``, vectorised over the queried rows.
    """

    def __init__(self, n_groups):
        self.n_groups = int(n_groups)
        self.levels = []
        self.n = 0

    def _set(self, j, k, val):
        if j == len(self.levels):
            self.levels.append(np.empty((max(16, k + 1), self.n_groups, 2, 2)))
        lev = self.levels[j]
        if k >= len(lev):
            grown = np.empty((max(2 * len(lev), k + 1),) + lev.shape[1:])
            grown[:len(lev)] = lev
            self.levels[j] = lev = grown
        lev[k] = val

    def append(self, M):
        t = self.n
        self._set(0, t, M)
        j = 1
        while (1 << j) <= t + 1:
            k = t - (1 << j) + 1
            half = 1 << (j - 1)
            self._set(j, k, self.levels[j - 1][k + half] @ self.levels[j - 1][k])
            j += 1
        self.n += 1

    def __len__(self):
        return self.n

    def product(self, start, length):
        """``(n, G, 2, 2)``: for each query the product of ``length`` steps from ``start``
        (later steps on the left; length 0 is the identity)."""
        start = np.asarray(start, dtype=np.int64)
        length = np.asarray(length, dtype=np.int64)
        if len(length) and (length.min() < 0 or (start + length).max() > self.n):
            raise ValueError("RangeProducts: range outside the appended steps")
        out = np.broadcast_to(np.eye(2), (len(start), self.n_groups, 2, 2)).copy()
        pos = start.copy()
        for j in range(len(self.levels) - 1, -1, -1):
            sel = ((length >> j) & 1).astype(bool)
            if sel.any():
                out[sel] = self.levels[j][pos[sel]] @ out[sel]
                pos[sel] += 1 << j
        return out


def _read(store, rows, dtype):
    """Rows ``rows`` (int64 numpy) of a :class:`SampleStore` as a ``dtype`` tensor."""
    data = store.data
    if isinstance(data, np.ndarray):
        block = torch.from_numpy(np.ascontiguousarray(data[rows]))
        touch(data, block.numel() * block.element_size())
        return block.to(dtype)
    return data.index_select(0, torch.from_numpy(rows)).to(dtype)


def _write(store, rows, values):
    data = store.data
    if isinstance(data, np.ndarray):
        data[rows] = values.to(store.dtype).numpy()
        touch(data, values.numel() * data.itemsize)
    else:
        data.index_copy_(0, torch.from_numpy(rows), values.to(data.dtype))


def _combine(x, own, terms):
    """``x <- (own * x + sum_k c_k y_k) / s`` in place; returns the scale ``s``.

    ``terms`` is a list of ``(c_k, y_k)``. One pass over ``x`` per term with a nonzero
    coefficient (``Tensor.add_``, or ``torch.add(y, x, out=x)`` where another term is
    the base): the sum is left divided by its largest coefficient ``s`` instead of
    rescaled, which would be a pass more, so the stored values stay the size of the
    terms' however many updates follow.
    """
    terms = [cy for cy in terms if cy[0] != 0]
    if not terms:
        if own == 0:
            x.zero_()
            return 1.0
        return own
    base = 0
    for i in range(1, len(terms)):
        if abs(terms[i][0]) > abs(terms[base][0]):
            base = i
    c, y = terms.pop(base)
    if own != 0 and abs(own) >= abs(c):
        terms.append((c, y))
        c, y = own, None
    elif own != 0:
        torch.add(y, x, alpha=own / c, out=x)
    elif terms:
        c2, y2 = terms.pop(0)
        torch.add(y, y2, alpha=c2 / c, out=x)
    else:
        x.copy_(y)
    for c2, y2 in terms:
        x.add_(y2, alpha=c2 / c)
    return c


def _dot(x, y):
    return x[0] * y[0] + x[1] * y[1]


def _step_part(x1, x2, g, R, b):
    """One committed row's group part brought forward: ``s <- psi s + b g``.

    The part's state ``s = (P, V)`` is held as coordinates in a basis of its own,
    ``s = B (x1, x2)`` (``B`` 2x2 with orthogonal columns; ``x1`` and ``x2`` are the
    row's parameter and velocity slots, updated in place), and ``R = psi B`` is given
    (nested lists). Returns the new basis. With ``R = [c_u, c_w]`` (``u`` the coordinate
    whose column is the longer, ``w`` the other), ``c_w = alpha c_u + d`` and
    ``b = beta c_u + r`` with ``d`` and ``r`` orthogonal to ``c_u``, so ``r = gamma d``
    and::

        s' = R (x1, x2) + b g = c_u (u + alpha w + beta g) + d (w + gamma g)

    Three passes over the row (two on ``u``, one on ``w``; the direct update takes six,
    two through a temporary): the 2x2 algebra is done on the basis, in float64, and the
    new basis ``[c_u, d]`` is orthogonal again (to rounding; ``beta`` and ``gamma`` are
    solved for, so the identity holds whatever is left of it), so no combination of the
    stored coordinates cancels more than the direct update would. When ``d`` is zero
    (``psi B`` of rank one or less) ``w`` is set to ``g`` with the column ``r``; a zero
    column means its coordinate is unused and not read (a fresh row's velocity slot is
    not written at all).
    """
    c1, c2 = (R[0][0], R[1][0]), (R[0][1], R[1][1])
    if _dot(c2, c2) > _dot(c1, c1):
        u, cu, w, cw = x2, c2, x1, c1
    else:
        u, cu, w, cw = x1, c1, x2, c2
    nu = _dot(cu, cu)
    if nu == 0:  # the state so far is mapped to zero: s' = b g
        return _fresh_part(x1, g, b)
    alpha = _dot(cu, cw) / nu
    d = (cw[0] - alpha * cu[0], cw[1] - alpha * cu[1])
    det = cu[0] * d[1] - cu[1] * d[0]
    if det != 0:  # b = beta c_u + gamma d, solved (d is orthogonal to c_u up to rounding)
        beta = (b[0] * d[1] - b[1] * d[0]) / det
        gamma = (cu[0] * b[1] - cu[1] * b[0]) / det
        su = _combine(u, 1.0, [(alpha, w), (beta, g)])
        sw = _combine(w, 1.0, [(gamma, g)])
        col_w = (d[0] * sw, d[1] * sw)
    else:
        beta = _dot(b, cu) / nu
        r = (b[0] - beta * cu[0], b[1] - beta * cu[1])
        su = _combine(u, 1.0, [(alpha, w), (beta, g)])
        col_w = (0.0, 0.0)
        if r != (0.0, 0.0) and w is not None:  # (no velocity part: r is rounding)
            w.copy_(g)
            col_w = r
    col_u = (cu[0] * su, cu[1] * su)
    c1, c2 = (col_u, col_w) if u is x1 else (col_w, col_u)
    return [[c1[0], c2[0]], [c1[1], c2[1]]]


def _fresh_part(x1, g, b):
    """A row's group part without terms so far: ``s = b g``, held as ``x1 = g`` with the
    basis ``[b, 0]`` (one pass; the velocity slot is unused)."""
    if b[0] == 0 and b[1] == 0:
        return [[0.0, 0.0], [0.0, 0.0]]
    x1.copy_(g)
    return [[b[0], 0.0], [b[1], 0.0]]


def _to_state(x1, x2, B):
    """``(x1, x2) <- B (x1, x2) = (P, V)`` in place (a float16 row's working copies, so
    that the stored float16 values are the state's, rounded once a visit as before the
    coordinates); returns the basis that is now the identity."""
    (b00, b01), (b10, b11) = B
    used1, used2 = (b00, b10) != (0, 0), x2 is not None and (b01, b11) != (0, 0)
    v = None if x2 is None else (torch.mul(x1, b10) if used1 else torch.zeros_like(x1))
    if used1:
        x1.mul_(b00)
    if used2:
        v.add_(x2, alpha=b11)
        if used1:
            x1.add_(x2, alpha=b01)
        else:
            torch.mul(x2, b01, out=x1)
    elif not used1:
        x1.zero_()
    if x2 is None:
        return [[1.0, 0.0], [0.0, 0.0]]
    x2.copy_(v)
    return [[1.0, 0.0], [0.0, 1.0]]


def _finish_part(x1, x2, R):
    """The final sweep on a row's group part: ``x1 <- P = R00 x1 + R01 x2`` (``R`` the
    basis brought forward to the last step)."""
    (b00, b01), _ = R
    c = _combine(x1, b00, [] if x2 is None else [(b01, x2)])
    if c != 1.0:
        x1.mul_(c)


class LazyStore:
    """The fast-mode store filled during training; see the module docstring.

    Parameters
    ----------
    store : SampleStore
        Receives ``P`` (the final ``S``); any kind (dense, half, memmap).
    group_sizes : list of int
        Flat coordinates per optimizer parameter group (:class:`ParamSpec`).
    velocity : bool
        Allocate the velocity part now (momentum in use); otherwise it is allocated at
        the first step that needs it (a zero velocity stays zero without momentum).
    directory : str or None
        For a memmap velocity part (``store.kind == "memmap"``).

    Use: for every optimizer step, :meth:`step` with its hyperparameters, then
    :meth:`commit` with the tracked rows' slots and ``w_t g_{t,i}``; :meth:`reset`
    forgets every row's terms so far (a window ``last_epochs`` beginning);
    :meth:`finish` applies the remaining products and returns ``store``.

    Until :meth:`finish`, row ``i`` of ``store`` and of the velocity part hold the
    coordinates of its state in the basis ``basis[i, group]`` (see :func:`_step_part`;
    a float16 store holds the state itself, converted back after each update).
    """

    def __init__(self, store, group_sizes, velocity=True, directory=None):
        self.store = store
        self.group_sizes = [int(s) for s in group_sizes]
        self.slices = group_slices(self.group_sizes, store.shape[1])
        self.directory = directory
        self.velocity = None
        if velocity:
            self._allocate_velocity()
        self.last = np.full(store.shape[0], -1, dtype=np.int64)  # step of the last commit
        self.products = RangeProducts(len(self.group_sizes))
        self.b = []
        self._transitions = {}  # recorded hyperparameter row -> (M, b)
        self.start = 0  # first step whose terms count (the last reset)
        self.seconds = {"commit": 0.0, "finish": 0.0}  # wall time spent, for profiles
        self.compute_dtype = torch.float64 if store.dtype == torch.float64 else torch.float32
        # each row's state per group as coordinates in a basis of its own (_step_part)
        self.basis = np.zeros((store.shape[0], len(self.group_sizes), 2, 2))

    def _allocate_velocity(self):
        s = self.store
        if s.kind == "memmap":
            self.velocity = SampleStore(s.shape[0], s.shape[1], kind=s.kind, dtype=s.dtype,
                                        directory=self.directory)
            return
        v = SampleStore.__new__(SampleStore)
        v.kind, v.dtype, v.shape = s.kind, s.dtype, s.shape
        # uninitialised: a velocity slot is written before it is read (its basis column
        # is zero until then, also for the rows committed before a mid-run allocation)
        v.data = torch.empty(s.shape, dtype=s.data.dtype)
        self.velocity = v

    def __len__(self):
        return len(self.products)

    def step(self, h):
        """Register the next optimizer step's hyperparameters (``SGDHyper.at`` dict or a
        recorded row); returns its index."""
        M, b = cached_transition(h, self._transitions)
        if self.velocity is None and (np.any(b[:, 1] != 0) or np.any(M[:, 1, :] != 0)):
            self._allocate_velocity()  # every velocity so far is exactly zero
        self.products.append(M)
        self.b.append(b)
        return len(self.products) - 1

    def reset(self):
        """Forget every row's terms: the next step is the first that counts."""
        self.last[:] = -1
        self.start = len(self.products)

    def _rows(self, store):
        """``(get, put)`` for the rows of ``store`` (None: no velocity part): ``get(r)``
        is row ``r`` to update in place, a view (float32/float64, memmap) or a copy of a
        float16 row in the compute dtype, which ``put(r, row)`` writes back (``put`` is
        None for views)."""
        if store is None:
            return (lambda r: None), None
        data = store.data
        if isinstance(data, np.ndarray):
            return (lambda r: torch.from_numpy(data[r])), None
        if data.dtype == torch.float16:
            dtype = self.compute_dtype
            return (lambda r: data[r].to(dtype)), (lambda r, row: data[r].copy_(row))
        return data.__getitem__, None

    def _advance(self, rows, to, inject=None):
        """Bring ``rows`` from their last commit to after step ``to``, adding
        ``b_to * inject`` when given (rows without a commit since the last reset start
        from zero); without ``inject`` (the final sweep) the parameter part is computed
        from the coordinates (and the velocity part is left as it is).

        Row by row: each row's parameter part, velocity part and injected gradient
        (3 x 4 P bytes) stay in the CPU cache across the few operations that update
        them, where whole-block operations would stream the block from memory once per
        operation (measured 3-5x slower for LeNet-5 rows).
        """
        last = self.last[rows]
        seen = last >= 0
        R = self.basis[rows]  # the basis brought forward: psi B
        if seen.any():
            R[seen] = self.products.product(last[seen] + 1, to - last[seen]) @ R[seen]
        R, seen = R.tolist(), seen.tolist()
        b = None
        if inject is not None:
            inject = inject.to("cpu", self.compute_dtype)
            b = self.b[to].tolist()
        P, V = self.store, self.velocity
        parts = [(j, None if len(self.slices) == 1 else sl)  # None: no slicing
                 for j, sl in enumerate(self.slices)]
        (get_p, put_p), (get_v, put_v) = self._rows(P), self._rows(V)
        if inject is None:
            put_v = None  # the final sweep reads the velocity part only
        for k, r in enumerate(rows.tolist()):
            p, v = get_p(r), get_v(r)
            for j, cut in parts:
                ps = p if cut is None else p[cut]
                vs = None if v is None else (v if cut is None else v[cut])
                if inject is None:
                    if seen[k]:
                        _finish_part(ps, vs, R[k][j])
                    else:
                        ps.zero_()
                    continue
                gs = inject[k] if cut is None else inject[k][cut]
                if seen[k]:
                    R[k][j] = _step_part(ps, vs, gs, R[k][j], b[j])
                else:
                    R[k][j] = _fresh_part(ps, gs, b[j])
                if put_p is not None:  # float16 rows hold the state itself, as before
                    R[k][j] = _to_state(ps, vs, R[k][j])
            if put_p is not None:
                put_p(r, p)
            if put_v is not None:
                put_v(r, v)
        self.basis[rows] = R
        for store in (P, V):
            if store is not None and isinstance(store.data, np.ndarray):
                touch(store.data, len(rows) * self.store.shape[1] * store.data.itemsize)

    def commit(self, slots, values):
        """Add the last registered step's terms ``values`` (n, P), ``w_t g_{t,i}`` of the
        rows in store slots ``slots`` (unique)."""
        t = len(self.products) - 1
        if t < 0:
            raise RuntimeError("LazyStore.commit before any step")
        rows = np.asarray(slots, dtype=np.int64)
        if not len(rows):
            return
        tic = time.perf_counter()
        self._advance(rows, t, values)
        self.last[rows] = t
        self.seconds["commit"] += time.perf_counter() - tic

    def release(self):
        """Drop the velocity part (the store is abandoned: filled again another way)."""
        self.velocity = None

    def finish(self, chunk_rows=1024):
        """Apply each row's remaining transitions; returns the store holding ``S``."""
        tic = time.perf_counter()
        T = len(self.products) - 1
        n = self.store.shape[0]
        if T >= 0:
            for s in range(0, n, chunk_rows):
                rows = np.arange(s, min(s + chunk_rows, n), dtype=np.int64)
                self._advance(rows, T)
        else:
            for s in range(0, n, chunk_rows):
                rows = np.arange(s, min(s + chunk_rows, n), dtype=np.int64)
                _write(self.store, rows, torch.zeros(len(rows), self.store.shape[1]))
        self.last[:] = T
        self.velocity = None
        self.seconds["finish"] += time.perf_counter() - tic
        return self.store


# -- per-sample gradients from the training backward ------------------------------------
def _conv2d_supported(m):
    return (m.padding_mode == "zeros" and not isinstance(m.padding, str)) or m.padding == "valid"


class PerSampleHooks:
    """Per-sample gradients ``w g_i`` of the batch loss, collected from its backward pass.

    A forward hook on every ``Linear`` and ``Conv2d`` layer notes the layer's input and
    puts a hook on its output; in the backward pass that hook receives the output
    gradient and adds each sample's product (input x output gradient, summed over
    positions) to a ``(n, P)`` buffer at the flat offsets of ``spec`` (parameter order
    of the optimizer's groups). A layer called several times adds each call.

    ``supported`` is False (with ``reason``) when a trainable parameter belongs to
    another kind of module, or a ``Conv2d`` pads otherwise than with zeros; the caller
    then computes per-sample gradients another way. The products are those of the
    samples' own activations: exact when samples do not interact (no BatchNorm in train
    mode; dropout masks are the real ones), which the caller must ensure.

    With a :class:`~hydrattr._core.factors.FactorLayout` (:meth:`set_layout`) the
    buffer holds the layout's dense part and :attr:`factors` its factor part: a
    factored ``Linear`` weight's ``go`` and ``x`` are copied, not multiplied out. A
    factored layer called again in a step, or on more than one position, gives further
    rank-one terms, returned by :meth:`extras`. :meth:`factorable` lists the ``Linear``
    weights the last step saw once, on one position: those a layout may factor.
    """

    LAYERS = (nn.Linear, nn.Conv2d)

    def __init__(self, module, spec):
        self.module = module
        self.spec = spec
        offsets = np.concatenate([[0], np.cumsum(spec.numels)]).astype(np.int64)
        where = {name: (int(offsets[k]), int(spec.numels[k])) for k, name in
                 enumerate(spec.names)}
        self.layers = []  # (module, weight (offset, numel) or None, bias ... or None)
        owned = set()
        self.reason = None
        for mname, m in module.named_modules():
            if not isinstance(m, self.LAYERS):
                continue
            prefix = f"{mname}." if mname else ""
            w = where.get(prefix + "weight")
            b = where.get(prefix + "bias") if getattr(m, "bias", None) is not None else None
            if w is None and b is None:
                continue
            if isinstance(m, nn.Conv2d) and not _conv2d_supported(m):
                self.reason = f"{mname} ({type(m).__name__}) pads with {m.padding!r}/" \
                              f"{m.padding_mode!r}"
                continue
            owned.update(n for n, x in ((prefix + "weight", w), (prefix + "bias", b))
                         if x is not None)
            self.layers.append((m, w, b))
        missing = [n for n in spec.names if n not in owned]
        if missing and self.reason is None:
            self.reason = (f"parameters outside Linear/Conv2d layers: "
                           f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        self.supported = not missing
        self._handles = []
        self.active = False
        self.buffer = None
        self._storage = None
        self.positions = None
        self.seconds = 0.0  # wall time in the backward hooks, for profiles
        self.layout = None
        self.factors = None
        self._fstorage = None
        self._seen = {}  # Linear weight offset -> [calls, positions, (n_out, n_in)]
        self._extra = {}  # factored weight offset -> further (go, x) pairs this step
        self.keep_pairs = False  # keep each Linear weight's first (go, x) in ``pairs``
        self.pairs = {}

    def attach(self):
        for m, w, b in self.layers:
            self._handles.append(m.register_forward_hook(
                lambda mod, inp, out, w=w, b=b: self._forward(mod, inp, out, w, b)))
        return self

    def detach(self):
        for h in self._handles:
            h.remove()
        self._handles = []
        self.active = False
        self.buffer = self._storage = None

    def set_layout(self, layout):
        """Collect the dense part and the factors of ``layout`` (None: full rows)."""
        self.layout = layout if layout is not None and layout.factored else None
        self._storage = self._fstorage = None

    def factorable(self):
        """``(offset, n_out, n_in)`` of the ``Linear`` weights the last collected step
        saw once, on one position."""
        return [(off, o, i) for off, (calls, pos, (o, i)) in sorted(self._seen.items())
                if calls == 1 and pos == 1]

    def begin(self, positions, batch_size, dtype, device, out=None, factors=None):
        """Collect the samples at ``positions`` (long tensor; None: the whole batch), into
        ``out`` when given (``(n, P)``, or ``(n, dense_width)`` with a layout, e.g. the
        store filler's rows for them) and ``factors`` (``(n, factor_width)``)."""
        n = batch_size if positions is None else len(positions)
        self.positions = None if positions is None else positions.to(device)
        width = self.spec.n_params if self.layout is None else self.layout.dense_width
        self.buffer = self._reuse(out, "_storage", n, width, dtype, device)
        self.factors = None if self.layout is None else \
            self._reuse(factors, "_fstorage", n, self.layout.factor_width, dtype, device)
        self._written = set()  # offsets of the parameters written so far this step
        self._seen = {}
        self._extra = {}
        self.pairs = {}  # with keep_pairs: Linear weight offset -> its (go, x), each term
        self.calls = 0
        self.active = True

    def _reuse(self, given, name, n, width, dtype, device):
        """``given`` if it is an ``(n, width)`` block of the dtype and device, else a block
        kept in attribute ``name`` and reused from step to step (a fresh (B, P) block
        every step costs its first-touch page faults every step: 2 ms of a LeNet-5 step
        here)."""
        if given is not None and tuple(given.shape) == (n, width) and \
                given.dtype == dtype and given.device == torch.device(device):
            return given
        keep = getattr(self, name)
        if keep is None or keep.shape[0] < n or keep.shape[1] != width or \
                keep.dtype != dtype or keep.device != torch.device(device):
            keep = torch.empty(n, width, dtype=dtype, device=device)
            setattr(self, name, keep)
        return keep[:n]

    def end(self):
        """Stop collecting; returns the ``(n, P)`` buffer (zero for unused parameters),
        or with a layout its dense part (:attr:`factors` holds the factor part), valid
        until the next :meth:`begin`."""
        self.active = False
        out, self.buffer = self.buffer, None
        if out is not None:
            for m, w, b in self.layers:
                for where in (w, b):
                    if where is None or where[0] in self._written:
                        continue
                    block = None if self.layout is None else self.layout.block_at(where[0])
                    if block is not None:
                        self.factors[:, block[3]:block[3] + block[1] + block[2]].zero_()
                    else:
                        d = self._dense(where[0])
                        out[:, d:d + where[1]].zero_()
        return out

    def extras(self):
        """The step's further rank-one terms of the factored weights, as factor parts
        ``(n, factor_width)`` (zero elsewhere), one per extra term of the layer with the
        most: a list, empty when every factored layer ran once on one position."""
        return self._extras(self._extra, self.layout, self.factors)

    def split_kept(self, full, layout):
        """A step collected as full rows ``full`` (n, P) with ``keep_pairs``, in
        ``layout``'s form: ``(dense, factors, extras)`` as :meth:`end`, :attr:`factors`
        and :meth:`extras` would have given them (for the first step, collected before
        the layout was known)."""
        dense, factors = layout.split(full, {off: pairs[0] for off, pairs in
                                             self.pairs.items() if layout.block_at(off)})
        rest = {off: pairs[1:] for off, pairs in self.pairs.items()
                if layout.block_at(off) and len(pairs) > 1}
        return dense, factors, self._extras(rest, layout, factors)

    @staticmethod
    def _extras(extra, layout, factors):
        if not extra:
            return []
        k = max(len(v) for v in extra.values())
        n = factors.shape[0]
        out = [factors.new_zeros(n, layout.factor_width) for _ in range(k)]
        for off, pairs in extra.items():
            _, o, i, f = layout.block_at(off)
            for j, (go, x) in enumerate(pairs):
                out[j][:, f:f + o] = go
                out[j][:, f + o:f + o + i] = x
        return out

    def _dense(self, offset):
        return offset if self.layout is None else self.layout.dense_offset(offset)

    def _forward(self, mod, inputs, out, w, b):
        if not self.active or not torch.is_grad_enabled() or not isinstance(out, torch.Tensor) \
                or not out.requires_grad or not inputs:
            return
        x = inputs[0].detach()
        out.register_hook(lambda go: self._backward(mod, x, go, w, b))

    def _emit(self, where, shape, compute):
        """A parameter's ``(n, numel)`` block, viewed as ``shape``: ``compute(out)`` writes
        it straight into the buffer at the parameter's first use this step, and its
        result (``compute(None)``) is added at a later use (a layer called again)."""
        d = self._dense(where[0])
        dst = self.buffer[:, d:d + where[1]].view(shape)
        if where[0] in self._written:
            dst.add_(compute(None).reshape(shape))
        else:
            self._written.add(where[0])
            compute(dst)

    def _factor(self, w, block, go3, x3):
        """A factored weight's terms: the first call's first position into
        :attr:`factors`, every other one kept for :meth:`extras`."""
        _, o, i, f = block
        start = 0
        if w[0] not in self._written:
            self._written.add(w[0])
            self.factors[:, f:f + o] = go3[:, 0]
            self.factors[:, f + o:f + o + i] = x3[:, 0]
            start = 1
        more = self._extra.setdefault(w[0], [])
        for p in range(start, go3.shape[1]):
            more.append((go3[:, p].clone(), x3[:, p].clone()))

    @staticmethod
    def _copied(f):
        """``compute`` for :meth:`_emit` from ``f()``, for products that are slower
        computed into a strided block than copied into it (``bmm``: measured 10% slower
        for LeNet-5's convolutions)."""
        return lambda out: f() if out is None else out.copy_(f().reshape(out.shape))

    def _backward(self, mod, x, go, w, b):
        if self.buffer is None:
            return
        tic = time.perf_counter()
        if self.positions is not None:
            x, go = x[self.positions], go[self.positions]
        n = x.shape[0]
        go = go.detach().to(self.buffer.dtype)
        x = x.to(self.buffer.dtype)
        if isinstance(mod, nn.Linear):
            go3 = go.reshape(n, -1, go.shape[-1])
            x3 = x.reshape(n, -1, x.shape[-1])
            if w is not None:
                seen = self._seen.setdefault(w[0], [0, 0, (go3.shape[2], x3.shape[2])])
                seen[0] += 1
                seen[1] = max(seen[1], go3.shape[1])
                if self.keep_pairs:
                    self.pairs.setdefault(w[0], []).extend(
                        (go3[:, p].clone(), x3[:, p].clone()) for p in range(go3.shape[1]))
            block = None if w is None or self.layout is None else self.layout.block_at(w[0])
            if block is not None:
                self._factor(w, block, go3, x3)
            elif w is not None:
                shape = (n, go3.shape[2], x3.shape[2])
                if go3.shape[1] == 1:  # one position: the outer products
                    self._emit(w, shape, lambda out: torch.mul(
                        go3[:, 0, :, None], x3[:, 0, None, :], out=out))
                else:
                    self._emit(w, shape, self._copied(lambda: torch.bmm(go3.transpose(1, 2),
                                                                        x3)))
            if b is not None:
                self._emit(b, (n, go3.shape[2]), lambda out: torch.sum(go3, 1, out=out))
        else:  # Conv2d
            if w is not None:
                self._emit(w, (n, go.shape[1], -1),
                           self._copied(lambda: _conv2d_weight(mod, x, go)))
            if b is not None:
                go3 = go.reshape(n, go.shape[1], -1)
                self._emit(b, (n, go.shape[1]), lambda out: torch.sum(go3, 2, out=out))
        self.calls += 1
        self.seconds += time.perf_counter() - tic


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _conv2d_weight(mod, x, go):
    """Per-sample weight gradients ``(n, c_out, rest of weight.shape)`` of a ``Conv2d``
    from its input ``x`` and output gradient ``go``: the input's patches as a strided
    view (no im2col copy beyond the one the product needs) times the output gradient;
    with groups, ``conv2d_weight`` vmapped over the samples."""
    n = x.shape[0]
    pad = (0, 0) if mod.padding == "valid" else _pair(mod.padding)
    if mod.groups != 1:
        shape = mod.weight.shape

        def one(xi, gi):
            return torch.nn.grad.conv2d_weight(xi[None], shape, gi[None], stride=mod.stride,
                                               padding=pad, dilation=mod.dilation,
                                               groups=mod.groups)

        return vmap(one)(x, go)
    kh, kw = _pair(mod.kernel_size)
    dh, dw = _pair(mod.dilation)
    sh_, sw_ = _pair(mod.stride)
    xp = nn.functional.pad(x, (pad[1], pad[1], pad[0], pad[0])) if any(pad) else x
    ho, wo = go.shape[-2:]
    sn, sc, sh, sw = xp.stride()
    patches = xp.as_strided((n, xp.shape[1], kh, kw, ho, wo),
                            (sn, sc, sh * dh, sw * dw, sh * sh_, sw * sw_),
                            xp.storage_offset())
    cols = patches.reshape(n, xp.shape[1] * kh * kw, ho * wo)
    return torch.bmm(go.reshape(n, go.shape[1], ho * wo), cols.transpose(1, 2))


class LeanTrajectory(Trajectory):
    """A :class:`Trajectory` that keeps only the latest parameter snapshot.

    The fused fit needs no snapshot to fill its store; it keeps batch rows, weights,
    hyperparameters and epoch boundaries (what :meth:`start_of_last_epochs` and the
    recorder's checks read) and the last step's parameters (the last-step gradient
    check), so recording costs O(P) memory instead of O(T P).
    """

    def __init__(self, spec, n_rows, dtype=torch.float32):
        super().__init__(spec, n_rows, storage="memory", dtype=dtype)
        self._last_theta = None

    def append(self, theta, indices, weight, hyper_row, rng_state=None, opt_state=None):
        super().append(theta, indices, weight, hyper_row, rng_state, opt_state)
        self._last_theta = self._thetas.pop()
        self._thetas.append(None)

    def theta(self, t, device=None):
        if t < 0:
            t += len(self)
        if t != len(self) - 1:
            raise RuntimeError("this trajectory was recorded by the fused fit, which keeps "
                               "only the last step's parameters; fit with "
                               "fit_path='two_pass' to keep them all.")
        th = self._last_theta
        return th.to(device) if device is not None else th

    def head(self, n):
        raise RuntimeError("a fused-fit trajectory keeps no parameter snapshots")

    @property
    def nbytes(self):
        return 0

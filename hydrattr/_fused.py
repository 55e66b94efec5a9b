"""The fused fast-mode fit: the per-sample store filled while skorch trains.

:class:`FusedRecorder` is a :class:`~hydrattr._skorch.TrajectoryRecorder` (same checks,
same record of batches and hyperparameters) that also commits every tracked row's
per-sample gradient to a :class:`~hydrattr._core.fused.LazyStore` at the step it is
computed. The gradients come from the training backward itself through
:class:`~hydrattr._core.fused.PerSampleHooks` when every trainable parameter lives in a
``Linear`` or ``Conv2d`` layer and samples do not interact (no BatchNorm); otherwise
they are computed at that step from the step's parameters with
:func:`~hydrattr._core.functional.per_sample_grads` (``vmap``, or the batch Jacobian
with BatchNorm and the replayed dropout masks), exactly as the two-pass fit does later.
Either way there is no second pass over a stored trajectory, and, the hooks only
observing, training is the plain ``net.fit`` bit for bit.

Only SGD is fused (Adam's fast-mode coefficients are per coordinate and computed last
step first): with Adam the recorder records the full trajectory like its parent and the
attributor takes the two-pass route.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ._core.functional import per_sample_grads, take_batch_rows
from ._core.deferred import DeferredStore, ring_rows
from ._core.factors import FactorLayout, factor_pays
from ._core.factorlog import FactorLogStore
from ._core.fused import LazyStore, LeanTrajectory, PerSampleHooks
from ._skorch import TrajectoryRecorder, is_adam, make_loss_fn, module_flags, module_mode

__all__ = ["FusedRecorder"]


class FusedRecorder(TrajectoryRecorder):
    """Record the run and fill the fast-mode store during it; see the module docstring.

    Parameters
    ----------
    dataset : RecordingDataset
    store : SampleStore
        The store to fill (zeros), one row per tracked training row.
    rows_map : ndarray of int
        Data row -> store slot (-1: not tracked).
    per_sample : {"auto", "vmap", "jacobian"}
        As :class:`~hydrattr.HydraAttributor`: "jacobian" (or "auto" with BatchNorm or
        dropout) takes per-sample gradients through the real batch. The backward hooks
        are used unless the module has BatchNorm or ``per_sample="jacobian"``.
    last_epochs : None, int or "final_lr"
        The window whose steps count. The store is reset where the window will begin if
        that is known during training (an int: epoch ``max_epochs - last_epochs``;
        "final_lr": an epoch whose first step changes the learning rate); the
        attributor checks the window against the finished run and otherwise falls back
        to the two-pass fit, for which the full trajectory is then kept.
    hooks : bool
        Allow the backward hooks (False: always compute per-sample gradients at the step).
    store_kind : {"auto", "deferred", "lazy"} or None
        How the store is filled (:meth:`_make_store`); None: the class attribute
        ``STORE_KIND`` ("auto"; tests and profiles set the others).
    record_rng, storage, directory : see :class:`TrajectoryRecorder`.
    """

    STORE_KIND = "auto"
    FACTOR_LINEAR = True  # DeferredStore's ring holds Linear weights' terms as factors
    # in-memory stores: those factors go to a log, never summed into rows, where the log
    # takes less memory than their blocks ("always": wherever it can; tests)
    LOG_FACTORS = True

    def __init__(self, dataset, store=None, rows_map=None, per_sample="auto",
                 last_epochs=None, hooks=True, record_rng=False, storage="memory",
                 directory=None, store_kind=None):
        super().__init__(dataset, record_rng=record_rng, storage=storage, directory=directory)
        self.store = store
        self.rows_map = rows_map
        self.per_sample = per_sample
        self.last_epochs = last_epochs
        self.hooks = hooks
        self.store_kind = store_kind

    def initialize(self):
        super().initialize()
        self.lazy_ = None
        self.fused_ = False
        return self

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        super().on_train_begin(net, X=X, y=y, **kwargs)
        self.fused_ = not is_adam(net.optimizer_)
        self.window_lost_ = False
        self.hook_fallback_ = None  # why the hooks were not used (None: they were)
        self._psh = None
        self._net = net
        if not self.fused_:
            return
        if self.last_epochs is None:  # nothing can need the snapshots: keep only the last
            lean = LeanTrajectory(self.spec_, len(self.dataset), dtype=self.trajectory_.dtype)
            lean.buffers0 = self.trajectory_.buffers0
            self.trajectory_ = lean
        has_bn, has_dropout = module_flags(net.module_)
        if self.per_sample == "auto":
            self._independent = not (has_bn or has_dropout)
        else:
            self._independent = self.per_sample == "vmap"
        if not self.hooks:
            self.hook_fallback_ = "hooks disabled"
        elif has_bn:
            self.hook_fallback_ = "BatchNorm couples the samples of a batch"
        elif self.per_sample == "jacobian":
            self.hook_fallback_ = "per_sample='jacobian'"
        else:
            psh = PerSampleHooks(net.module_, self.spec_)
            if psh.supported:
                self._psh = psh.attach()
            else:
                self.hook_fallback_ = psh.reason
        self._momentum = max(float(g.get("momentum", 0.0)) for g in net.optimizer_.param_groups)
        self._kind = self.STORE_KIND if self.store_kind is None else self.store_kind
        self.lazy_ = self._make_store(net, self._expected_layout(net))
        self._log = []  # the filler's step and reset calls until the first step's check
        self._checked = False
        self._loss_fn = None
        self._batch = None
        self._reset_epoch = None
        if isinstance(self.last_epochs, (int, np.integer)) and \
                not isinstance(self.last_epochs, bool) and self.last_epochs < net.max_epochs:
            self._reset_epoch = int(net.max_epochs - self.last_epochs)
        self._prev_lr = None
        self.seconds_ = {"hooks": 0.0, "step_grads": 0.0}

    def _make_store(self, net, layout):
        """The store filler: :class:`DeferredStore` (one vector a row, a ring of the last
        steps' terms, held as ``layout`` says) unless its ring would take more than 1.5
        times the store's memory (high momentum, few rows), then :class:`LazyStore` (two
        vectors a row)."""
        if self._kind == "deferred" or (self._kind == "auto" and self._ring_fits(net, layout)):
            if self._log_pays(net, layout):
                return FactorLogStore(self.store, self.spec_.group_sizes,
                                      ring_rows=self._ring_rows(net),
                                      capacity=self.store.shape[0] * max(net.max_epochs, 1))
            return DeferredStore(self.store, self.spec_.group_sizes,
                                 ring_rows=self._ring_rows(net), directory=self.directory)
        return LazyStore(self.store.ensure_zero(), self.spec_.group_sizes,
                         velocity=self._momentum != 0.0, directory=self.directory)

    def _log_pays(self, net, layout):
        """Whether :class:`FactorLogStore` holds the factored blocks in less memory than
        the store would: a float32 (float64) log of ``factor_width`` numbers a row per
        epoch against the blocks' coordinates in the store's item size (dense and half
        stores only)."""
        if not self.LOG_FACTORS or layout is None or self.store.kind not in ("dense", "half"):
            return False
        if self.LOG_FACTORS == "always":  # tests
            return True
        item, log_item = self._item_sizes()
        blocks = layout.n_params - layout.dense_width
        return max(int(net.max_epochs), 1) * layout.factor_width * log_item <= blocks * item

    def _item_sizes(self):
        """Bytes per number of the store and of the fillers' factors (their compute
        dtype: float64 with a float64 store, else float32)."""
        item = 2 if self.store.kind == "half" else self.store.dtype.itemsize
        return item, (8 if self.store.dtype == torch.float64 else 4)

    def _ring_rows(self, net):
        n_rows = self.store.shape[0]
        batch = net.batch_size if net.batch_size and net.batch_size > 0 else n_rows
        dtype = torch.float16 if self.store.kind == "half" else self.store.dtype
        return ring_rows(self._momentum, min(int(batch), n_rows), dtype)

    def _ring_fits(self, net, layout):
        """Whether :class:`DeferredStore`'s ring, its rows in ``layout``'s form (None: full
        rows), takes at most 1.5 times the store's memory."""
        item, factor_item = self._item_sizes()
        n_params = self.store.shape[1]
        row = n_params * item if layout is None else \
            layout.dense_width * item + layout.factor_width * factor_item
        return self._ring_rows(net) * row <= 1.5 * self.store.shape[0] * n_params * item

    def _expected_layout(self, net):
        """The factored layout the first step is expected to confirm (every ``Linear``
        weight run once, on one position), to size the store filler; None without the
        hooks or factors."""
        if self._psh is None or not self.FACTOR_LINEAR or \
                next(net.module_.parameters()).device.type != "cpu":
            return None
        return self._layout([(w[0], m.out_features, m.in_features)
                             for m, w, _ in self._psh.layers
                             if isinstance(m, torch.nn.Linear) and w is not None])

    def _layout(self, weights):
        """The :class:`FactorLayout` of the ``(offset, n_out, n_in)`` weights worth
        holding as factors (:func:`factor_pays`), or None where none is."""
        blocks = [b for b in weights if factor_pays(b[1], b[2])]
        return FactorLayout(self.spec_.n_params, blocks) if blocks else None

    def on_epoch_begin(self, net, dataset_train=None, dataset_valid=None, **kwargs):
        super().on_epoch_begin(net, dataset_train=dataset_train, dataset_valid=dataset_valid,
                               **kwargs)
        if self.lazy_ is not None and self._reset_epoch is not None and \
                len(self.trajectory_.epoch_starts) - 1 == self._reset_epoch:
            self._filler("reset")

    def on_batch_begin(self, net, batch=None, training=False, **kwargs):
        super().on_batch_begin(net, batch=batch, training=training, **kwargs)
        if not training or self.lazy_ is None:
            return
        rows = np.asarray(self._pending[1], dtype=np.int64)
        sel = self.rows_map[rows] >= 0
        self._sel = sel
        self._batch = None
        if not sel.any():
            return
        self._batch = batch  # a reference, for the per-step route (or a first-step refusal)
        if self._psh is not None:
            # all rows at the first step: their sum is checked against the batch gradient
            positions = None if (sel.all() or not self._checked) else \
                torch.as_tensor(np.flatnonzero(sel))
            theta = self._pending[0]
            n = len(rows) if positions is None else len(positions)
            # written straight into the filler's ring when it can take them (the
            # first step, checked against the batch gradient, goes to the hooks' own)
            out = self.lazy_.reserve(n, theta.dtype) if self._checked and \
                hasattr(self.lazy_, "reserve") and theta.device.type == "cpu" else None
            dense, factors = (None, None) if out is None else out
            self._psh.keep_pairs = not self._checked
            self._psh.begin(positions, len(rows), theta.dtype, theta.device, out=dense,
                            factors=factors)

    def _after_step(self, optimizer, args, kwargs):
        pending = self._pending
        super()._after_step(optimizer, args, kwargs)
        if self.lazy_ is None:
            return
        theta, rows, weight, rng, row = pending[:5]
        buf = self._psh.end() if self._psh is not None and self._psh.active else None
        t = len(self.trajectory_) - 1
        lr = np.asarray(row["lr"], dtype=np.float64)
        if self.last_epochs == "final_lr" and self._prev_lr is not None and \
                np.any(lr != self._prev_lr):
            if self.trajectory_.epoch_starts and self.trajectory_.epoch_starts[-1] == t:
                self._filler("reset")
            else:
                self.window_lost_ = True  # begins mid-epoch: the two-pass fit will do it
        self._prev_lr = lr
        self._filler("step", row)
        sel = self._sel
        if not sel.any():
            return
        slots = self.rows_map[np.asarray(rows, dtype=np.int64)][sel]
        wg = None
        if buf is not None:
            if not self._checked:
                self._checked = True
                if not self._hooks_agree(buf):
                    self.hook_fallback_ = ("the layers' per-sample products do not add up "
                                           "to the batch gradient (a parameter used "
                                           "outside its layer's forward?)")
                    self._psh.detach()
                    self._psh = None
                    self._settle_filler(None)  # its ring was sized for factors
                else:
                    wg = buf if sel.all() else buf[torch.as_tensor(sel, device=buf.device)]
                    if self._factor_layout(theta) is not None:
                        terms = self._psh.split_kept(buf, self.lazy_.layout)
                        self._psh.pairs = {}
                        if not sel.all():
                            m = torch.as_tensor(sel, device=buf.device)
                            terms = [t[m] for t in terms[:2]] + [[e[m] for e in terms[2]]]
                        self._batch = None
                        self.lazy_.commit(slots, terms[0], terms[1])
                        for extra in terms[2]:
                            self.lazy_.commit(slots, None, extra)
                        return
            elif self._psh.layout is not None:
                self._batch = None
                self.lazy_.commit(slots, buf, self._psh.factors)
                for extra in self._psh.extras():  # a factored layer run again this step
                    self.lazy_.commit(slots, None, extra)
                return
            else:
                wg = buf
        if wg is not None:
            self._batch = None
        else:
            tic = time.perf_counter()
            wg = weight * self._step_grads(theta, sel, rng)
            self.seconds_["step_grads"] += time.perf_counter() - tic
        self.lazy_.commit(slots, wg)

    def _factor_layout(self, theta):
        """After the first step's check: the layout that holds the ``Linear`` weights the
        step ran once, on one position, as factors in the :class:`DeferredStore` ring
        (None where nothing is worth factoring, or the filler is another). Where the
        filler was sized for more factors than the step allows and its ring no longer
        fits, it becomes a :class:`LazyStore`."""
        self._psh.keep_pairs = False
        if not self.FACTOR_LINEAR or not isinstance(self.lazy_, DeferredStore) or \
                theta.device.type != "cpu":
            return None
        layout = self._layout(self._psh.factorable())
        if not self._settle_filler(layout) or layout is None:
            return None
        self.lazy_.set_layout(layout)
        self._psh.set_layout(layout)
        return layout

    def _filler(self, call, *args):
        """``self.lazy_.<call>(*args)``, logged until the first step's check (which may
        swap the filler: :meth:`_settle_filler`)."""
        getattr(self.lazy_, call)(*args)
        if self._psh is not None and not self._checked:
            self._log.append((call, args))

    def _settle_filler(self, layout):
        """Keep the :class:`DeferredStore` (True) if its ring, in ``layout``'s form, still
        fits (``_ring_fits``; it was sized for the expected layout before the first
        step), else swap in a :class:`LazyStore` given the same steps and resets."""
        if not isinstance(self.lazy_, DeferredStore) or self._kind != "auto" or \
                self._ring_fits(self._net, layout):
            return isinstance(self.lazy_, DeferredStore)
        self.lazy_ = LazyStore(self.store.ensure_zero(), self.spec_.group_sizes,
                               velocity=self._momentum != 0.0, directory=self.directory)
        for call, args in self._log:
            getattr(self.lazy_, call)(*args)
        return False

    def _hooks_agree(self, buf):
        """The first step's per-sample products add up to the gradient backpropagated."""
        # a parameter without gradient (unused in the forward) has zero products too
        used = torch.cat([torch.zeros(p.numel(), dtype=buf.dtype, device=buf.device)
                          if r is None else r.reshape(-1).to(buf.dtype)
                          for p, r in zip(self._params, self._raw)])
        err = float((buf.sum(0) - used).norm())
        tol = float(torch.finfo(buf.dtype).eps) ** 0.5
        return err <= tol * float(used.norm()) + torch.finfo(buf.dtype).tiny

    def _step_grads(self, theta, sel, rng):
        """Tracked rows' per-sample gradients at the step's parameters, as the two-pass fit
        computes them (``_fast_step_grads``), without touching the training RNG or the
        BatchNorm running statistics."""
        from ._inputs import to_device

        net = self._net
        if self._loss_fn is None:
            self._loss_fn = make_loss_fn(net, self.spec_)
        batch = self._batch
        self._batch = None
        x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
        x = to_device(x, theta.device)
        y = y.to(theta.device) if isinstance(y, torch.Tensor) else y
        m = torch.as_tensor(sel)
        devices = [theta.device] if theta.is_cuda else []
        with torch.random.fork_rng(devices=devices), \
                module_mode(net.module_, training=True):
            if self._independent and not sel.all():
                return per_sample_grads(self._loss_fn, theta, take_batch_rows(x, m),
                                        take_batch_rows(y, m), independent=True).detach()
            g = per_sample_grads(self._loss_fn, theta, x, y, independent=self._independent,
                                 rng_state=rng).detach()
        return g if sel.all() else g[m.to(g.device)]

    def on_train_end(self, net, X=None, y=None, **kwargs):
        if self._psh is not None:
            self.seconds_["hooks"] += self._psh.seconds
            self._psh.detach()
            self._psh = None
        self._batch = self._net = self._loss_fn = None
        super().on_train_end(net, X=X, y=y, **kwargs)

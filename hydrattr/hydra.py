"""HydraAttributor: hypergradient data relevance through the whole SGD trajectory."""
from __future__ import annotations

import os
from numbers import Integral

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, RealNotInt, StrOptions

from ._core.running_stats import BatchNormStats
from ._core.lowrank import expand, lowrank_test_grads
from ._core.outofcore import check_directory
from ._core.store import STORE_KINDS, SampleStore
from ._core.sweep import build_fast_store, exact_adjoint, exact_forward, fast_replay
from ._inputs import select_rows
from ._skorch import TrajectoryRecorder, flat_params, module_mode, step_replayer
from .base import BaseAttributor

__all__ = ["HydraAttributor"]


class HydraAttributor(BaseAttributor):
    """HYDRA (Chen et al., AAAI 2021): differentiate test losses w.r.t. sample weights
    through the recorded SGD trajectory.

    ``fit`` trains a clone of ``net`` exactly as ``net.fit`` would (same seed, batches
    and updates) while recording the trajectory. ``attribute`` returns
    ``C[i, j] = -(1/N) d loss_j / d eps_i`` where sample ``i`` enters each batch loss
    with weight ``(1 + N eps_i) / B``, so ``eps_i = -1/N`` removes it.

    Parameters
    ----------
    net : skorch.NeuralNet
        The network as you would train it (unfitted or fitted; it is cloned). Its
        optimizer must be ``torch.optim.SGD`` (momentum, dampening, Nesterov, weight
        decay, param groups and LR schedulers are all followed) or ``torch.optim.Adam``
        / ``torch.optim.AdamW`` (betas, eps, bias correction, coupled or decoupled weight
        decay, param groups, LR schedulers; not ``amsgrad``). With Adam the optimizer
        state ``(m, v)`` is part of the differentiated state. Everything runs on the
        net's ``device``; the trajectory and the per-sample store stay on the CPU.
    mode : {"fast", "exact"}, default="fast"
        ``"fast"`` drops the Hessian term of the recurrence (the paper's approximation;
        with Adam/AdamW only the Hessian is dropped: the sample's effect on the moments
        and on the preconditioner ``1 / (sqrt(v_hat) + eps)`` is kept, which is elementwise,
        so the fast coefficients become per-coordinate vectors computed in a backward
        pass over the trajectory instead of per-group scalars);
        ``"exact"`` keeps it by running the adjoint of the whole training run backward:
        the exact first-order derivative, at the cost of one batch forward-over-reverse
        product per step and objective at ``attribute`` time. Test losses are taken in
        eval mode; with BatchNorm they use the running statistics, which are moving
        averages of the batch statistics along the trajectory and so depend on every
        ``eps_i`` through the parameters. Exact mode differentiates that path too (in
        the same forward-over-reverse pass), so it equals finite differences of
        retraining in which the running statistics are recomputed; fast mode holds them
        at their trained values.
    rank : None, int or float, default=None
        Exact mode only: run the exact adjoint sweep on a low-rank basis of the test
        gradients instead of on each of them, so that its cost does not grow with the
        number of test points. ``attribute`` finds an orthonormal basis ``Q`` (``r``
        vectors) of the span of the test gradients (``n_test x P``; with BatchNorm,
        jointly with their running-statistics part), scaled to unit norm so that
        every test point counts alike, by a thin or randomized SVD; it sweeps on
        ``Q`` (``ceil(r / test_batch_size)`` sweeps instead of
        ``ceil(n_test / test_batch_size)``) and returns ``C`` for the test gradients
        projected onto ``span(Q)``: exact there, so exact mode's ``C`` to float
        rounding when the test gradients lie in it. An int: at most that many
        directions, the largest singular ones (``rank >= n_test`` keeps them all). A
        float in (0, 1): the fewest directions that keep, on average over the test
        points, that fraction of each test gradient's squared norm. Directions of
        rounding only are dropped, so duplicated or linearly dependent test points
        cost no sweep. What is left out is reported as ``truncation_error_``; column
        ``j`` of ``C`` is off by ``A e_j``, with ``e_j`` the part of test gradient
        ``j`` outside the span and ``A`` the linear map of the sweep. None: one sweep
        per block of ``test_batch_size`` test points. See :doc:`/user_guide`.
    storage : {"dense", "half", "memmap", "replay"}, default="dense"
        Fast mode only. Where the per-sample state ``S_i`` (one parameter-sized vector per
        tracked sample) lives: float32 in RAM, float16 in RAM, float32 in a disk memmap
        (in ``store_dir``), or nowhere (``"replay"``: the trajectory is kept and
        per-sample gradients are recomputed at ``attribute`` time; RAM holds only the
        trajectory, attribution costs a pass over the trajectory). Only ``"replay"``
        keeps what exact mode needs, so it alone lets ``set_params(mode="exact")`` after a
        fast-mode ``fit`` (any other storage raises at ``attribute``); an exact-mode fit
        can always be switched to fast mode. With ``"dense"`` or ``"half"`` and the
        fused fit on the CPU, the blocks of ``Linear`` weights run once per sample are
        kept as a float32 log of their two factors per step (``E (n_out + n_in)``
        numbers a row for ``E`` steps instead of ``n_out n_in``; LeNet-5 at 20 epochs:
        a third of the dense store) and multiplied as factors at ``attribute``.
    trajectory : {"memory", "memmap", "checkpoint"}, default="memory"
        Where the parameter snapshots of the trajectory live: every step's in RAM or in
        a disk memmap (in ``store_dir``), or, with ``"checkpoint"``, only every
        ``checkpoint_every``-th step's full training state (parameters, optimizer state
        such as momentum buffers, module buffers) in RAM, the steps between recomputed
        from the nearest checkpoint, one block at a time, whenever a sweep needs them (by
        skorch's own training step on the recorded batches, hyperparameters and RNG
        states, so on the CPU the recomputed parameters are the recorded ones bit for
        bit, and ``C`` is the same). At most ``2 sqrt(T)`` parameter snapshots for ``T``
        steps instead of ``T``, for one extra training step per step and sweep. Every
        recomputed block is checked against the next checkpoint (at ``fit`` the last one
        against the trained weights): a difference within rounding (nondeterministic
        GPU kernels) warns, a larger one raises. For exact mode and
        ``storage="replay"``; fast mode with a store keeps no trajectory after ``fit``.
        See :doc:`/scaling`.
    checkpoint_every : "auto" or int, default="auto"
        With ``trajectory="checkpoint"``: the spacing of the checkpoints in optimizer
        steps. ``"auto"`` takes ``k`` minimising ``ceil(T / k) + k`` for ``T`` =
        ``max_epochs`` times the batches of an epoch (about ``sqrt(T)``), which keeps at
        most ``2 sqrt(T)`` snapshots (also when training stops early: blocks are then
        recomputed in more levels). An int ``k`` holds ``ceil(T / k)`` checkpoints plus
        a block buffer of ``k - 1`` snapshots.
    last_epochs : int, "final_lr" or None, default=None
        Truncate the hypergradient to the end of training: sample ``i``'s weight
        ``eps_i`` acts only in the steps of the last ``last_epochs`` training epochs, so
        ``C[i, j] ~ loss_j(i dropped from those epochs only) - loss_j(with all)``. Earlier
        steps still shape the trajectory but add no per-sample term, and both modes stop
        their sweeps there (cheaper by the share of steps skipped). ``"final_lr"``: the
        epochs since the learning rate last changed (the final phase of the schedule,
        e.g. after a StepLR drop; the whole run at a constant rate). None, or at least
        the number of epochs, is the whole run: the paper's HYDRA. Early epochs at a
        large learning rate dominate the fast-mode sum; scoring label noise, the final
        phase alone ranks wrong labels better (see :doc:`/cleaning`). Exact mode gives
        the exact derivative of the truncated weighting (tested against finite
        differences). With fast mode and a store (``storage`` other than ``"replay"``)
        it is fixed at ``fit``.
    track : None, int or array-like of int, default=None
        Rows to attribute: all (None), a random subset of that many (seeded by
        ``random_state``) or explicit row indices. Rows not tracked are NaN in ``C``.
    per_sample : {"auto", "vmap", "jacobian"}, default="auto"
        How per-sample gradients are computed during replay: ``"vmap"`` treats samples
        as independent (fast); ``"jacobian"`` runs the real batch forward and takes the
        Jacobian of the per-sample losses (exact with BatchNorm batch statistics and
        replayed dropout masks). ``"auto"`` picks ``"jacobian"`` when the module has
        BatchNorm or dropout layers.
    fit_path : {"fused", "two_pass"}, default="fused"
        How fast mode with a store (``storage`` other than ``"replay"``) fills it, for
        SGD. ``"fused"``: during training, each tracked row's per-sample gradient is
        committed to the store at the step it is computed, its coefficient brought
        forward lazily (only when the row enters its next batch, and once at the end);
        the gradients come from the training backward itself (each ``Linear`` /
        ``Conv2d`` layer's input times its output gradient) when every trainable
        parameter lives in such a layer and the module has no BatchNorm, and are
        otherwise computed at that step like the two-pass fit computes them. No second
        pass, no parameter snapshots kept, training bit-identical to ``net.fit``; the
        store's working memory doubles during training for the momentum part (none
        without momentum; with a tight memory budget, ``"two_pass"`` with
        ``trajectory="memmap"`` keeps only the store in RAM). ``"two_pass"``: train while recording every step's
        parameters, then a second pass over the trajectory recomputes per-sample
        gradients with ``vmap``. Both give the same ``C`` to float rounding. Adam/AdamW
        (per-coordinate coefficients computed last step first), exact mode and
        ``storage="replay"`` always take the two-pass route.
    test_batch_size : int or "auto", default="auto"
        Test points per block when computing test gradients and per sweep (exact/replay).
        ``"auto"``: 256, except exact mode's sweeps on the CPU, which take about four
        million adjoint entries at a time (``4e6 / n_params`` test points, 8 to 256),
        where the per-column cost of a sweep is lowest (see :doc:`/scaling`).
    store_dir : str or None
        Directory for memmap files (the system's temporary directory when None): put
        them on a disk with room. The files have no name (:func:`tempfile.TemporaryFile`),
        so the directory looks empty and nothing is left behind however the process
        ends, a kill included; their space is freed when the object owning them is
        garbage-collected: the trajectory once fast mode has filled its store, the store
        with the attributor.
    random_state : int, RandomState or None
        Seeds torch before training (an int is passed to ``torch.manual_seed``).
    verbose : int, default=1
        Progress bars (tqdm) when > 0.

    Attributes
    ----------
    net_ : skorch.NeuralNet
        The trained clone.
    trajectory_ : Trajectory or None
        Recorded steps (freed after fit for fast mode with a store).
    rows_ : ndarray of int
        Tracked rows.
    trained_mask_ : ndarray of bool
        Rows that entered at least one gradient step (rows held out by
        ``train_split`` have exactly zero contribution).
    store_ : SampleStore, FactoredStore or None
        Fast-mode per-sample state (a ``FactoredStore`` keeps the ``Linear`` weights'
        blocks as logged factor pairs; both have ``matmul_t``).
    window_start_ : int
        First optimizer step whose per-sample terms count (0 unless ``last_epochs``).
    fit_path_ : {"fused", "two_pass"} or None
        How the store was filled (None without a store). ``fit_path="fused"`` gives
        ``"two_pass"`` with Adam, and when the ``last_epochs`` window turned out to begin
        where the fused fit could not reset the store (a learning rate changed mid-epoch
        with ``"final_lr"``, or fewer epochs than ``max_epochs``); the trajectory is
        then kept for that pass.
    hooks_fallback_ : str or None
        With a fused fit, why per-sample gradients were computed at each step instead of
        taken from the training backward (BatchNorm, a parameter outside ``Linear`` /
        ``Conv2d`` layers, ``per_sample="jacobian"``, or products that did not add up to
        the batch gradient at the first step); None when the hooks were used.
    rank_ : int or None
        Set by ``attribute`` with ``rank``: the number of basis vectors swept (None
        without ``rank``).
    truncation_error_ : float or None
        Set by ``attribute`` with ``rank``: the mean over the test points of
        ``truncation_error_per_test_``; 0 means exact mode's ``C`` to float rounding.
    truncation_error_per_test_ : ndarray of shape (n_test,) or None
        Per test point (column of ``C``), the fraction of its gradient's squared
        norm outside the span of the basis.
    """

    def __init__(self, net, mode="fast", rank=None, storage="dense", trajectory="memory",
                 checkpoint_every="auto", last_epochs=None, track=None, per_sample="auto",
                 fit_path="fused", test_batch_size="auto", store_dir=None, random_state=None,
                 verbose=1):
        self.net = net
        self.mode = mode
        self.rank = rank
        self.storage = storage
        self.trajectory = trajectory
        self.checkpoint_every = checkpoint_every
        self.last_epochs = last_epochs
        self.track = track
        self.per_sample = per_sample
        self.fit_path = fit_path
        self.test_batch_size = test_batch_size
        self.store_dir = store_dir
        self.random_state = random_state
        self.verbose = verbose

    _parameter_constraints = {
        **BaseAttributor._parameter_constraints,
        "mode": [StrOptions({"fast", "exact"})],
        "rank": [None, Interval(Integral, 1, None, closed="left"),
                 Interval(RealNotInt, 0, 1, closed="neither")],
        "storage": [StrOptions(set(STORE_KINDS) | {"replay"})],
        "trajectory": [StrOptions({"memory", "memmap", "checkpoint"})],
        "checkpoint_every": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left")],
        "last_epochs": [None, Interval(Integral, 1, None, closed="left"),
                        StrOptions({"final_lr"})],
        "track": [None, Interval(Integral, 1, None, closed="left"), "array-like"],
        "per_sample": [StrOptions({"auto", "vmap", "jacobian"})],
        "fit_path": [StrOptions({"fused", "two_pass"})],
        "test_batch_size": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "store_dir": [None, str, os.PathLike],
    }

    # -- parameters ------------------------------------------------------------------
    def _check_params(self):
        self._refuse_bools("last_epochs", "test_batch_size", "track", "checkpoint_every")
        if self.checkpoint_every != "auto" and self.trajectory != "checkpoint":
            raise ValueError(
                f"checkpoint_every={self.checkpoint_every!r} applies only with "
                f"trajectory='checkpoint' (got trajectory={self.trajectory!r}).")
        self._refuse_bools("rank")
        if self.rank is not None and self.mode != "exact":
            raise ValueError(
                f"rank={self.rank!r} applies only with mode='exact' (got mode="
                f"{self.mode!r}); use rank=None with fast mode.")
        if self.store_dir is not None and "memmap" in (self.storage, self.trajectory):
            check_directory(self.store_dir, "store_dir")

    def _before_train(self, n, n_params):
        # the fast-mode store is created (and its disk space reserved) before training,
        # so that a store_dir without room fails now, not after training
        self._new_store = None
        if self.trajectory == "checkpoint" and self.mode == "fast" and self.storage != "replay":
            raise ValueError(
                f"trajectory='checkpoint' keeps the trajectory small for exact mode and "
                f"storage='replay'; fast mode with storage={self.storage!r} keeps no "
                f"trajectory after fit. Use mode='exact', storage='replay', or "
                f"trajectory='memory'.")
        if self.mode == "fast" and self.storage != "replay":
            self.rows_ = select_rows(self.track, n, self.random_state, "track")
            # the fused fit's fillers write every row (the factor log never touches it),
            # so its pages are left untouched; the two-pass fit zeroes it (_fill_store)
            self._new_store = SampleStore(len(self.rows_), n_params, kind=self.storage,
                                          dtype=self.param_dtype_, directory=self.store_dir,
                                          zero=self.fit_path != "fused")

    def _make_recorder(self, dataset, record_rng):
        self._fused_recorder = None
        if self.trajectory == "checkpoint":
            return TrajectoryRecorder(dataset, record_rng=record_rng, storage="checkpoint",
                                      checkpoint_every=self.checkpoint_every)
        if getattr(self, "_new_store", None) is None or self.fit_path != "fused":
            return super()._make_recorder(dataset, record_rng)
        from ._fused import FusedRecorder

        rows_map = np.full(len(dataset), -1, dtype=np.int64)
        rows_map[self.rows_] = np.arange(len(self.rows_))
        self._fused_recorder = FusedRecorder(
            dataset, store=self._new_store, rows_map=rows_map, per_sample=self.per_sample,
            last_epochs=self.last_epochs, record_rng=record_rng, storage=self.trajectory,
            directory=self.store_dir)
        return self._fused_recorder

    def _fill_store(self, store):
        """The fast-mode store: finished by the fused recorder when it filled it for this
        window (a :class:`~hydrattr._core.factorlog.FactoredStore` where it logged
        ``Linear`` factors), else ``store`` filled by the two-pass sweep over the
        recorded trajectory."""
        import time

        rec, self._fused_recorder = getattr(self, "_fused_recorder", None), None
        lazy = None if rec is None else rec.lazy_
        self.fit_path_ = "two_pass"
        self.hooks_fallback_ = None
        self._fit_profile = {}  # seconds by part of the fit, read by benchmarks/perf
        if lazy is not None:
            self.hooks_fallback_ = rec.hook_fallback_
            if not rec.window_lost_ and lazy.start == self.window_start_ and \
                    len(lazy) == len(self.trajectory_):
                filled = lazy.finish()  # store, or a FactoredStore
                self.fit_path_ = "fused"
                self._fit_filler = type(lazy).__name__  # which store filler (for tests)
                layout = getattr(lazy, "layout", None)  # the Linear weights held as factors
                self._fit_factored = [] if layout is None else [b[:3] for b in layout.blocks]
                self._fit_profile = {"hooks_s": rec.seconds_["hooks"],
                                     "step_grads_s": rec.seconds_["step_grads"],
                                     "commit_s": lazy.seconds["commit"],
                                     "finish_s": lazy.seconds["finish"]}
                return filled
            lazy.release()
            store.zero()  # the window began elsewhere: fill it again from the record
        store.ensure_zero()
        tic = time.perf_counter()
        with module_mode(self.net_.module_, training=True):
            build_fast_store(self.trajectory_, self._loss_fn(), self._data_fn(), store,
                             self._rows_map, independent=self._independent,
                             device=self._device, progress=self._progress(),
                             start=self.window_start_)
        self._fit_profile = {"store_pass_s": time.perf_counter() - tic}
        return store

    def _check_last_step(self, last_grad):
        # a checkpointed trajectory recomputes theta(t) with a copy of the trained net;
        # its last block is recomputed now and checked against the trained weights
        if getattr(self.trajectory_, "storage", None) == "checkpoint":
            self.trajectory_.bind(self._step_replayer, final=self._trained_theta)
            self.trajectory_.check_last_block()
        super()._check_last_step(last_grad)

    def _step_replayer(self):
        return step_replayer(self.net_, self._data_fn())

    def _trained_theta(self):
        return flat_params(self.net_, self.spec_)

    @property
    def _independent(self):
        if self.per_sample == "auto":
            return not (self.module_flags_["batchnorm"] or self.module_flags_["dropout"])
        return self.per_sample == "vmap"

    def _after_fit(self):
        n = self.n_train_
        store, self._new_store = getattr(self, "_new_store", None), None
        if store is None:
            self.rows_ = select_rows(self.track, n, self.random_state, "track")
        self._rows_map = np.full(n, -1, dtype=np.int64)
        self._rows_map[self.rows_] = np.arange(len(self.rows_))
        self.store_ = None
        self.fit_path_ = self.hooks_fallback_ = None
        self.window_start_ = self.trajectory_.start_of_last_epochs(self.last_epochs)
        if store is not None:
            self.store_ = self._fill_store(store)
            self._store_last_epochs = self.last_epochs
            self.trajectory_ = None  # everything fast mode needs is in the store

    # -- attribution -----------------------------------------------------------------
    # exact mode's CPU sweep block, in adjoint entries (test columns x parameters): with
    # more, the stacked float64 adjoints and their per-step products outgrow the caches
    # and each column costs up to twice as much (measured in docs/scaling.rst)
    EXACT_SWEEP_ENTRIES = 4_000_000
    EXACT_SWEEP_MIN = 8  # columns per sweep at least, however large the net

    def _test_bs(self):
        """Test points per block of test gradients (and of fast-mode replay sweeps)."""
        return 256 if self.test_batch_size == "auto" else int(self.test_batch_size)

    def _sweep_bs(self, n_params):
        """Test columns per sweep: ``test_batch_size``, or by ``"auto"`` 256 (exact mode
        on the CPU: ``EXACT_SWEEP_ENTRIES / n_params``, 8 to 256)."""
        if self.test_batch_size != "auto":
            return int(self.test_batch_size)
        if self.mode == "exact" and self._device.type == "cpu":
            per = self.EXACT_SWEEP_ENTRIES // max(int(n_params), 1)
            return int(min(256, max(self.EXACT_SWEEP_MIN, per)))
        return 256

    def _blocks(self, G):
        bs = self._sweep_bs(G.shape[1])
        for s in range(0, G.shape[0], bs):
            yield G[s:s + bs]

    def _batchnorm_stats(self):
        """BatchNorm running statistics of the trained net (None without such layers)."""
        bn = BatchNormStats(self.net_.module_)
        return bn if len(bn) else None

    def _exact_test_grads(self, Xt, yt, objective):
        """Test gradients w.r.t. the parameters and, with BatchNorm, the running statistics.

        Returns ``(G, G_R)``; ``G_R`` is None without BatchNorm layers. Eval-mode
        BatchNorm outputs are recomputed from the running statistics so that they are
        differentiable (same values as torch's kernel).
        """
        bn = self._batchnorm_stats()
        if bn is None:
            return self._test_grads(Xt, yt, objective, batch_size=self._test_bs()), None
        from torch.func import grad, vmap

        from ._core.functional import unsqueeze
        from ._skorch import flat_params

        theta = flat_params(self.net_, self.spec_).to(self._device)
        R = bn.flat().to(self._device, theta.dtype)
        f = bn.eval_loss(self._loss_fn())

        def one(th, r, xi, yi):
            return f(th, r, unsqueeze(xi), unsqueeze(yi)).sum()

        def grads(x, y):
            g, gr = vmap(grad(one, argnums=(0, 1)), in_dims=(None, None, 0, 0))(theta, R, x, y)
            return g.detach(), gr.detach()

        with module_mode(self.net_.module_, training=False):
            return self._test_batches(grads, Xt, yt, objective, self._test_bs())

    def _lowrank(self, G, GR):
        """With ``rank`` in exact mode, the test gradients' basis to sweep (None
        otherwise); sets ``rank_`` and the ``truncation_error`` attributes."""
        self.rank_ = self.truncation_error_ = self.truncation_error_per_test_ = None
        if self.mode != "exact" or self.rank is None:
            return None
        seed = self.random_state if isinstance(self.random_state, Integral) else 0
        lowrank = lowrank_test_grads(G, self.rank, stats_grads=GR, seed=seed)
        self.rank_, self.truncation_error_ = lowrank.rank, lowrank.truncation_error
        self.truncation_error_per_test_ = lowrank.column_errors.cpu().numpy()
        return lowrank

    def _start(self):
        """First step of the window ``last_epochs`` (0: the whole run)."""
        self._validate_params()
        self._check_params()
        if self.store_ is not None:
            fitted = self._store_last_epochs
            if self.last_epochs != fitted:
                raise ValueError(
                    f"last_epochs={self.last_epochs!r}, but the fast-mode store was filled "
                    f"at fit with last_epochs={fitted!r}. Refit, or fit "
                    "with storage='replay' to change last_epochs after fit.")
            return self.window_start_
        self.window_start_ = self.trajectory_.start_of_last_epochs(self.last_epochs)
        return self.window_start_

    def _attribute(self, Xt, yt, objective):
        GR = None
        if self.mode == "exact" and self.store_ is not None:
            # the store holds fast-mode sums only; the trajectory exact mode needs is gone
            raise ValueError(
                "mode='exact' needs the recorded trajectory, but this attributor was fit "
                f"with mode='fast', storage={self.storage!r}, which keeps only the fast-mode "
                "store. Refit with mode='exact', or fit with storage='replay' to switch "
                "modes after fit.")
        t0 = self._start()
        if self.mode == "exact":
            # exact mode also differentiates the eval-mode test loss through the
            # BatchNorm running statistics accumulated along the trajectory
            G, GR = self._exact_test_grads(Xt, yt, objective)
        else:
            G = self._test_grads(Xt, yt, objective, batch_size=self._test_bs())
        lowrank = self._lowrank(G, GR)
        if lowrank is not None:  # sweep the basis; D from the coordinates below
            G, GR = lowrank.basis, lowrank.stats_basis
        progress = self._progress()
        if self.store_ is not None:
            D = self.store_.matmul_t(G).double()
        else:
            loss_fn, data_fn = self._loss_fn(), self._data_fn()
            bn = self._batchnorm_stats() if GR is not None else None
            parts = []
            start = 0
            with module_mode(self.net_.module_, training=True):
                for block in self._blocks(G):
                    if self.mode == "fast":
                        parts.append(fast_replay(
                            self.trajectory_, loss_fn, data_fn, block, self._rows_map,
                            len(self.rows_), independent=self._independent, device=self._device,
                            progress=progress, start=t0))
                    else:
                        sl = slice(start, start + block.shape[0])
                        parts.append(exact_adjoint(
                            self.trajectory_, loss_fn, data_fn, block, self._rows_map,
                            len(self.rows_), hessian=True, device=self._device,
                            progress=progress, bn=bn, start=t0,
                            stats_grads=None if GR is None else GR[sl],
                            adjoint_dtype=torch.float64))
                    start += block.shape[0]
            D = torch.cat(parts, dim=1) if parts else \
                torch.zeros(len(self.rows_), 0, dtype=torch.float64)
        if lowrank is not None:
            D = expand(D, lowrank.coords)
        C = np.full((self.n_train_, D.shape[1]), np.nan)
        C[self.rows_] = -D.cpu().numpy()
        return C

    def attribute_forward(self, X_test, y_test, rows, hessian=None):
        """The paper's forward recurrence for a few training rows (reference path).

        One Hessian-vector product per tracked row per step, so only for small ``rows``.
        Agrees with :meth:`attribute` (exact mode: to float tolerance).

        Parameters
        ----------
        X_test, y_test : array-like
        rows : array-like of int
            Training rows to track.
        hessian : bool or None
            Keep the Hessian term (default: ``mode == "exact"``).

        Returns
        -------
        C : ndarray of shape (len(rows), n_test)
        """
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, "net_")
        if self.trajectory_ is None:
            raise ValueError("attribute_forward needs the recorded trajectory: fit with "
                             "mode='exact' or storage='replay'.")
        X_test, y_test = self._validate_xy(X_test, y_test, reset=False)
        Xt, yt = self._to_tensors(X_test, y_test)
        hessian = (self.mode == "exact") if hessian is None else bool(hessian)
        GR = None
        if hessian:  # the exact derivative, through BatchNorm running statistics too
            G, GR = self._exact_test_grads(Xt, yt, "per_sample")
        else:
            G = self._test_grads(Xt, yt, "per_sample", batch_size=self._test_bs())
        bn = self._batchnorm_stats() if GR is not None else None
        with module_mode(self.net_.module_, training=True):
            out = exact_forward(self.trajectory_, self._loss_fn(), self._data_fn(),
                                np.asarray(rows), hessian=hessian, device=self._device,
                                progress=self._progress(), bn=bn, start=self._start())
        if bn is not None:
            tangents, dR = out
            return -(tangents @ G.T + dR @ GR.T).double().cpu().numpy()
        return -(out @ G.T).double().cpu().numpy()

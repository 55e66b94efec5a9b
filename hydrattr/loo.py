"""LeaveOneOutAttributor: the ground truth HYDRA approximates, by retraining."""
from __future__ import annotations

import contextlib
import copy
import math
import numbers
import threading
import warnings

import numpy as np
import torch
from joblib import Parallel, delayed, effective_n_jobs
from sklearn.base import clone
from sklearn.utils._param_validation import Hidden, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._core.sgd import SGDHyper
from ._core.replay import replay_training
from ._core.running_stats import BatchNormStats
from ._inputs import collate_fn_of, dataset_data_fn, input_kind, n_rows, select_rows, \
    take_rows
from ._skorch import flat_params, make_data_fn, make_loss_fn, module_mode, param_spec, \
    trained_clone
from .base import BaseAttributor

__all__ = ["LeaveOneOutAttributor"]

# torch's random number generator is global to a process: jobs that seed it or replay
# recorded RNG states must not interleave when a thread-based joblib backend runs them
_RNG_LOCK = threading.RLock()


class LeaveOneOutAttributor(BaseAttributor):
    """Leave-one-out retraining: ``C[i, j] = loss_j(trained without i) - loss_j(trained with all)``.

    The reference every approximate attributor is measured against, for small problems:
    it retrains the network once per selected training sample. ``fit`` trains the full
    model (a clone of ``net``, seeded by ``random_state``) and then all leave-one-out
    models, keeping their parameters (``params_``); ``attribute`` only evaluates test
    losses, so it is cheap for any test set. Test losses are evaluated in eval mode
    (dropout off, BatchNorm with each model's own running statistics).

    Parameters
    ----------
    net : skorch.NeuralNet
        The network as you would train it (it is cloned). ``order="same"`` and
        ``warm_start=True`` with ``order="same"`` need ``torch.optim.SGD`` (they replay
        the recorded SGD steps); ``order="reshuffle"`` retrains with skorch itself and
        works with any optimizer.
    track : None, int or array-like of int, default=None
        Training rows to attribute, i.e. to leave out one at a time: all (None), a random
        subset of that many (seeded by ``random_state``) or explicit row indices (the
        parameter of the same name as :class:`~hydrattr.HydraAttributor`'s). Rows not
        tracked are NaN in ``C``.
    order : {"same", "reshuffle"}, default="same"
        ``"same"``: replay the recorded training run (same batches, same positions of
        every other sample, same dropout masks, same learning rates) with sample ``i``'s
        loss multiplier set to 0. Each batch gradient is still divided by the recorded
        batch size ``B``, and sample ``i`` still runs through the forward pass, so with
        BatchNorm it still counts in the batch statistics (which carry no sample
        weight). This is the finite version of HYDRA's derivative: ``C`` equals HYDRA's
        exact ``C`` up to second-order terms (``eps_i = -1/N`` instead of
        infinitesimal). The baseline ``loss_j(trained with all)`` is computed by the same
        replay with all multipliers 1, so float differences between the replay and
        torch's optimizer do not enter ``C``. BatchNorm running statistics are replayed
        too (each leave-one-out model has its own).
        ``"reshuffle"``: retrain a fresh clone with skorch on the data without row
        ``i``, seeding torch with the same seed as the full run. Batches differ from the
        full run (every sample after ``i`` moves), so ``C`` includes the change due to
        reshuffling: on non-convex problems that noise can dominate single samples.
    warm_start : bool, default=False
        Instead of retraining from scratch, continue from the trained full model for
        ``warm_start_epochs`` epochs without the sample (the shortcut of Brinkman and
        Horken, 2018), from the final parameters, optimizer state (momentum buffers) and
        learning rates; learning-rate schedulers are not stepped during the
        continuation. The baseline is the full model continued the same way with all
        samples (not the full model itself), so the extra training cancels.
        With ``order="same"`` the continuation replays the recorded batches (and dropout
        masks) of the last ``warm_start_epochs`` epochs again at the final learning
        rates, with sample ``i``'s multiplier 0; with ``order="reshuffle"`` it is a
        skorch ``partial_fit`` on the data without row ``i`` (same torch seed).
    warm_start_epochs : int, default=1
        Epochs of the warm-start continuation (``order="same"``: at most the number of
        epochs trained).
    n_jobs : int or None, default=None
        Parallel retrainings through joblib (``None`` means 1 unless inside a
        :func:`joblib.parallel_config` context). Any joblib backend works, including
        dask: ``with joblib.parallel_config(backend="dask"):`` runs the retrainings on
        the workers of the current ``dask.distributed.Client``. Because torch's RNG is
        global to a process, jobs that draw random numbers (dropout replays, skorch
        retrainings) run one at a time inside one process; use process-based workers
        (loky, the default, or dask workers with processes) for real parallelism.
    random_state : int, RandomState or None
        Seed for torch (full run and every retraining) and for choosing ``track`` when
        it is an int. With None a seed is drawn once and reused for all retrainings.
    verbose : int, default=1
        Progress bar (tqdm) when > 0.
    indices : deprecated
        The old name of ``track``; still accepted with a ``FutureWarning`` in this
        release and removed in the next.

    Attributes
    ----------
    net_ : skorch.NeuralNet
        The full model.
    rows_ : ndarray of int
        Rows left out (the tracked rows), in the row order of ``params_``
        (``indices_``, the old name, warns and returns it).
    params_ : torch.Tensor of shape (len(rows_), n_params)
        Flat parameters of each leave-one-out model.
    running_ : torch.Tensor of shape (len(rows_), n_stats) or None
        BatchNorm running statistics of each leave-one-out model (None without
        BatchNorm layers).
    baseline_params_, baseline_running_ : torch.Tensor
        The same for the baseline model.
    seed_ : int
        The torch seed of every run.
    spec_ : ParamSpec
        Layout of the flat parameter vectors.

    Notes
    -----
    Cost: one full training (or replay, or continuation) per selected row; memory:
    one parameter vector per selected row. Rows never used in a gradient step (held out
    by skorch's ``train_split``) get exactly 0 with ``order="same"``.
    """

    def __init__(self, net, track=None, order="same", warm_start=False, warm_start_epochs=1,
                 n_jobs=None, random_state=None, verbose=1, indices="deprecated"):
        self.net = net
        self.track = track
        self.order = order
        self.warm_start = warm_start
        self.warm_start_epochs = warm_start_epochs
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.verbose = verbose
        self.indices = indices

    @property
    def _record(self):
        # replays need the recorded run; skorch retrainings do not
        return "trajectory" if self.order == "same" else None

    _parameter_constraints = {
        **BaseAttributor._parameter_constraints,
        "track": [None, Interval(numbers.Integral, 1, None, closed="left"), "array-like"],
        "indices": [Hidden(StrOptions({"deprecated"})), None,
                    Interval(numbers.Integral, 1, None, closed="left"), "array-like"],
        "order": [StrOptions({"same", "reshuffle"})],
        "warm_start": ["boolean"],
        "warm_start_epochs": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_jobs": [None, numbers.Integral],
    }

    # -- parameters ------------------------------------------------------------------
    def _check_params(self):
        self._refuse_bools("track", "indices", "warm_start_epochs", "n_jobs")
        self._track = self.track
        if not (isinstance(self.indices, str) and self.indices == "deprecated"):
            if self.track is not None:
                raise ValueError("Pass the rows as track only (indices is its old name).")
            warnings.warn("LeaveOneOutAttributor(indices=...) is now track=..., the name "
                          "HydraAttributor uses; indices will be removed in the next "
                          "release.", FutureWarning, stacklevel=3)
            self._track = self.indices

    @property
    def indices_(self):
        """Deprecated: the old name of ``rows_``."""
        warnings.warn("LeaveOneOutAttributor.indices_ is now rows_; indices_ will be "
                      "removed in the next release.", FutureWarning, stacklevel=2)
        return self.rows_

    def _torch_seed(self):
        seed = super()._torch_seed()
        if seed is None:  # draw one seed and reuse it for every retraining
            seed = int(np.random.randint(np.iinfo(np.int32).max))
        self.seed_ = seed
        return seed

    # -- fit -------------------------------------------------------------------------

    def _after_fit(self):
        n = self.n_train_
        if self._record is None:  # (the recorder sets spec_ otherwise)
            self.spec_ = param_spec(self.net_)
        self.rows_ = select_rows(self._track, n, self.random_state, "track")
        if self.order == "same":
            job, fn = self._replay_job(), _replay_rows
        else:
            job, fn = self._refit_job(), _refit_rows
        # the baseline by the same code path (row -1 = nothing left out)
        (_, theta0, R0), = fn(job, np.array([-1]))
        self.baseline_params_, self.baseline_running_ = theta0, R0
        results = self._run_parallel(fn, job, self.rows_)
        pos = {int(i): k for k, i in enumerate(self.rows_)}
        params = torch.empty(len(self.rows_), self.spec_.n_params, dtype=theta0.dtype)
        running = None if R0 is None else torch.empty(len(self.rows_), R0.shape[0],
                                                      dtype=R0.dtype)
        for i, theta, R in results:
            params[pos[i]] = theta
            if running is not None:
                running[pos[i]] = R
        self.params_, self.running_ = params, running
        self.trajectory_ = None  # keep only what attribute needs

    def _warm_steps(self):
        counts = list(self.net_.history[:, "train_batch_count"])
        k = int(self.warm_start_epochs)
        if k > len(counts):
            raise ValueError(f"warm_start_epochs={k} exceeds the {len(counts)} epochs trained; "
                             f"order='same' continues by replaying recorded epochs.")
        return int(sum(counts[-k:]))

    def _replay_job(self):
        traj = self.trajectory_
        if not isinstance(traj.hyper, SGDHyper):
            raise NotImplementedError(
                "LeaveOneOutAttributor(order='same') replays torch.optim.SGD steps; use "
                "order='reshuffle' for other optimizers.")
        job = {"net": trained_clone(self.net, self.net_), "spec": self.spec_, "X": self._X,
               "y": self._y, "traj": traj, "theta0": None, "v0": None, "running0": None,
               "counts0": None}
        if self.warm_start:
            job.update(_continuation(self.net_, self.spec_, traj, self._warm_steps()))
        return job

    def _refit_job(self):
        job = {"spec": self.spec_, "X": self._X, "y": self._y, "seed": self.seed_,
               "warm": bool(self.warm_start), "epochs": int(self.warm_start_epochs)}
        job["net"] = trained_clone(self.net, self.net_, drop_schedulers=True) \
            if self.warm_start else clone(self.net)
        return job

    def _run_parallel(self, fn, job, rows):
        n_eff = max(1, effective_n_jobs(self.n_jobs))
        size = max(1, min(8, math.ceil(len(rows) / (4 * n_eff))))
        chunks = [rows[s:s + size] for s in range(0, len(rows), size)]
        progress = self._progress()
        bar = None if progress is None else progress(
            total=len(rows), desc=f"leave-one-out ({self.order}"
                                  f"{', warm start' if self.warm_start else ''})")
        out = []
        gen = Parallel(n_jobs=self.n_jobs, return_as="generator_unordered")(
            delayed(fn)(job, chunk) for chunk in chunks)
        for res in gen:
            out.extend(res)
            if bar is not None:
                bar.update(len(res))
        if bar is not None:
            bar.close()
        return out

    # -- attribute -------------------------------------------------------------------
    def _attribute(self, Xt, yt, objective):
        check_is_fitted(self, "params_")
        L0 = self._eval_losses(self.baseline_params_, self.baseline_running_, Xt, yt)
        width = 1 if objective == "mean" else n_rows(Xt)
        C = np.full((self.n_train_, width), np.nan)
        for k, i in enumerate(self.rows_):
            R = None if self.running_ is None else self.running_[k]
            d = self._eval_losses(self.params_[k], R, Xt, yt) - L0
            C[i] = d.mean() if objective == "mean" else d
        return C

    def _eval_losses(self, theta, R, Xt, yt, batch_size=1024):
        """Eval-mode per-sample test losses at flat parameters ``theta`` (and stats ``R``)."""
        net = self.net_
        loss_fn = make_loss_fn(net, self.spec_)
        bn = BatchNormStats(net.module_) if R is not None else None
        dev = self._device
        theta = theta.to(dev)
        if bn is not None:
            f, R = bn.eval_loss(loss_fn), R.to(dev)
            loss = lambda x, y: f(theta, R, x, y)  # noqa: E731
        else:
            loss = lambda x, y: loss_fn(theta, x, y)  # noqa: E731
        with module_mode(net.module_, training=False), torch.no_grad():
            return self._test_batches(loss, Xt, yt, batch_size=batch_size).double().cpu().numpy()


# -- jobs (module level, so process-based joblib backends can pickle them) ---------------
def _continuation(net, spec, traj, n_steps):
    """Replay inputs that continue the trained model through its last ``n_steps`` batches."""
    theta0 = flat_params(net, spec)
    params = dict(net.module_.named_parameters())
    bufs = []
    for name in spec.names:
        buf = net.optimizer_.state.get(params[name], {}).get("momentum_buffer")
        bufs.append(torch.zeros_like(params[name]) if buf is None else buf)
    v0 = spec.flatten([b.detach() for b in bufs])
    rows = []
    groups = net.optimizer_.param_groups
    for _ in range(n_steps):
        rows.append({"lr": [float(g["lr"]) for g in groups],
                     "momentum": [float(g["momentum"]) for g in groups],
                     "dampening": [float(g["dampening"]) for g in groups],
                     "weight_decay": [float(g["weight_decay"]) for g in groups],
                     "nesterov": [bool(g["nesterov"]) for g in groups],
                     "first": [False for _ in groups]})
    bn = BatchNormStats(net.module_)
    cont = traj.continued(len(traj) - n_steps, theta0, SGDHyper.from_rows(rows))
    return {"traj": cont, "theta0": theta0, "v0": v0.detach().clone(),
            "running0": bn.flat() if len(bn) else None,
            "counts0": bn.counts() if len(bn) else None}


def _replay_rows(job, rows):
    """Replay the recorded run once per row with that row's loss multiplier 0."""
    net = copy.deepcopy(job["net"])  # private modules: hooks and modes are not shared
    spec, traj = job["spec"], job["traj"]
    dev = next(net.module_.parameters()).device
    loss_fn = make_loss_fn(net, spec)
    if input_kind(job["X"]) == "dataset":
        data_fn = dataset_data_fn(job["X"], collate_fn_of(net), dev)
    else:
        data_fn = make_data_fn(job["X"], job["y"], dev)
    bn = BatchNormStats(net.module_)
    bn = bn if len(bn) else None
    random = any(s is not None for s in traj.rng_states)
    n = n_rows(job["X"])
    out = []
    with module_mode(net.module_, training=True):
        for i in rows:
            mult = np.ones(n)
            if i >= 0:
                mult[i] = 0.0
            with (_RNG_LOCK if random else contextlib.nullcontext()):
                res = replay_training(traj, loss_fn, data_fn, mult, theta0=job["theta0"],
                                      device=dev, bn=bn, running0=job["running0"],
                                      v0=job["v0"], counts0=job["counts0"])
            theta, R = res if bn is not None else (res, None)
            out.append((int(i), theta.detach().cpu(),
                        None if R is None else R.detach().cpu()))
    return out


def _refit_rows(job, rows):
    """Retrain (or continue training) with skorch once per row, without that row."""
    X, y, spec = job["X"], job["y"], job["spec"]
    out = []
    for i in rows:
        keep = np.delete(np.arange(n_rows(X)), i) if i >= 0 else np.arange(n_rows(X))
        if input_kind(X) == "dataset":
            Xk, yk = torch.utils.data.Subset(X, keep.tolist()), None
        else:
            Xk, yk = take_rows(X, torch.as_tensor(keep)), y[torch.as_tensor(keep)]
        with _RNG_LOCK:
            if job["warm"]:
                net = copy.deepcopy(job["net"])
                torch.manual_seed(job["seed"])
                net.partial_fit(Xk, yk, epochs=job["epochs"])
            else:
                net = clone(job["net"])
                torch.manual_seed(job["seed"])
                net.fit(Xk, yk)
        bn = BatchNormStats(net.module_)
        out.append((int(i), flat_params(net, spec).detach().cpu(),
                    bn.flat().cpu() if len(bn) else None))
    return out

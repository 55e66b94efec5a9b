"""BaseAttributor: parameters, validation, cloning and recording the net, the C contract."""
from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils._param_validation import InvalidParameterError
from sklearn.utils.validation import check_is_fitted, validate_data
from tqdm.auto import tqdm

from ._inputs import cast_inputs, check_dataset, check_mapping, collate_all, collate_fn_of, \
    dataset_data_fn, input_kind, input_shape, n_rows, slice_rows, to_device
from ._skorch import NeuralNet, check_net, check_targets, make_data_fn, make_loss_fn, \
    module_flags, probe_net, record_fit, torch_seed

__all__ = ["BaseAttributor"]


class BaseAttributor(BaseEstimator):
    """Shared machinery of every attributor.

    ``fit(X, y)`` clones ``net`` (the caller's object is never touched), seeds torch
    from ``random_state`` and trains the clone with skorch's own ``fit`` while a
    recorder watches (:func:`~hydrattr._skorch.record_fit`; ``_record`` says what is
    recorded: ``"trajectory"``, ``"rows"`` or None).
    ``attribute(X_test, y_test)`` returns ``C`` of shape ``(n_train, n_test)`` with
    ``C[i, j] ~ loss_j(trained without i) - loss_j(trained with all)``: positive means
    sample ``i`` helped test point ``j``.

    What ``fit`` refuses (each with an error naming the cause): targets the net's
    criterion cannot take (class labels outside the module's outputs, non-integral or
    string labels, shapes the loss would broadcast), training that diverged (a
    non-finite loss or non-finite trained parameters) and updates that differ from the
    recorded ones (gradient clipping, callbacks that edit weights). A Ctrl-C during
    training follows skorch: training stops, ``fit`` goes on with the net as trained so
    far, warns, and sets ``interrupted_``; only the optimizer steps actually applied are
    attributed. Press Ctrl-C again to stop ``fit`` altogether.

    Subclasses implement ``_after_fit()`` and ``_attribute(X_test, y_test, objective)``,
    and extend ``_parameter_constraints`` (scikit-learn's parameter validation, run
    first in ``fit``); ``_check_params()`` keeps the rules that tie parameters together.
    """

    _record = "trajectory"  # what record_fit records (see hydrattr._skorch.record_fit)

    _parameter_constraints = {
        "net": [NeuralNet],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.input_tags.allow_nan = False
        tags.non_deterministic = False
        return tags

    # -- helpers -------------------------------------------------------------------
    def _progress(self):
        verbose = getattr(self, "verbose", 0)
        if not verbose:
            return None
        return lambda total, desc: tqdm(total=total, desc=desc, leave=False)

    def _torch_seed(self):
        """The seed torch gets before training (None: left as it is)."""
        return torch_seed(self.random_state)

    def _validate_xy(self, X, y, reset):
        # X: numpy array, torch tensor, dict / skorch SliceDict, or torch Dataset
        # (hydrattr/_inputs.py); tensors are treated exactly like their numpy copies
        kind = input_kind(X)
        if kind == "tensor":
            X = X.detach().cpu().numpy()
        if isinstance(y, torch.Tensor):
            y = y.detach().cpu().numpy()
        if kind in ("dict", "dataset"):
            return self._validate_other_inputs(X, y, reset, kind)
        # multi_output=True keeps a regression target of shape (n, 1) as it is: skorch's
        # NeuralNetRegressor pairs it with a module output of shape (n, 1), and flattening
        # it would make MSELoss broadcast (n, 1) against (n,) into an n x n loss.
        X, y = validate_data(self, X, y, reset=reset, allow_nd=True, dtype="numeric",
                             ensure_all_finite=True, y_numeric=False, multi_output=True)
        if X.dtype.kind not in "fiub":
            raise ValueError(f"X must be numeric, got dtype {X.dtype}.")
        y = np.asarray(y)
        # pandas (copy-on-write) hands out read-only views, which torch warns about at
        # every conversion; an in-memory copy is cheap beside training (memmaps are kept)
        if not X.flags.writeable and not isinstance(X, np.memmap):
            X = np.array(X)
        if not y.flags.writeable:
            y = np.array(y)
        if y.ndim == 2 and y.shape[1] == 1 and y.dtype.kind not in "f":
            y = y.ravel()  # a column of class labels: CrossEntropyLoss wants shape (n,)
        if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
            raise ValueError("y contains NaN or infinity.")
        if not reset and isinstance(self.input_shape_, tuple) \
                and X.shape[1:] != self.input_shape_:
            raise ValueError(f"X_test must have per-sample shape {self.input_shape_} like the "
                             f"training data, got {X.shape[1:]}.")
        return X, y

    def _validate_other_inputs(self, X, y, reset, kind):
        if kind == "dict":
            X, y = check_mapping(X, y)
            shape = input_shape(X)
            if not reset and isinstance(self.input_shape_, dict) and shape != self.input_shape_:
                raise ValueError(f"X_test must have the keys and per-sample shapes "
                                 f"{self.input_shape_} like the training data, got {shape}.")
        else:
            X, y = check_dataset(X, y)
        if reset and hasattr(self, "n_features_in_"):
            del self.n_features_in_
        return X, y

    def _to_tensors(self, X, y):
        kind = input_kind(X)
        if kind == "dataset":  # targets come from the dataset (skorch's convention)
            return collate_all(X, collate_fn_of(self.net_))
        if kind == "dict":
            Xt = {k: torch.as_tensor(np.ascontiguousarray(v),
                                     dtype=self.param_dtype_ if v.dtype.kind == "f" else None)
                  for k, v in X.items()}
            return Xt, self._y_tensor(y)
        Xt = torch.as_tensor(np.ascontiguousarray(X), dtype=self.param_dtype_)
        return Xt, self._y_tensor(y)

    def _y_tensor(self, y):
        if y.dtype.kind in "iub":
            return torch.as_tensor(y.astype(np.int64))
        return torch.as_tensor(y, dtype=self.param_dtype_)

    # -- fit -------------------------------------------------------------------------
    def _first_rows(self, X, y, net, k=4):
        """The first ``k`` rows of ``X`` as the net's input, with their targets."""
        kind = input_kind(X)
        if kind == "dataset":
            return collate_all(X, collate_fn_of(net), rows=range(min(k, n_rows(X))))
        def head(v, cast):  # as _to_tensors converts them
            v = np.ascontiguousarray(v[:k])
            return torch.as_tensor(v, dtype=self.param_dtype_ if cast else None)

        if kind == "dict":
            return {key: head(v, v.dtype.kind == "f") for key, v in X.items()}, y
        return head(X, True), y

    def _check_targets(self, X, y, net, name):
        if y is None or input_kind(X) == "dataset":
            return
        x, _ = self._first_rows(X, y, net)
        for msg in check_targets(net, x, y, name):
            warnings.warn(msg, UserWarning, stacklevel=4)

    def _before_train(self, n_rows, n_params):
        """Hook run after validation and before training (``n_rows`` training rows,
        ``n_params`` trainable parameters): anything that can fail for a bad parameter should fail here."""

    def _make_recorder(self, dataset, record_rng):
        """The callback that records the run, or None for
        :func:`~hydrattr._skorch.record_fit`'s default (HYDRA's fused fit uses a subclass)."""
        return None

    def _fit_net(self, X, y):
        """Clone, initialise, seed and train the net while recording what ``_record`` says."""
        check_net(self.net)
        probe = probe_net(self.net)  # the parameter dtype, without using the RNG
        self.param_dtype_ = next(probe.module_.parameters()).dtype
        has_bn, has_dropout = module_flags(probe.module_)
        n_params = sum(p.numel() for p in probe.module_.parameters() if p.requires_grad)
        np_dtype = torch.empty(0, dtype=self.param_dtype_).numpy().dtype
        Xc = cast_inputs(X, np_dtype)
        if y is None:
            yc = None
        else:
            yc = y.astype(np.int64) if y.dtype.kind in "iub" else y.astype(np_dtype, copy=False)
        with torch.random.fork_rng():
            self._check_targets(Xc, y, probe, "y")
        del probe
        self._before_train(n_rows(X), n_params)
        rec = record_fit(self.net, Xc, yc, what=self._record, seed=self._torch_seed(),
                         record_rng=has_dropout, storage=getattr(self, "trajectory", "memory"),
                         directory=getattr(self, "store_dir", None),
                         make_recorder=self._make_recorder)
        net = self.net_ = rec.net
        self.module_flags_ = {"batchnorm": has_bn, "dropout": has_dropout}
        self.input_shape_ = input_shape(X)
        self.n_train_ = n_rows(X)
        if input_kind(X) == "dataset":  # batches are collated from it on demand
            self._X, self._y = X, None
        else:
            self._X, self._y = self._to_tensors(Xc, yc)
        self.interrupted_ = rec.interrupted
        if rec.trajectory is not None:
            self.spec_ = rec.spec
            self.trajectory_ = rec.trajectory
            self.trained_mask_ = rec.trajectory.used_rows()
            self._check_training(rec.first_nonfinite_loss)
            if rec.problems:
                raise ValueError("hydrattr cannot attribute this training run: "
                                 + " ".join(rec.problems))
            self._check_last_step(rec.last_grad)
            n_unused = int((~self.trained_mask_).sum())
            if n_unused:
                warnings.warn(
                    f"{n_unused} of {self.n_train_} training rows never entered a gradient "
                    f"step (skorch's train_split holds out a validation fraction by default); "
                    f"their contributions are exactly zero. Pass train_split=None to the net "
                    f"to attribute every row.", UserWarning, stacklevel=3)
        else:
            self._check_training(None)
        if self.interrupted_:
            steps = "" if rec.trajectory is None else \
                f" after {len(self.trajectory_)} optimizer steps"
            warnings.warn(
                f"Training was interrupted (KeyboardInterrupt){steps}, in epoch "
                f"{len(net.history)} of max_epochs={net.max_epochs}. skorch stops training on "
                f"Ctrl-C and keeps the weights; hydrattr attributes the net as trained so "
                f"far, the steps actually applied (interrupted_=True). Fit again for the "
                f"full run.", UserWarning, stacklevel=3)
        return rec

    def _check_training(self, bad_loss):
        """Refuse a run whose training loss or trained parameters are not finite."""
        from ._skorch import flat_params, param_spec

        spec = getattr(self, "spec_", None) or param_spec(self.net_)
        theta = flat_params(self.net_, spec)
        bad_params = not bool(torch.isfinite(theta).all())
        if bad_loss is None:
            losses = [b.get("train_loss") for epoch in self.net_.history
                      for b in epoch.get("batches", [])]
            bad = [k for k, v in enumerate(losses) if v is not None and not np.isfinite(v)]
            bad_loss = bad[0] if bad else None
        if bad_params or bad_loss is not None:
            what = []
            if bad_loss is not None:
                what.append(f"the training loss was not finite at step {bad_loss}")
            if bad_params:
                what.append(f"{int((~torch.isfinite(theta)).sum())} of {theta.numel()} "
                            f"trained parameters are NaN or infinite")
            raise ValueError(
                f"Training diverged: {' and '.join(what)}, so there is nothing meaningful "
                f"to attribute. Lower the learning rate (net.lr="
                f"{getattr(self.net_, 'lr', None)!r}) or check that net.criterion matches "
                f"the module's output (e.g. CrossEntropyLoss for logits).")

    def _check_last_step(self, last_grad):
        """Recompute the last step's batch gradient from the recorded loss and compare it
        with the gradient the optimizer used: a loss term, an overridden train step or
        anything else outside ``net.get_loss`` makes them differ, and then no sweep
        differentiates what was trained. Tolerance ``sqrt(eps)`` of the parameter dtype
        (relative, in norm): summation order differs from skorch's by O(eps * batch),
        while an update that matters differs by much more."""
        from ._core.steps import batch_grad
        from ._skorch import module_mode

        traj = self.trajectory_
        if last_grad is None or not len(traj):
            return
        t = len(traj) - 1
        theta = traj.theta(t, self._device)
        x, y = self._data_fn()(traj.indices[t])
        w = torch.full((len(traj.indices[t]),), traj.weights[t], dtype=theta.dtype,
                       device=self._device)
        with module_mode(self.net_.module_, training=True):
            g = batch_grad(self._loss_fn(), theta, x, y, w, traj.rng_states[t]).detach()
        used = last_grad.to(g.device, g.dtype)
        err = float((g - used).norm())
        scale = float(used.norm())
        tol = float(torch.finfo(g.dtype).eps) ** 0.5
        if err > tol * scale + torch.finfo(g.dtype).tiny:
            raise ValueError(
                f"hydrattr cannot attribute this training run: the gradient the optimizer "
                f"used in the last step differs from the gradient of the net's loss "
                f"(net.get_loss on the recorded batch) by {err / max(scale, 1e-300):.2g} "
                f"of its norm. Something outside get_loss changes the update (an "
                f"overridden train_step or train_step_single, a penalty added to the "
                f"loss there, a callback); hydrattr differentiates get_loss only.")

    def fit(self, X, y):
        """Train a clone of ``net`` on ``(X, y)`` and prepare attribution.

        What is prepared depends on the attributor: HYDRA records the training trajectory
        (and, in fast mode, fills the per-sample store), influence functions factor or
        prepare the Hessian at the trained weights, leave-one-out retrains every
        removal model. The caller's ``net`` is never modified.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Training inputs, cast to the module's parameter dtype.
        y : array-like of shape (n_samples,)
            Targets.

        Returns
        -------
        self
        """
        self._validate_params()
        self._check_params()
        X, y = self._validate_xy(X, y, reset=True)
        self._fit_net(X, y)
        self._after_fit()
        return self

    def _check_params(self):
        """Rules ``_parameter_constraints`` cannot state (subclasses extend it); called in
        ``fit`` right after scikit-learn's parameter validation."""

    def _refuse_bools(self, *names):
        """scikit-learn's ``Interval(Integral, ...)`` takes ``True`` for 1: refuse it."""
        for name in names:
            v = getattr(self, name)
            if isinstance(v, (bool, np.bool_)):
                raise InvalidParameterError(
                    f"The {name!r} parameter of {type(self).__name__} must be an int, not a "
                    f"bool. Got {v!r} instead.")

    def _after_fit(self):
        pass

    # -- attribute -------------------------------------------------------------------
    def attribute(self, X_test, y_test, objective="per_sample"):
        """Contribution of every training sample to each test loss.

        Parameters
        ----------
        X_test : array-like of shape (n_test, ...)
        y_test : array-like of shape (n_test,)
        objective : {"per_sample", "mean"}, default="per_sample"
            One column per test point, or a single column for the mean test loss.

        Returns
        -------
        C : ndarray of shape (n_train, n_test) or (n_train, 1)
            ``C[i, j] ~ loss_j(without i) - loss_j(with all)``; positive = helpful.
        """
        check_is_fitted(self, self._fitted_attribute)
        if objective not in ("per_sample", "mean"):
            raise ValueError(f"objective must be 'per_sample' or 'mean', got {objective!r}.")
        X_test, y_test = self._validate_xy(X_test, y_test, reset=False)
        Xt, yt = self._test_inputs(X_test, y_test)
        return np.asarray(self._attribute(Xt, yt, objective), dtype=np.float64)

    _fitted_attribute = "net_"  # what check_is_fitted looks for

    def _test_inputs(self, X_test, y_test):
        """Check the test targets against the net and convert the test points like the
        training data."""
        self._check_targets(X_test, y_test, self.net_, "y_test")
        return self._to_tensors(X_test, y_test)

    # -- shared torch plumbing -------------------------------------------------------
    @property
    def _device(self):
        return next(self.net_.module_.parameters()).device

    def _loss_fn(self):
        return make_loss_fn(self.net_, self.spec_)

    def _data_fn(self):
        if input_kind(self._X) == "dataset":
            return dataset_data_fn(self._X, collate_fn_of(self.net_), self._device)
        return make_data_fn(self._X, self._y, self._device)

    def _test_batches(self, fn, Xt, yt, objective="per_sample", batch_size=256):
        """``fn(x, y)`` on each block of ``batch_size`` test points (moved to the device):
        one tensor, or a tuple of tensors, with one row per test point. Returns them
        concatenated; with ``objective="mean"`` their mean over the test points, summed
        block by block so that the per-point rows are never held together."""
        out, total, m = [], None, n_rows(Xt)
        for s in range(0, m, batch_size):
            x = to_device(slice_rows(Xt, s, s + batch_size), self._device)
            parts = fn(x, yt[s:s + batch_size].to(self._device))
            parts = parts if isinstance(parts, tuple) else (parts,)
            if objective == "mean":
                sums = tuple(p.sum(dim=0, keepdim=True) for p in parts)
                total = sums if total is None else tuple(a + b for a, b in zip(total, sums))
            else:
                out.append(parts)
        res = tuple(t / m for t in total) if objective == "mean" else \
            tuple(torch.cat(col) for col in zip(*out))
        return res if len(res) > 1 else res[0]

    def _test_grads(self, Xt, yt, objective, batch_size=256):
        """Per-sample test-loss gradients at the trained weights (eval mode), ``(m, P)``;
        with ``objective="mean"`` their mean, ``(1, P)``, without holding the ``(m, P)``
        matrix."""
        from ._core.functional import per_sample_grads
        from ._skorch import flat_params, module_mode

        theta = flat_params(self.net_, self.spec_).to(self._device)
        loss_fn = self._loss_fn()
        with module_mode(self.net_.module_, training=False):
            return self._test_batches(
                lambda x, y: per_sample_grads(loss_fn, theta, x, y, independent=True).detach(),
                Xt, yt, objective, batch_size)

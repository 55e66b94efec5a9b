"""The sampler machinery shared by :class:`~hydrattr.cleaning.LabelNoiseCleaner` and
:class:`~hydrattr.detection.SignClusterDetector`.

Both validate ``(X, y)``, encode the labels, split off a validation part (stratified and
seeded, or take an explicit ``validation_data``), fit a clone of the attributor on the
training part, let the subclass decide which rows to remove (``_select``), and return the
kept rows from ``fit_resample`` with ``sample_indices_`` and ``removed_mask_`` fitted, as an
imbalanced-learn sampler does (without importing imbalanced-learn).
"""
from __future__ import annotations

import numbers
import warnings

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, clone
from sklearn.model_selection import train_test_split
from sklearn.utils import _safe_indexing, check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ._skorch import fit_recording_dynamics, is_net, torch_seed


def _net_of(attributor):
    return getattr(attributor, "net", None)


class ContributionSampler(BaseEstimator):
    """Shared machinery: validation split, label encoding, fitting the attributor.

    Subclasses implement
    ``_select(X_train, y_train_enc, X_val, y_val_enc, train_rows, n_samples)``
    which sets their fitted attributes and returns the boolean removal mask over
    ``train_rows``. ``_default_hydra`` holds the extra ``HydraAttributor`` parameters a
    bare skorch net is wrapped with.
    """

    _default_hydra = {}

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.input_tags.allow_nan = False
        return tags

    # -- parameters ------------------------------------------------------------------
    def _check_params(self, n):
        """Validate the parameters (``_parameter_constraints``) and require an attributor;
        subclasses add the rules that tie several parameters together."""
        self._validate_params()
        if self.attributor is None:
            raise TypeError(
                f"{type(self).__name__}: attributor is required: pass a skorch net (or an "
                f"attributor such as HydraAttributor(net)).")

    def _make_attributor(self):
        attributor = self.attributor
        if attributor is None:
            raise TypeError(
                f"{type(self).__name__}: attributor is required: pass an attributor such as "
                f"HydraAttributor(net) (or a skorch net, which is wrapped in "
                f"HydraAttributor(net)).")
        if is_net(attributor):
            from .hydra import HydraAttributor

            return HydraAttributor(clone(attributor), random_state=self.random_state,
                                   verbose=self.verbose, **self._default_hydra)
        if not (hasattr(attributor, "fit") and hasattr(attributor, "attribute")):
            raise TypeError(
                f"attributor must be an attributor with fit(X, y) and attribute(X, y, "
                f"objective) (e.g. HydraAttributor(net)) or a skorch net, got "
                f"{type(attributor).__name__}.")
        return clone(attributor)

    def _check_validation_size(self, n):
        vs = self.validation_size
        if isinstance(vs, numbers.Integral) and not isinstance(vs, bool):
            if not 1 <= vs < n:
                raise ValueError(f"validation_size as an int must be in [1, n_samples={n}), "
                                 f"got {vs}.")
            return int(vs)
        if isinstance(vs, numbers.Real) and not isinstance(vs, bool) and 0 < vs < 1:
            n_val = int(np.ceil(float(vs) * n))
            if not 1 <= n_val < n:
                raise ValueError(f"validation_size={vs} leaves no training or no validation "
                                 f"samples out of n_samples={n}.")
            return n_val
        raise ValueError(f"validation_size must be a float in (0, 1) or a positive int, "
                         f"got {vs!r}.")

    def _warn_train_split(self, attributor):
        net = _net_of(attributor)
        if net is not None and getattr(net, "train_split", None) is not None:
            warnings.warn(
                f"{type(self).__name__}: the attributor's net has train_split="
                f"{net.train_split!r}, so it holds out part of the training rows; those rows "
                f"never enter a gradient step, get a score of exactly zero and are never "
                f"removed. Set train_split=None on the net (the cleaner already holds out its "
                f"own validation part).", UserWarning, stacklevel=3)

    # -- split -----------------------------------------------------------------------
    def _split(self, X, y_enc):
        """Indices of the training and validation rows, or the explicit validation set."""
        n = X.shape[0]
        if self.validation_data is not None:
            try:
                X_val, y_val = self.validation_data
            except (TypeError, ValueError):
                raise ValueError("validation_data must be a pair (X_val, y_val).") from None
            X_val, y_val = validate_data(self, X_val, y_val, reset=False, allow_nd=True,
                                         dtype="numeric", ensure_all_finite=True)
            if X_val.shape[1:] != X.shape[1:]:
                raise ValueError(f"validation_data: X_val must have per-sample shape "
                                 f"{X.shape[1:]}, got {X_val.shape[1:]}.")
            unknown = ~np.isin(y_val, self.classes_)
            if unknown.any():
                raise ValueError(f"validation_data: y_val holds labels not seen in y: "
                                 f"{np.unique(y_val[unknown])[:5].tolist()}.")
            y_val_enc = np.searchsorted(self.classes_, y_val)
            return np.arange(n), None, X_val, y_val_enc
        if n < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 samples to split off a "
                             f"validation part, got n_samples={n}.")
        n_val = self._check_validation_size(n)
        counts = np.bincount(y_enc)
        stratify = y_enc if counts.min() >= 2 and n_val >= len(counts) \
            and n - n_val >= len(counts) else None
        if stratify is None and len(counts) > 1:
            warnings.warn(f"{type(self).__name__}: cannot stratify the validation split "
                          f"(a class has fewer than 2 samples or validation_size is smaller "
                          f"than the number of classes); splitting at random.", UserWarning,
                          stacklevel=3)
        rs = check_random_state(self.random_state)
        train_rows, val_rows = train_test_split(np.arange(n), test_size=n_val,
                                                stratify=stratify, random_state=rs)
        train_rows, val_rows = np.sort(train_rows), np.sort(val_rows)
        return train_rows, val_rows, X[val_rows], y_enc[val_rows]

    # -- fit -------------------------------------------------------------------------
    def fit_resample(self, X, y):
        """Score the samples, decide which to remove, and return the kept rows.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Inputs (any per-sample shape the net accepts).
        y : array-like of shape (n_samples,)
            Class labels (encoded internally to ``0..n_classes-1`` for the net).

        Returns
        -------
        X_resampled : array-like of shape (n_kept, ...)
            ``X[sample_indices_]`` (pandas objects stay pandas objects; other inputs
            come back as validated numpy arrays).
        y_resampled : array-like of shape (n_kept,)
        """
        X_in, y_in = X, y
        X, y = validate_data(self, X, y, reset=True, allow_nd=True, dtype="numeric",
                             ensure_all_finite=True, ensure_min_samples=2)
        check_classification_targets(y)
        self.classes_, y_enc = np.unique(y, return_inverse=True)
        y_enc = y_enc.astype(np.int64)
        self._y_enc = y_enc
        self._check_params(X.shape[0])
        if self._uses_dynamics():
            removed = self._fit_dynamics(X, y_enc)
        else:
            removed = self._fit_contributions(X, y_enc)
        self.removed_mask_ = removed
        self.sample_indices_ = np.flatnonzero(~removed)
        self.n_removed_ = int(removed.sum())
        idx = self.sample_indices_
        # pandas objects stay pandas objects; anything else comes back as the
        # validated numpy array
        X_out = _safe_indexing(X_in, idx) if hasattr(X_in, "iloc") else X[idx]
        y_out = _safe_indexing(y_in, idx) if hasattr(y_in, "iloc") else y[idx]
        return X_out, y_out

    def _fit_contributions(self, X, y_enc):
        """Split off (or take) the validation part, fit the attributor on the training part
        and let the subclass decide (``_select``); the removal mask over all rows."""
        attributor = self._make_attributor()
        self._warn_train_split(attributor)
        if self.validation_data is None:
            warnings.warn(
                f"{type(self).__name__}: scoring contributions against a validation part cut "
                f"from the same labels: its wrong labels weaken the scores (on noisy data "
                f"they can be near random). Pass validation_data with trusted labels, or use "
                f"the default training-dynamics score.", UserWarning, stacklevel=3)
        train_rows, val_rows, X_val, y_val_enc = self._split(X, y_enc)
        attributor.fit(X[train_rows], y_enc[train_rows])
        self.attributor_ = attributor
        self.train_indices_ = train_rows
        self.validation_indices_ = (np.array([], dtype=np.int64) if val_rows is None
                                    else val_rows)
        remove_train = self._select(X[train_rows], y_enc[train_rows], X_val, y_val_enc,
                                    train_rows, X.shape[0])
        removed = np.zeros(X.shape[0], dtype=bool)
        removed[train_rows[remove_train]] = True
        return removed

    # -- training dynamics ------------------------------------------------------------
    def _dynamics_net(self):
        """The skorch net whose training run is watched (the bare net, or the net of the
        attributor given)."""
        net = self.attributor if is_net(self.attributor) else _net_of(self.attributor)
        if net is None or not is_net(net):
            raise TypeError(
                f"{type(self).__name__}: attributor must be a skorch net or an attributor "
                f"with a net (e.g. HydraAttributor(net)), got "
                f"{type(self.attributor).__name__}.")
        if getattr(net, "train_split", None) is not None:
            warnings.warn(
                f"{type(self).__name__}: the net has train_split={net.train_split!r}, so "
                f"part of the rows never enter a training step; they are unscored and kept. "
                f"Set train_split=None on the net.", UserWarning, stacklevel=4)
        return net

    def _warn_if_not_learned(self, dyn, y_enc, net):
        """Warn when the net ends the run fitting no more rows than the largest class
        holds: its margins would rank rows at random."""
        with np.errstate(invalid="ignore", divide="ignore"):
            last = dyn.margin_sum[-1] / dyn.count[-1]
        seen = np.isfinite(last)
        fitted = float(np.mean(last[seen] > 0)) if seen.any() else 0.0
        majority = float(np.bincount(y_enc).max() / len(y_enc))
        if fitted <= majority:
            warnings.warn(
                f"{type(self).__name__}: in the last epoch the net predicted the given label "
                f"of only {fitted:.0%} of the rows, no more than the largest class holds "
                f"({majority:.0%}): it has not learned the task, and its training dynamics "
                f"would rank rows at random. Train longer or raise net.lr (net.max_epochs="
                f"{net.max_epochs}, net.lr={net.lr}).", UserWarning, stacklevel=4)

    def _trusted_validation(self, X):
        """``(X_val, y_val_enc)`` from ``validation_data`` (trusted labels), or None."""
        if self.validation_data is None:
            return None
        _, _, X_val, y_val = self._split(X, self._y_enc)
        return X_val, y_val

    def _record_dynamics(self, X, y_enc, extra=None):
        """Train a clone of the net on ``(X, y_enc)`` (plus the trusted ``extra`` rows,
        never scored).

        Returns ``(net_, dynamics of the rows of X, dynamics of the trusted rows)``; the
        last is None without trusted rows, else what a clean row's margin looks like in
        this run."""
        net = self._dynamics_net()
        if extra is not None:
            X = np.concatenate([X, extra[0]])
            y_enc = np.concatenate([y_enc, extra[1]])
        n = len(y_enc) if extra is None else len(y_enc) - len(extra[1])
        if self.verbose:
            net = clone(net).set_params(verbose=self.verbose)
        net_, dyn = fit_recording_dynamics(net, X, y_enc, seed=torch_seed(self.random_state))
        self._warn_if_not_learned(dyn, y_enc, net)
        if extra is None:
            return net_, dyn, None
        return net_, dyn.take(slice(None, n)), dyn.take(slice(n, None))

    def fit(self, X, y):
        """Run :meth:`fit_resample` and return the fitted sampler.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
        y : array-like of shape (n_samples,)

        Returns
        -------
        self
        """
        self.fit_resample(X, y)
        return self

    def _decision_frame(self):
        """The fitted decision, one row per sample given to ``fit`` (the shared part of
        the subclasses' ``to_frame``): ``label``, ``part``, ``score``, ``removed``."""
        check_is_fitted(self, "removed_mask_")
        n = len(self.removed_mask_)
        part = np.full(n, "train", dtype=object)
        part[self.validation_indices_] = "validation"
        return pd.DataFrame({"label": self.classes_[self._y_enc], "part": part,
                             "score": self.scores_, "removed": self.removed_mask_},
                            index=pd.RangeIndex(n, name="row"))

    def _trained_rows(self, attributor, n_train):
        mask = getattr(attributor, "trained_mask_", None)
        if mask is None:
            return np.ones(n_train, dtype=bool)
        mask = np.asarray(mask, dtype=bool)
        if (~mask).any():
            warnings.warn(
                f"{type(self).__name__}: {int((~mask).sum())} training rows never entered a "
                f"gradient step (train_split held them out); they are treated as unscored "
                f"and kept. Set train_split=None on the attributor's net.", UserWarning,
                stacklevel=4)
        return mask

"""Removing harmful training samples: a sampler for pipelines and a meta-estimator.

* :class:`LabelNoiseCleaner` scores every training sample by its contribution to the
  loss on a validation part of the data (split off the data it is given, stratified and
  seeded, or given explicitly) and drops the least useful ones. It is an
  imbalanced-learn-style *sampler*: ``fit_resample(X, y)`` returns the kept rows, so it
  works inside ``imblearn.pipeline.Pipeline`` (imbalanced-learn is optional: nothing
  here imports it).
* :class:`CleanedClassifier` is a meta-estimator that runs any such sampler in ``fit``
  and fits a clone of a downstream classifier on the kept rows; it composes with plain
  scikit-learn ``Pipeline``, ``GridSearchCV`` (e.g. tuning ``cleaner__fraction``) and
  ``cross_val_score``.

Scores follow the package convention ``C[i] ~ loss(trained without i) - loss(trained
with all)``: positive means sample ``i`` helped (lowered) the validation loss, so the
*lowest* scores are removed.

Rows held out by the attributor's net
-------------------------------------
A skorch net with the default ``train_split`` trains on only part of the rows it is
given; the held-out rows never enter a gradient step and their contribution is exactly
zero, so a cleaner would neither keep nor drop them for a reason. Give the attributor's
net ``train_split=None`` (the cleaner already holds out its own validation part); the
cleaner warns otherwise and treats those rows as unscored (never removed).
"""
from __future__ import annotations

import numbers

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, MetaEstimatorMixin, clone
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted, validate_data

from ._sampler import _ContributionSampler

__all__ = ["LabelNoiseCleaner", "CleanedClassifier"]


def remove_lowest(scores, fraction, labels=None):
    """Boolean mask of the ``round(fraction * n)`` lowest ``scores`` (ties by position).

    With ``labels``, the quota applies within each class: the ``round(fraction * n_c)``
    lowest scores of every class ``c`` (``LabelNoiseCleaner(stratify=True)``).
    """
    removed = np.zeros(len(scores), dtype=bool)
    groups = [np.arange(len(scores))] if labels is None else \
        [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for rows in groups:
        k = int(np.floor(fraction * len(rows) + 0.5))
        removed[rows[np.argsort(scores[rows], kind="stable")[:k]]] = True
    return removed


class LabelNoiseCleaner(_ContributionSampler):
    """Drop the training samples that contribute least to a validation loss.

    The data given to :meth:`fit_resample` is split into a training part and a
    validation part (``validation_size``, stratified by label, seeded by
    ``random_state``), unless ``validation_data`` is given, in which case every row is a
    training row. A clone of ``attributor`` is trained on the training part and each
    training sample's contribution to the mean validation loss is computed (one
    ``"mean"`` column: ``score_i ~ L_val(without i) - L_val(with all)``). The samples with
    the lowest scores, those whose removal is predicted to lower the validation loss
    most, are removed: a ``fraction`` of the scored rows (the HYDRA paper removes r% at
    r% label noise) or every row scoring below ``threshold``. Validation rows are never
    scored and always kept.

    Parameters
    ----------
    attributor : attributor or skorch.NeuralNet
        E.g. ``HydraAttributor(net, storage="replay", last_epochs="final_lr", verbose=0)``;
        cloned at fit. A bare skorch net is wrapped as ``HydraAttributor(net,
        storage="replay", last_epochs="final_lr", random_state=random_state,
        verbose=verbose)``:

        * ``last_epochs="final_lr"``: the hypergradient of the final learning-rate phase
          only, which ranks wrong labels more precisely than the whole run when the
          schedule drops the rate (LeNet-5, 50,000 rows, 80% wrong labels, per-class
          precision of the removed set: 0.972 to 0.978 on MNIST, 0.950 to 0.954 on
          Fashion-MNIST; ``benchmarks/table3_noise_cleaning.py``); at a constant rate it
          is the whole run;
        * ``storage="replay"``: the cleaner needs one column (the mean validation loss)
          per round, and one replayed sweep computes it without the fast mode's
          ``n_train x n_params`` store (same scores to float32 rounding; 20,000 MNIST
          rows, LeNet-5, 8 epochs: 0.82x the time and 0.9 GiB of added memory against
          5.5 GiB with the dense store; ``benchmarks/bench_cleaner_storage.py``).

        The net must output one logit per class of ``y`` and should use
        ``train_split=None`` (see the module notes).
    validation_size : float in (0, 1) or int, default=0.2
        Fraction (or number) of the samples held out as validation set when
        ``validation_data`` is None.
    validation_data : tuple (X_val, y_val) or None, default=None
        An explicit validation set (labels from the same classes as ``y``). Scores are
        only as good as the validation labels: a split of noisy data carries the same
        noise, which weakens the "mean" scores markedly (on 8x8 digits with 20% flipped
        labels the ROC AUC for finding the flipped rows fell from 0.78 with clean to
        0.41 with equally noisy validation labels; ``objective="median"`` kept 0.74).
        Pass a small clean validation set whenever one exists.
    fraction : float in [0, 1) or None, default=None
        Fraction of the scored rows to remove (the ``round(fraction * n)`` lowest
        scores; ties broken by row order).
    threshold : float or None, default=None
        Remove every row whose score is below ``threshold``. When both ``fraction``
        and ``threshold`` are None, ``threshold=0`` is used: every sample predicted to
        *raise* the validation loss is removed.
    stratify : bool, default=False
        With ``fraction``: remove ``round(fraction * n_c)`` rows within each class ``c`` of
        ``y`` (``n_c`` its scored rows) instead of the lowest scores overall, as confident
        learning's ``prune_by_class`` does. Contributions differ in scale between classes
        (per-sample gradients of some digits are larger), so when the noise rate is about
        the same in every class this removes a more precise set: on 4,000 MNIST rows with
        80% wrong labels, HYDRA fast's precision rose from 0.89 (global) to 0.92. Not
        allowed with ``threshold``.
    n_rounds : int, default=1
        With ``fraction``: remove it in ``n_rounds`` equal steps, training a fresh clone
        of the attributor on the rows still kept before each step after the first and
        rescoring them. A model trained on cleaner data scores the remaining rows more
        reliably, at the cost of ``n_rounds`` trainings: on 4,000 MNIST rows with 80%
        wrong labels (HYDRA fast, ``stratify=True``) the precision of the removed set
        rose from 0.92 with one round to 0.95 with two. The paper uses one round.
    objective : {"mean", "median"}, default="mean"
        ``"mean"`` scores each sample by its contribution to the mean validation loss
        (one ``"mean"`` column from the attributor, as in the HYDRA paper).
        ``"median"`` asks for one column per validation point and takes each sample's
        median contribution: slower and ``(n_train, n_val)`` floats in memory, but
        robust when the validation labels are noisy too (a few badly mislabeled
        validation points with large losses dominate the mean and its gradient).
    random_state : int, RandomState instance or None, default=None
        Seeds the validation split (and the wrapped attributor when a bare net is given).
    verbose : int, default=0
        Progress bars (training, sweeps) of the attributor a bare net is wrapped in; an
        attributor you pass keeps its own ``verbose``.

    Attributes
    ----------
    attributor_ : attributor
        The fitted clone (with ``n_rounds > 1``: the first round's, trained on every
        training row).
    classes_ : ndarray
        Class labels seen in ``y``.
    scores_ : ndarray of shape (n_samples,)
        Each row's contribution to the mean validation loss (positive = helpful); NaN
        for validation rows and for rows the attributor did not score. With
        ``n_rounds > 1``: the score from the last round that scored the row (removed rows
        keep the score they were removed with).
    removed_mask_ : ndarray of bool, shape (n_samples,)
        True for removed rows.
    sample_indices_ : ndarray of int
        Indices of the kept rows (what :meth:`fit_resample` returns).
    train_indices_, validation_indices_ : ndarray of int
        Rows used for training the attributor and as validation set.
    threshold_ : float
        With ``threshold`` (or the default): the threshold used. With ``fraction``: the
        largest removed score, over all classes with ``stratify`` (``-inf`` when nothing
        was removed).
    n_removed_ : int
    n_features_in_ : int

    Examples
    --------
    >>> from hydrattr import HydraAttributor, LabelNoiseCleaner  # doctest: +SKIP
    >>> attributor = HydraAttributor(net, storage="replay", last_epochs="final_lr",
    ...                              verbose=0)  # doctest: +SKIP
    >>> cleaner = LabelNoiseCleaner(attributor, fraction=0.2, random_state=0)  # doctest: +SKIP
    >>> X_kept, y_kept = cleaner.fit_resample(X, y)  # doctest: +SKIP
    """

    _default_hydra = {"storage": "replay", "last_epochs": "final_lr"}

    def __init__(self, attributor=None, validation_size=0.2, validation_data=None,
                 fraction=None, threshold=None, stratify=False, n_rounds=1,
                 objective="mean", random_state=None, verbose=0):
        self.attributor = attributor
        self.validation_size = validation_size
        self.validation_data = validation_data
        self.fraction = fraction
        self.threshold = threshold
        self.stratify = stratify
        self.n_rounds = n_rounds
        self.objective = objective
        self.random_state = random_state
        self.verbose = verbose

    def _check_params(self, n):
        if self.fraction is not None and self.threshold is not None:
            raise ValueError("Give either fraction or threshold, not both (got fraction="
                             f"{self.fraction!r}, threshold={self.threshold!r}).")
        if self.fraction is not None:
            f = self.fraction
            if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0 <= f < 1:
                raise ValueError(f"fraction must be a float in [0, 1), got {f!r}.")
        if self.threshold is not None:
            t = self.threshold
            if isinstance(t, bool) or not isinstance(t, numbers.Real) or np.isnan(t):
                raise ValueError(f"threshold must be a float (not NaN), got {t!r}.")
        if not isinstance(self.stratify, (bool, np.bool_)):
            raise ValueError(f"stratify must be True or False, got {self.stratify!r}.")
        if self.stratify and self.threshold is not None:
            raise ValueError("stratify=True applies to fraction; it cannot be combined "
                             f"with threshold={self.threshold!r}.")
        r = self.n_rounds
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
            raise ValueError(f"n_rounds must be a positive int, got {r!r}.")
        if r > 1 and self.fraction is None:
            raise ValueError(f"n_rounds={r} needs fraction (the total to remove); it cannot "
                             f"be used with a threshold.")
        if self.objective not in ("mean", "median"):
            raise ValueError(f"objective must be 'mean' or 'median', got "
                             f"{self.objective!r}.")

    def _score(self, attributor, X_val, y_val):
        if self.objective == "mean":
            return np.asarray(attributor.attribute(X_val, y_val, objective="mean"),
                              dtype=np.float64)[:, 0]
        C = np.asarray(attributor.attribute(X_val, y_val, objective="per_sample"),
                       dtype=np.float64)
        return np.median(C, axis=1)

    def _scores_of_trained(self, attributor, n_rows, X_val, y_val):
        """The attributor's scores, NaN for rows that never entered a gradient step."""
        s = self._score(attributor, X_val, y_val)
        return np.where(self._trained_rows(attributor, n_rows), s, np.nan)

    def to_frame(self):
        """The fitted decision as a table, one row per sample given to ``fit``.

        Returns
        -------
        frame : pandas.DataFrame
            Indexed by ``row`` (the sample's position in ``X``), with columns ``label``
            (as given in ``y``), ``part`` (``"train"``, or ``"validation"`` for the rows
            held out to score against, which are never scored nor removed), ``score``
            (``scores_``; NaN where unscored) and ``removed`` (``removed_mask_``).
            ``frame.sort_values("score")`` lists the least useful rows first.
        """
        return self._decision_frame()

    def _select(self, X_train, y_train, X_val, y_val, train_rows, n_samples):
        s = self._scores_of_trained(self.attributor_, len(train_rows), X_val, y_val)
        scored = np.flatnonzero(np.isfinite(s))
        remove = np.zeros(len(train_rows), dtype=bool)
        if self.fraction is None:
            thr = 0.0 if self.threshold is None else float(self.threshold)
            remove[scored] = s[scored] < thr
            self.threshold_ = thr
        else:
            total = int(np.floor(self.fraction * len(scored) + 0.5))
            alive = scored
            for r in range(self.n_rounds):
                if r:  # retrain on the rows still kept and rescore them
                    att = self._make_attributor()
                    keep = np.flatnonzero(~remove)
                    att.fit(X_train[keep], y_train[keep])
                    s_keep = self._scores_of_trained(att, len(keep), X_val, y_val)
                    s[keep] = s_keep
                    alive = keep[np.isfinite(s_keep)]
                    del att
                target = total if r == self.n_rounds - 1 else \
                    int(np.floor(total * (r + 1) / self.n_rounds + 0.5))
                k = max(target - int(remove.sum()), 0)
                frac = self.fraction if self.n_rounds == 1 else k / max(len(alive), 1)
                mask = remove_lowest(s[alive], frac,
                                     y_train[alive] if self.stratify else None)
                remove[alive[mask]] = True
            self.threshold_ = float(s[remove].max()) if remove.any() else -np.inf
        full = np.full(n_samples, np.nan)
        full[train_rows] = s
        self.scores_ = full
        return remove


class CleanedClassifier(MetaEstimatorMixin, ClassifierMixin, BaseEstimator):
    """Clean the training data with a sampler, then fit a classifier on the kept rows.

    ``fit(X, y)`` clones ``cleaner`` (anything with ``fit_resample``, e.g.
    :class:`LabelNoiseCleaner` or :class:`~hydrattr.detection.SignClusterDetector`),
    calls ``fit_resample(X, y)`` and fits a clone of ``estimator`` on the rows it
    returns. Prediction is delegated to that estimator. Because cleaning happens inside
    ``fit``, the object is an ordinary scikit-learn classifier: it can be the last step
    of a ``Pipeline``, be cross-validated, and have ``cleaner__fraction`` or
    ``cleaner__attributor__net__lr`` tuned by ``GridSearchCV``.

    Parameters
    ----------
    cleaner : sampler
        Object with ``fit_resample(X, y)``; cloned at fit.
    estimator : classifier
        Fitted (as a clone) on the kept rows.

    Attributes
    ----------
    cleaner_ : sampler
        The fitted clone of ``cleaner``.
    estimator_ : classifier
        The fitted clone of ``estimator``.
    classes_ : ndarray
        The classes seen by ``estimator_``.
    sample_indices_ : ndarray of int
        Rows of the training data kept by the cleaner.
    n_features_in_ : int
    """

    def __init__(self, cleaner, estimator):
        self.cleaner = cleaner
        self.estimator = estimator

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False  # the cleaner's attributor needs finite inputs
        return tags

    def fit(self, X, y, **fit_params):
        """Clean ``(X, y)`` with a clone of ``cleaner``, then fit a clone of ``estimator``.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
        y : array-like of shape (n_samples,)
        **fit_params : dict
            Passed to the estimator's ``fit``. Per-sample arrays are not re-indexed, so
            do not pass any (e.g. ``sample_weight``).

        Returns
        -------
        self
        """
        if not hasattr(self.cleaner, "fit_resample"):
            raise TypeError(f"cleaner must have a fit_resample(X, y) method, got "
                            f"{type(self.cleaner).__name__}.")
        cleaner = clone(self.cleaner)
        X_kept, y_kept = cleaner.fit_resample(X, y)
        self.cleaner_ = cleaner
        self.sample_indices_ = getattr(cleaner, "sample_indices_", None)
        if hasattr(cleaner, "n_features_in_"):
            self.n_features_in_ = cleaner.n_features_in_
        if hasattr(cleaner, "feature_names_in_"):
            self.feature_names_in_ = cleaner.feature_names_in_
        self.estimator_ = clone(self.estimator).fit(X_kept, y_kept, **fit_params)
        return self

    @property
    def classes_(self):
        check_is_fitted(self, "estimator_")
        return self.estimator_.classes_

    def _check_X(self, X):
        check_is_fitted(self, "estimator_")
        validate_data(self, X, reset=False, allow_nd=True, dtype="numeric",
                      ensure_all_finite=True, skip_check_array=False)
        return X

    def predict(self, X):
        """Class predictions of the fitted estimator."""
        X = self._check_X(X)
        return self.estimator_.predict(X)

    def _estimator_has(attr):
        def check(self):
            if hasattr(self, "estimator_"):
                return hasattr(self.estimator_, attr)
            return hasattr(self.estimator, attr)
        return check

    @available_if(_estimator_has("predict_proba"))
    def predict_proba(self, X):
        """Class probabilities of the fitted estimator."""
        X = self._check_X(X)
        return self.estimator_.predict_proba(X)

    @available_if(_estimator_has("predict_log_proba"))
    def predict_log_proba(self, X):
        """Log class probabilities of the fitted estimator."""
        X = self._check_X(X)
        return self.estimator_.predict_log_proba(X)

    @available_if(_estimator_has("decision_function"))
    def decision_function(self, X):
        """Decision function of the fitted estimator."""
        X = self._check_X(X)
        return self.estimator_.decision_function(X)

    def score(self, X, y, sample_weight=None):
        """Mean accuracy of the fitted estimator on ``(X, y)`` (its own ``score``)."""
        self._check_X(X)
        return self.estimator_.score(X, y, sample_weight=sample_weight)

    del _estimator_has

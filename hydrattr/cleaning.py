"""Removing wrongly labelled training samples: a sampler for pipelines and a meta-estimator.

* :class:`LabelNoiseCleaner` scores every training sample and drops the least useful
  ones. By default the score is the sample's *training dynamics* (its margin in the real
  training forward pass of every step it entered, averaged over the run) and the number
  to drop is estimated from the run's averaged predictions; with ``score_by="contribution"``
  it is the HYDRA paper's contribution to a validation loss. It is an
  imbalanced-learn-style *sampler*: ``fit_resample(X, y)`` returns the kept rows, so it
  works inside ``imblearn.pipeline.Pipeline`` (imbalanced-learn is optional: nothing
  here imports it).
* :class:`CleanedClassifier` is a meta-estimator that runs any such sampler in ``fit``
  and fits a clone of a downstream classifier on the kept rows; it composes with plain
  scikit-learn ``Pipeline``, ``GridSearchCV`` (e.g. tuning ``cleaner__fraction``) and
  ``cross_val_score``.

The decisions themselves are plain functions in :mod:`hydrattr.label_issues`.
"""
from __future__ import annotations

import numbers
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, MetaEstimatorMixin, clone
from sklearn.utils._param_validation import Hidden, Interval, RealNotInt, StrOptions
from sklearn.utils import check_random_state
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted, validate_data

from ._sampler import ContributionSampler
from .label_issues import estimate_counts_from_dynamics, find_label_issues, remove_lowest

__all__ = ["LabelNoiseCleaner", "CleanedClassifier", "remove_lowest"]


class LabelNoiseCleaner(ContributionSampler):
    """Drop the training samples most likely to carry a wrong label.

    Two scores are available (``score_by``):

    * ``"dynamics"`` (default): a clone of the net is trained once on all the rows given
      to :meth:`fit_resample` and each row's margin ``log p(given label) - max_{k != given}
      log p(k)`` is read from the training forward pass of every step it enters (no
      extra forward pass) and averaged over the run (the "area under the margin"). A net
      learns the true class of a wrongly labelled row long before it memorises the wrong
      label, so those rows have a low average margin. Needs no trusted data. With
      ``validation_data`` (which must hold trusted labels) those rows are trained on as
      well, never scored nor removed.
    * ``"contribution"``: the HYDRA paper's cleaner. The rows are split into a training
      and a validation part (``validation_size``, stratified, seeded) unless
      ``validation_data`` is given; a clone of ``attributor`` is trained on the training
      part and each row is scored by its contribution to the mean (or median) validation
      loss (``score_i ~ L_val(without i) - L_val(with all)``). Only as good as the
      validation labels: give ``validation_data`` with trusted labels (it warns
      otherwise).

    How many rows go: ``fraction`` (the lowest scores), ``threshold`` (every score below
    it), or, when both are None, an estimate. With ``"dynamics"`` the estimate is, per
    given class, the midpoint of a low and a high count. The low count is the smaller of
    confident learning's count of wrong labels (from the predictions averaged over the
    run) and the size of the low-margin group when the class's margin trajectories are
    split in two (as :class:`SignClusterDetector` does); the high count is that group's
    rows with a negative mean margin (the detector's set). With ``validation_data`` it is
    capped by the number of the class's rows whose margin is below the 1% quantile of the
    trusted rows' margins (a clean row rarely falls there). Each class's lowest margins
    are removed; with ``"contribution"`` it is
    ``threshold=0`` (every row predicted to raise the validation loss).

    Parameters
    ----------
    attributor : skorch.NeuralNet or attributor
        The net to train (cloned; it should use ``train_split=None``, output one logit or
        probability per class and use ``CrossEntropyLoss`` or ``NLLLoss``), or an
        attributor such as ``HydraAttributor(net, storage="replay",
        last_epochs="final_lr")``. With ``score_by="dynamics"`` only its net is used. With
        ``score_by="contribution"`` a bare net is wrapped as ``HydraAttributor(net,
        storage="replay", last_epochs="final_lr", random_state=random_state,
        verbose=verbose)``.
    score_by : {"dynamics", "contribution"}, default="dynamics"
        What ranks the rows (see above).
    validation_size : float in (0, 1) or int, default=0.2
        ``score_by="contribution"`` only: the fraction (or number) of rows held out as the
        validation part when ``validation_data`` is None.
    validation_data : tuple (X_val, y_val) or None, default=None
        Rows with trusted labels (from the same classes as ``y``). They are never scored
        nor removed, and bypass any earlier step of a ``Pipeline`` (transform them
        yourself).
    fraction : float in [0, 1) or None, default=None
        Remove the ``round(fraction * n)`` lowest scores (ties broken by row order).
    threshold : float or None, default=None
        Remove every row whose score is below ``threshold``.
    stratify : bool, default=False
        With ``fraction``: remove ``round(fraction * n_c)`` rows within each class ``c``
        instead of the lowest scores overall. Not allowed with ``threshold``.
    n_rounds : int, default=1
        With ``fraction``: remove it in ``n_rounds`` equal steps, training a fresh clone on
        the rows still kept before each step after the first and rescoring them.
    aggregate : {"mean", "median"}, default="mean"
        ``score_by="contribution"`` only: how the validation points' losses make one
        score: each row's contribution to the mean validation loss (one column), or the
        median of its contributions to each validation point.
    random_state : int, RandomState instance or None, default=None
        Seeds torch before training and the validation split.
    verbose : int, default=0
        Progress output of the training (and of the attributor a bare net is wrapped in);
        an attributor you pass keeps its own ``verbose``.
    objective : deprecated
        The old name of ``aggregate`` (the attributors' ``objective`` is another thing:
        per-sample columns or their mean); still accepted with a ``FutureWarning`` in
        this release and removed in the next.

    Attributes
    ----------
    attributor_ : attributor
        ``score_by="contribution"``: the fitted clone (with ``n_rounds > 1``: the first
        round's).
    net_ : skorch.NeuralNet
        ``score_by="dynamics"``: the net trained on every row (the first round's).
    dynamics_ : TrainingDynamics
        ``score_by="dynamics"``: the first round's per-row margins and probabilities.
    classes_ : ndarray
        Class labels seen in ``y``.
    scores_ : ndarray of shape (n_samples,)
        Each row's score (higher = more useful): the mean margin, or the contribution;
        NaN for validation rows and rows that never entered a training step. With
        ``n_rounds > 1``: the score from the last round that scored the row.
    estimated_counts_ : ndarray of int
        ``score_by="dynamics"`` with neither ``fraction`` nor ``threshold``: the estimated
        number of wrong labels per class (indexed like ``classes_``), the number removed.
    removed_mask_ : ndarray of bool, shape (n_samples,)
        True for removed rows.
    sample_indices_ : ndarray of int
        Indices of the kept rows (what :meth:`fit_resample` returns).
    train_indices_, validation_indices_ : ndarray of int
        Rows scored, and rows held out as validation part (``score_by="contribution"``).
    threshold_ : float
        The largest removed score (``-inf`` when nothing was removed), or the threshold
        used.
    n_removed_ : int
    n_features_in_ : int

    Examples
    --------
    >>> from hydrattr import LabelNoiseCleaner  # doctest: +SKIP
    >>> cleaner = LabelNoiseCleaner(net, random_state=0)  # doctest: +SKIP
    >>> X_kept, y_kept = cleaner.fit_resample(X, y_noisy)  # doctest: +SKIP
    >>> cleaner.to_frame().sort_values("score").head()  # doctest: +SKIP
    """

    _default_hydra = {"storage": "replay", "last_epochs": "final_lr"}

    _parameter_constraints = {
        "attributor": "no_validation",
        "score_by": [StrOptions({"dynamics", "contribution"})],
        "validation_size": [Interval(RealNotInt, 0, 1, closed="neither"),
                            Interval(numbers.Integral, 1, None, closed="left")],
        "validation_data": [tuple, list, None],
        "fraction": [Interval(numbers.Real, 0, 1, closed="left"), None],
        "threshold": [Interval(numbers.Real, None, None, closed="both"), None],
        "stratify": ["boolean"],
        "n_rounds": [Interval(numbers.Integral, 1, None, closed="left")],
        "aggregate": [StrOptions({"mean", "median"})],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "objective": [Hidden(StrOptions({"deprecated"})), StrOptions({"mean", "median"})],
    }

    def __init__(self, attributor=None, score_by="dynamics", validation_size=0.2,
                 validation_data=None, fraction=None, threshold=None, stratify=False,
                 n_rounds=1, aggregate="mean", random_state=None, verbose=0,
                 objective="deprecated"):
        self.attributor = attributor
        self.score_by = score_by
        self.validation_size = validation_size
        self.validation_data = validation_data
        self.fraction = fraction
        self.threshold = threshold
        self.stratify = stratify
        self.n_rounds = n_rounds
        self.aggregate = aggregate
        self.random_state = random_state
        self.verbose = verbose
        self.objective = objective

    def _uses_dynamics(self):
        return self.score_by == "dynamics"

    def _check_params(self, n):
        super()._check_params(n)
        if self.fraction is not None and self.threshold is not None:
            raise ValueError("Give either fraction or threshold, not both (got fraction="
                             f"{self.fraction!r}, threshold={self.threshold!r}).")
        if self.stratify and self.threshold is not None:
            raise ValueError("stratify=True applies to fraction; it cannot be combined "
                             f"with threshold={self.threshold!r}.")
        r = self.n_rounds
        if r > 1 and self.fraction is None:
            raise ValueError(f"n_rounds={r} needs fraction (the total to remove); it cannot "
                             f"be used with a threshold or the estimated count.")
        self._aggregate = self.aggregate
        if self.objective != "deprecated":
            if self.aggregate != "mean" and self.aggregate != self.objective:
                raise ValueError(f"Pass the aggregation as aggregate only (objective is its "
                                 f"old name; got aggregate={self.aggregate!r}, "
                                 f"objective={self.objective!r}).")
            warnings.warn("LabelNoiseCleaner(objective=...) is now aggregate=... "
                          "(objective names the attributors' per-sample/mean choice); "
                          "objective will be removed in the next release.", FutureWarning,
                          stacklevel=3)
            self._aggregate = self.objective

    # -- contributions (score_by="contribution") ------------------------------------------
    def _contribution(self, attributor, X_val, y_val):
        if self._aggregate == "mean":
            return np.asarray(attributor.attribute(X_val, y_val, objective="mean"),
                              dtype=np.float64)[:, 0]
        C = np.asarray(attributor.attribute(X_val, y_val, objective="per_sample"),
                       dtype=np.float64)
        return np.median(C, axis=1)

    def _scores_of_trained(self, attributor, n_rows, X_val, y_val):
        """The attributor's scores, NaN for rows that never entered a gradient step."""
        s = self._contribution(attributor, X_val, y_val)
        return np.where(self._trained_rows(attributor, n_rows), s, np.nan)

    def _select(self, X_train, y_train, X_val, y_val, train_rows, n_samples):
        def rescore(keep):
            att = self._make_attributor()
            att.fit(X_train[keep], y_train[keep])
            return self._scores_of_trained(att, len(keep), X_val, y_val)

        s = self._scores_of_trained(self.attributor_, len(train_rows), X_val, y_val)
        remove = self._decide(s, y_train, rescore, default_threshold=0.0)
        self._set_scores(s, train_rows, n_samples)
        return remove

    # -- training dynamics (score_by="dynamics") -------------------------------------------
    def _fit_dynamics(self, X, y_enc):
        extra = self._trusted_validation(X)
        n = X.shape[0]
        net_, dyn, trusted = self._record_dynamics(X, y_enc, extra)
        self.net_, self.dynamics_ = net_, dyn
        self.train_indices_ = np.arange(n)
        self.validation_indices_ = np.array([], dtype=np.int64)

        def rescore(keep):
            _, d, _ = self._record_dynamics(X[keep], y_enc[keep], extra)
            return d.mean_margin()

        s = dyn.mean_margin()
        counts = None
        if self.fraction is None and self.threshold is None:
            counts = self._estimate_counts(dyn, y_enc, trusted)
            self.estimated_counts_ = counts
        remove = self._decide(s, y_enc, rescore, counts=counts)
        self._set_scores(s, np.arange(n), n)
        return remove

    def _estimate_counts(self, dyn, y_enc, trusted=None):
        """Per class, the estimated number of wrong labels
        (:func:`~hydrattr.label_issues.estimate_counts_from_dynamics`, seeded from
        ``random_state``; ``trusted``: the trusted rows' dynamics, or None)."""
        K = len(self.classes_)
        rs = check_random_state(self.random_state)
        seeds = {c: rs.randint(np.iinfo(np.int32).max) for c in range(K)}
        return estimate_counts_from_dynamics(
            dyn, y_enc, K, seeds,
            trusted_scores=None if trusted is None else trusted.mean_margin()).counts

    # -- shared --------------------------------------------------------------------------
    def _decide(self, s, y, rescore, counts=None, default_threshold=None):
        """The removal mask over the scored rows (``s`` is updated in place by later
        rounds)."""
        if counts is not None:
            remove = find_label_issues(s, y, counts=counts)
        elif self.fraction is None:
            thr = default_threshold if self.threshold is None else float(self.threshold)
            remove = find_label_issues(s, threshold=thr)
            self.threshold_ = thr
            return remove
        else:
            remove = np.zeros(len(s), dtype=bool)
            total = int(np.floor(self.fraction * np.isfinite(s).sum() + 0.5))
            for r in range(self.n_rounds):
                if r:  # retrain on the rows still kept and rescore them
                    keep = np.flatnonzero(~remove)
                    s[keep] = rescore(keep)
                target = total if r == self.n_rounds - 1 else \
                    int(np.floor(total * (r + 1) / self.n_rounds + 0.5))
                k = max(target - int(remove.sum()), 0)
                alive = np.flatnonzero(~remove & np.isfinite(s))
                frac = self.fraction if self.n_rounds == 1 else k / max(len(alive), 1)
                mask = remove_lowest(s[alive], frac, y[alive] if self.stratify else None)
                remove[alive[mask]] = True
        self.threshold_ = float(s[remove].max()) if remove.any() else -np.inf
        return remove

    def _set_scores(self, s, rows, n_samples):
        full = np.full(n_samples, np.nan)
        full[rows] = s
        self.scores_ = full

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

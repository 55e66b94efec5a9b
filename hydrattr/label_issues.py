"""Deciding which rows carry wrong labels: plain functions over scores and labels.

The estimators :class:`~hydrattr.cleaning.LabelNoiseCleaner` and
:class:`~hydrattr.detection.SignClusterDetector` validate their input, train, and then
call these functions; the functions take numpy arrays only (scores, labels, probabilities,
sign or margin vectors) and can be used on scores computed anywhere, the way cleanlab keeps
``filter.find_label_issues`` beside ``CleanLearning``.

Scores follow the package convention: higher is more useful, so the *lowest* scores are
the label issues. Two kinds of score are produced by hydrattr:

* training dynamics (:func:`margins`, :func:`TrainingDynamics`): each row's margin
  ``log p(given label) - max_{k != given} log p(k)`` in the training forward pass of every
  step the row entered, averaged over the run (the area under the margin of Pleiss et al.,
  2020, taken from the real batches, so it costs no extra forward pass);
* contributions (``C[i] ~ loss(trained without i) - loss(trained with all)``) from an
  attributor, as in the HYDRA paper.

Functions
---------
* :func:`find_label_issues`: one mask from scores and a rule (``fraction``,
  ``threshold``, per-class ``counts``).
* :func:`estimate_issue_counts`: how many rows of each given class are wrong, from
  probabilities (confident learning's calibrated confident joint, off-diagonal mass).
* :func:`estimate_counts_from_dynamics`: the cleaner's per-class count from one run's
  :class:`TrainingDynamics` (with its parts, for ablations);
  :func:`counts_below_trusted` caps it with rows of trusted labels.
* :func:`remove_lowest`: the ``fraction`` lowest scores, overall or per class.
* :func:`split_in_two`: per-class two-group split of feature vectors (k-means) or of
  scalar scores (a Gaussian mixture), flagging the group with the lower mean score.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

__all__ = ["TrainingDynamics", "margins", "remove_lowest", "estimate_issue_counts",
           "counts_below_trusted", "DynamicsCounts", "estimate_counts_from_dynamics",
           "remove_per_class", "find_label_issues", "split_in_two"]


def margins(log_probs, labels):
    """Margin of the given label: ``log p[y] - max_{k != y} log p[k]`` per row.

    Parameters
    ----------
    log_probs : ndarray of shape (n, n_classes)
        Log-probabilities (or logits: the margin is the same, since log-softmax subtracts
        one constant per row).
    labels : ndarray of int, shape (n,)
        Given labels in ``[0, n_classes)``.

    Returns
    -------
    margin : ndarray of shape (n,)
        Positive when the given label is the most probable class.
    """
    lp = np.asarray(log_probs, dtype=np.float64)
    y = np.asarray(labels)
    rows = np.arange(len(y))
    own = lp[rows, y]
    other = lp.copy()
    other[rows, y] = -np.inf
    return own - other.max(axis=1)


@dataclass
class TrainingDynamics:
    """What a training run says about each row, accumulated over every step it entered.

    Attributes
    ----------
    margin_sum : ndarray of shape (n_epochs, n)
        Per epoch, the sum of the row's margins over the steps it entered that epoch.
    count : ndarray of shape (n_epochs, n)
        How many steps of each epoch the row entered.
    prob_sum : ndarray of shape (n, n_classes)
        Sum over the run of the row's predicted probabilities.
    """

    margin_sum: np.ndarray
    count: np.ndarray
    prob_sum: np.ndarray

    @property
    def seen(self):
        """Rows that entered at least one training step."""
        return self.count.sum(axis=0) > 0

    def mean_margin(self):
        """The area under the margin: the mean margin over every step (NaN if unseen)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.margin_sum.sum(axis=0) / self.count.sum(axis=0)

    def epoch_margins(self):
        """``(n, n_epochs)`` mean margin per epoch (the row's margin trajectory); an epoch
        the row did not enter repeats the previous value (0 before the first)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            m = self.margin_sum / self.count
        out = np.zeros_like(m)
        prev = np.zeros(m.shape[1])
        for e in range(m.shape[0]):
            prev = np.where(np.isfinite(m[e]), m[e], prev)
            out[e] = prev
        return out.T

    def take(self, rows):
        """The dynamics of ``rows`` only (an index, mask or slice over the rows)."""
        return TrainingDynamics(self.margin_sum[:, rows], self.count[:, rows],
                                self.prob_sum[rows])

    def mean_probs(self):
        """``(n, n_classes)`` predicted probabilities averaged over the run."""
        total = self.count.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.prob_sum / total[:, None]


def remove_lowest(scores, fraction, labels=None):
    """Boolean mask of the ``round(fraction * n)`` lowest ``scores`` (ties by position).

    With ``labels``, the quota applies within each class: the ``round(fraction * n_c)``
    lowest scores of every class ``c`` (``LabelNoiseCleaner(stratify=True)``).
    """
    scores = np.asarray(scores)
    if labels is None:
        groups = [np.arange(len(scores))]
    else:
        labels = np.asarray(labels)
        groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    removed = np.zeros(len(scores), dtype=bool)
    for rows in groups:
        k = int(np.floor(fraction * len(rows) + 0.5))
        removed[rows[np.argsort(scores[rows], kind="stable")[:k]]] = True
    return removed


def remove_per_class(scores, labels, counts):
    """Boolean mask of the ``counts[c]`` lowest ``scores`` among rows labelled ``c``."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    removed = np.zeros(len(scores), dtype=bool)
    for c, k in enumerate(np.asarray(counts, dtype=np.int64)):
        rows = np.flatnonzero(labels == c)
        removed[rows[np.argsort(scores[rows], kind="stable")[:int(k)]]] = True
    return removed


def estimate_issue_counts(probs, labels, n_classes=None):
    """How many rows of each given class carry a wrong label.

    Confident learning's estimate (Northcutt et al., 2021): class ``k``'s threshold
    ``t_k`` is the mean probability of ``k`` over the rows labelled ``k``; a row counts
    towards "given ``y``, truly ``k``" when ``p_k >= t_k`` (the most probable such ``k``);
    each given class's counts are rescaled to its number of rows, and the off-diagonal
    mass of that row of the joint is the estimate.

    Parameters
    ----------
    probs : ndarray of shape (n, n_classes)
        Predicted probabilities (out-of-sample, or averaged over a training run, which
        hydrattr uses: before the net memorises a wrong label it predicts the true class).
    labels : ndarray of int, shape (n,)
        Given labels in ``[0, n_classes)``.
    n_classes : int or None
        Defaults to ``probs.shape[1]``.

    Returns
    -------
    counts : ndarray of int, shape (n_classes,)
    """
    P = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    K = P.shape[1] if n_classes is None else int(n_classes)
    n_given = np.bincount(y, minlength=K)
    thresholds = np.full(K, np.inf)
    for k in np.flatnonzero(n_given):
        thresholds[k] = P[y == k, k].mean()
    above = P >= thresholds
    confident = above.any(axis=1)
    guess = np.where(above, P, -np.inf).argmax(axis=1)
    joint = np.zeros((K, K))
    np.add.at(joint, (y[confident], guess[confident]), 1.0)
    row = joint.sum(axis=1)
    scale = np.divide(n_given, row, out=np.zeros(K), where=row > 0)
    joint *= scale[:, None]
    off = joint.sum(axis=1) - np.diag(joint)
    return np.minimum(np.floor(off + 0.5).astype(np.int64), n_given)


def counts_below_trusted(scores, labels, trusted_scores, n_classes, quantile=0.01):
    """Per class, how many rows score below nearly every row with a trusted label.

    The cut is the ``quantile`` of ``trusted_scores`` (scores of rows whose labels are
    known to be right, from the same run); a clean row falls below it with probability
    about ``quantile``, so the rows below it are mostly wrong labels.

    Parameters
    ----------
    scores : ndarray of shape (n,)
        Scores of the rows to judge (higher = more plausibly right); NaN never counts.
    labels : ndarray of int, shape (n,)
        Their given labels in ``[0, n_classes)``.
    trusted_scores : ndarray of shape (m,)
        Scores of the trusted rows (NaN ignored); at least one finite.
    n_classes : int
    quantile : float in (0, 1), default=0.01

    Returns
    -------
    counts : ndarray of int, shape (n_classes,)
    """
    t = np.asarray(trusted_scores, dtype=np.float64)
    t = t[np.isfinite(t)]
    if not len(t):
        raise ValueError("trusted_scores: expected at least one finite score.")
    if not 0.0 < float(quantile) < 1.0:
        raise ValueError(f"quantile: expected a float in (0, 1), got {quantile!r}.")
    s = np.asarray(scores, dtype=np.float64)
    below = np.isfinite(s) & (s < np.quantile(t, quantile))
    return np.bincount(np.asarray(labels, dtype=np.int64)[below], minlength=int(n_classes))


class DynamicsCounts(NamedTuple):
    """The per-class counts of :func:`estimate_counts_from_dynamics` (each an ndarray of
    int, shape (n_classes,))."""

    confident: np.ndarray  #: confident learning's count from the averaged predictions
    split: np.ndarray      #: the low group of the margin-trajectory split
    low: np.ndarray        #: ``min(confident, split)``
    high: np.ndarray       #: the low group's rows with a negative mean margin
    counts: np.ndarray     #: the midpoint of ``low`` and ``high`` (capped if trusted)


def estimate_counts_from_dynamics(dynamics, labels, n_classes, seeds, trusted_scores=None):
    """How many rows of each given class carry a wrong label, from one training run.

    The midpoint of a low and a high estimate. Low: the smaller of confident learning's
    count (:func:`estimate_issue_counts` on the predictions averaged over the run) and
    the low group when each class's margin trajectories are split in two
    (:func:`split_in_two`). High: that group's rows with a negative mean margin.
    With ``trusted_scores`` the midpoint is capped by :func:`counts_below_trusted`.

    Parameters
    ----------
    dynamics : TrainingDynamics
    labels : ndarray of int, shape (n,)
        Given labels in ``[0, n_classes)``.
    n_classes : int
    seeds : dict
        One k-means seed per class label (:func:`split_in_two`).
    trusted_scores : ndarray or None
        Mean margins of rows with trusted labels from the same run.

    Returns
    -------
    DynamicsCounts
    """
    y = np.asarray(labels, dtype=np.int64)
    s = dynamics.mean_margin()
    seen = dynamics.seen
    confident = estimate_issue_counts(dynamics.mean_probs()[seen], y[seen],
                                      n_classes=n_classes)
    flagged = split_in_two(dynamics.epoch_margins(), s, y, seeds) == 1
    split = np.bincount(y[flagged], minlength=n_classes)
    low = np.minimum(confident, split)
    high = np.bincount(y[flagged & (s < 0)], minlength=n_classes)
    counts = np.floor((low + high) / 2 + 0.5).astype(np.int64)
    if trusted_scores is not None:  # no more than score below ~all trusted rows
        counts = np.minimum(counts, counts_below_trusted(s, y, trusted_scores, n_classes))
    return DynamicsCounts(confident, split, low, high, counts)


def find_label_issues(scores, labels=None, *, fraction=None, threshold=None, counts=None,
                      stratify=False):
    """Which rows to remove, from their scores (lowest first) and one rule.

    Exactly one of ``fraction``, ``threshold`` and ``counts`` is used:

    * ``fraction``: the ``round(fraction * n)`` lowest scores (within each class of
      ``labels`` with ``stratify=True``);
    * ``threshold``: every score below it;
    * ``counts``: the ``counts[c]`` lowest scores among the rows labelled ``c`` (e.g. from
      :func:`estimate_issue_counts`).

    Non-finite scores (unscored rows) are never removed.

    Parameters
    ----------
    scores : ndarray of shape (n,)
    labels : ndarray of int, shape (n,) or None
        Needed with ``counts`` and with ``stratify=True``.
    fraction : float in [0, 1) or None
    threshold : float or None
    counts : array-like of int, shape (n_classes,) or None
    stratify : bool, default=False

    Returns
    -------
    mask : ndarray of bool, shape (n,)
    """
    scores = np.asarray(scores, dtype=np.float64)
    given = [v is not None for v in (fraction, threshold, counts)]
    if sum(given) != 1:
        raise ValueError("find_label_issues: give exactly one of fraction, threshold and "
                         f"counts (got fraction={fraction!r}, threshold={threshold!r}, "
                         f"counts={counts!r}).")
    if (counts is not None or stratify) and labels is None:
        raise ValueError("find_label_issues: labels are required with counts or "
                         "stratify=True.")
    scored = np.flatnonzero(np.isfinite(scores))
    out = np.zeros(len(scores), dtype=bool)
    if threshold is not None:
        out[scored] = scores[scored] < float(threshold)
        return out
    lab = None if labels is None else np.asarray(labels)[scored]
    if counts is not None:
        out[scored[remove_per_class(scores[scored], lab, counts)]] = True
    else:
        out[scored[remove_lowest(scores[scored], fraction, lab if stratify else None)]] = True
    return out


def split_in_two(features, scores, labels, seeds, n_init=10, method="kmeans"):
    """Split each class in two and flag the group with the lower mean score.

    Parameters
    ----------
    features : ndarray of shape (n, d)
        What the split sees: sign vectors, margin trajectories (``method="kmeans"``);
        ignored with ``method="gmm"``, which fits a two-component Gaussian mixture to the
        class's standardized ``scores``.
    scores : ndarray of shape (n,)
        Higher = more useful; decides which group is flagged. Rows with a non-finite score
        are not split (cluster -1).
    labels : ndarray of int, shape (n,)
    seeds : dict
        One k-means / mixture seed per class label.
    n_init : int, default=10
    method : {"kmeans", "gmm"}

    Returns
    -------
    clusters : ndarray of int, shape (n,)
        1 flagged, 0 kept, -1 not split.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    scored = np.isfinite(scores)
    clusters = np.full(len(scores), -1, dtype=np.int64)
    for c, seed in seeds.items():
        pos = np.flatnonzero((labels == c) & scored)
        if len(pos) < 2:
            clusters[pos] = 0
            continue
        split = _split_kmeans(features[pos], scores[pos], seed, n_init) \
            if method == "kmeans" else _split_gmm(scores[pos], seed, n_init)
        clusters[pos] = split
    return clusters


def _split_kmeans(F, s, seed, n_init):
    F = np.asarray(F, dtype=np.float32)
    if len(np.unique(F, axis=0)) < 2:  # nothing to split
        return 0
    km = KMeans(n_clusters=2, n_init=int(n_init), random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        lab = km.fit_predict(F)
    helps = np.array([s[lab == k].mean() if np.any(lab == k) else np.inf for k in (0, 1)])
    return (lab == int(np.argmin(helps))).astype(np.int64)


def _split_gmm(s, seed, n_init):
    sd = s.std()
    if not sd > 0:  # nothing to split
        return 0
    z = ((s - s.mean()) / sd).reshape(-1, 1)
    gm = GaussianMixture(n_components=2, n_init=int(n_init), random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        lab = gm.fit(z).predict(z)
    return (lab == int(np.argmin(gm.means_.ravel()))).astype(np.int64)

"""Unsupervised detection of mislabeled training samples from contribution signs.

:class:`SignClusterDetector` is the detector of the HYDRA paper (Chen et al., AAAI
2021, "Debugging Training Data", Table 4): every training sample gets a feature vector
of its contributions to ``n_reference`` randomly drawn validation points, discretized to
signs; within each class the sign vectors are split into two groups by k-means, and the
group that hurts the validation points more is called mislabeled. It is also a sampler
(``fit_resample`` drops the flagged rows), so it can replace
:class:`~hydrattr.cleaning.LabelNoiseCleaner` in an imbalanced-learn pipeline or in
:class:`~hydrattr.cleaning.CleanedClassifier`.
"""
from __future__ import annotations

import numbers

import numpy as np
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, RealNotInt, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._sampler import ContributionSampler
from .label_issues import split_in_two

__all__ = ["SignClusterDetector"]

_SIGN_STORAGE = ("int8", "packed")
_CLUSTERING = ("dynamics", "signs", "mean")


class SignClusterDetector(ContributionSampler):
    """Flag mislabeled samples by splitting each class in two.

    Within each class (by the given, possibly wrong, label) the rows are split into two
    groups and the group that is less useful is flagged. What the split sees
    (``clustering``):

    * ``"dynamics"`` (default): each row's *margin trajectory*, its mean margin ``log
      p(given label) - max_{k != given} log p(k)`` in every epoch of one training run on
      all the rows (read from the training forward passes, no extra pass), clustered by
      k-means; the rows of the group with the lower mean margin whose own mean margin is
      negative are flagged. Wrongly labelled rows stay below zero until the net
      memorises them, so the flagged set is about the size of the class's wrong labels,
      while the hard clean rows that a split of a clean class (or of a binary task) puts
      in the low group keep a positive mean margin. Needs no trusted data;
      ``validation_data`` (trusted labels) is trained on too, never flagged.
    * ``"signs"``: the detector of the HYDRA paper (Chen et al., AAAI 2021, Table 4).
      The data is split into a training and a validation part exactly as in
      :class:`~hydrattr.cleaning.LabelNoiseCleaner` with ``score_by="contribution"`` (or
      ``validation_data`` is used). A clone of ``attributor`` is trained on the training
      part; ``n_reference`` validation points are drawn at random and each training
      sample's contributions to them (``C[i, j] ~ loss_j(without i) - loss_j(with
      all)``) are reduced to signs; per class the sign vectors are clustered by k-means
      and the group whose mean contribution (``scores_``) is lower is flagged. Every class
      is split, so a clean class also has a flagged group: the method assumes noisy
      classes and trusted references.
    * ``"mean"``: as ``"signs"``, but each class is split by a two-component Gaussian
      mixture on the standardized mean contributions.

    :meth:`label_issues` re-splits a detector fitted with ``"signs"`` or ``"mean"`` the
    other way without recomputing any contribution.

    Parameters
    ----------
    attributor : skorch.NeuralNet or attributor
        The net to train (cloned; ``train_split=None``), or an attributor such as
        ``HydraAttributor(net, verbose=0)``. ``"dynamics"`` uses only the net. With
        ``"signs"``/``"mean"`` a bare net is wrapped as ``HydraAttributor(net,
        random_state=random_state, verbose=verbose)``: the whole run and the dense
        fast-mode store, which serves all ``n_reference`` columns with one matrix product.
    n_reference : int, default=1000
        ``"signs"``/``"mean"``: number of validation points whose contributions form the
        feature vector (all validation points when fewer).
    validation_size : float in (0, 1) or int, default=0.2
        ``"signs"``/``"mean"``: held-out part when ``validation_data`` is None
        (stratified, seeded).
    validation_data : tuple (X_val, y_val) or None, default=None
        An explicit validation set; then every row of ``X`` is a training row.
    n_init : int, default=10
        Restarts per class of the clustering (k-means or the Gaussian mixture).
    clustering : {"dynamics", "signs", "mean"}, default="dynamics"
        How each class is split in two (see above; measured comparisons are on the
        cleaning page of the docs).
    sign_storage : {"int8", "packed"}, default="int8"
        How ``sign_vectors_`` is kept: an int8 matrix of -1/0/+1 (one byte per entry),
        or bit-packed along the references with ``numpy.packbits`` (bit set = positive
        contribution; 8 times smaller). :meth:`sign_matrix` unpacks either.
    reference_batch_size : int or None, default=None
        Ask the attributor for this many reference columns at a time, so only an
        ``(n_train, reference_batch_size)`` float block is ever held (None: all at once).
        Each block may cost the attributor one pass over its data.
    random_state : int, RandomState instance or None, default=None
        Seeds torch before training, the validation split, the choice of references and
        the clustering.
    verbose : int, default=0
        Progress bars (training, sweeps) of the attributor a bare net is wrapped in; an
        attributor you pass keeps its own ``verbose``.

    Attributes
    ----------
    attributor_ : attributor
        ``"signs"``/``"mean"``: the fitted clone.
    net_ : skorch.NeuralNet
        ``"dynamics"``: the net trained on every row.
    dynamics_ : TrainingDynamics
        ``"dynamics"``: the per-row margins (per epoch) and probabilities.
    classes_ : ndarray
    label_issues_ : ndarray of bool, shape (n_samples,)
        True for flagged rows (never a validation row): rows of the flagged group, and
        with ``"dynamics"`` only those whose mean margin is negative.
    cluster_labels_ : ndarray of int, shape (n_samples,)
        1 = flagged group, 0 = the other group, -1 = not clustered (validation rows and
        rows without a score).
    scores_ : ndarray of shape (n_samples,)
        ``"dynamics"``: the mean margin over the run; otherwise the mean contribution to
        the references (higher = more useful; NaN for validation rows and unscored
        rows).
    sign_vectors_ : ndarray
        ``"signs"``/``"mean"`` only: int8 of shape (n_train, n_reference_) or uint8 of shape
        (n_train, ceil(n_reference_ / 8)); row ``k`` belongs to sample
        ``train_indices_[k]``.
    reference_indices_ : ndarray of int
        The references: rows of ``X`` (validation split) or of ``X_val``.
    n_reference_ : int
    train_indices_, validation_indices_ : ndarray of int
    removed_mask_ : ndarray of bool
        Same as ``label_issues_``; ``sample_indices_`` are the kept rows.
    n_removed_ : int
    n_features_in_ : int
    """

    def __init__(self, attributor=None, n_reference=1000, validation_size=0.2,
                 validation_data=None, n_init=10, clustering="dynamics", sign_storage="int8",
                 reference_batch_size=None, random_state=None, verbose=0):
        self.attributor = attributor
        self.n_reference = n_reference
        self.validation_size = validation_size
        self.validation_data = validation_data
        self.n_init = n_init
        self.clustering = clustering
        self.sign_storage = sign_storage
        self.reference_batch_size = reference_batch_size
        self.random_state = random_state
        self.verbose = verbose

    _parameter_constraints = {
        "attributor": "no_validation",
        "n_reference": [Interval(numbers.Integral, 1, None, closed="left")],
        "validation_size": [Interval(RealNotInt, 0, 1, closed="neither"),
                            Interval(numbers.Integral, 1, None, closed="left")],
        "validation_data": [tuple, list, None],
        "n_init": [Interval(numbers.Integral, 1, None, closed="left")],
        "clustering": [StrOptions(set(_CLUSTERING))],
        "sign_storage": [StrOptions(set(_SIGN_STORAGE))],
        "reference_batch_size": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def _uses_dynamics(self):
        return self.clustering == "dynamics"

    # -- signs -----------------------------------------------------------------------
    def _store(self, S):
        if self.sign_storage == "packed":
            return np.packbits(S > 0, axis=1)
        return S

    def sign_matrix(self, rows=None):
        """Dense int8 sign vectors (-1/+1; 0 for exactly-zero contributions when stored
        as int8; packed storage keeps only positive vs not).

        Parameters
        ----------
        rows : array-like of int or None
            Positions in ``train_indices_`` (None: all).

        Returns
        -------
        S : ndarray of int8, shape (n_rows, n_reference_)
        """
        check_is_fitted(self, "sign_vectors_")
        V = self.sign_vectors_ if rows is None else self.sign_vectors_[np.asarray(rows)]
        if self.sign_storage == "packed":
            bits = np.unpackbits(V, axis=1, count=self.n_reference_)
            return (2 * bits.astype(np.int8) - 1).astype(np.int8)
        return np.asarray(V, dtype=np.int8)

    def _contributions(self, X_val, y_val, n_train):
        """Stored signs and mean contributions, one reference block at a time.

        With packed storage the block size is rounded up to a multiple of 8 so that each
        block packs into whole bytes and only packed bits are kept between blocks.
        """
        m = len(X_val)
        bs = m if self.reference_batch_size is None else int(self.reference_batch_size)
        if self.sign_storage == "packed":
            bs = -(-bs // 8) * 8
        blocks, total = [], np.zeros(n_train)
        finite = np.ones(n_train, dtype=bool)
        for s in range(0, m, bs):
            C = np.asarray(self.attributor_.attribute(X_val[s:s + bs], y_val[s:s + bs],
                                                      objective="per_sample"),
                           dtype=np.float64)
            finite &= np.isfinite(C).all(axis=1)
            C = np.nan_to_num(C, nan=0.0)
            total += C.sum(axis=1)
            blocks.append(self._store(np.sign(C).astype(np.int8)))
            del C
        return np.concatenate(blocks, axis=1), total / m, finite

    # -- per-class splits: 1 = flagged, 0 = kept -----------------------------------------
    def _clusters(self, clustering):
        """Per-class split of the fitted contributions: 1 flagged, 0 kept, -1 unscored."""
        mean_c = self.scores_[self.train_indices_]
        if clustering == "signs":
            features = self.sign_matrix()
        elif clustering == "dynamics":
            features = self.dynamics_.epoch_margins()
        else:
            features = None
        return split_in_two(features, mean_c, self._y_train, self._split_seeds,
                            n_init=self.n_init,
                            method="gmm" if clustering == "mean" else "kmeans")

    def label_issues(self, clustering=None):
        """Flags of another per-class split, without recomputing the contributions.

        Attribution is the expensive part of :meth:`fit`; the split is cheap. This
        returns what ``label_issues_`` would be after a fit with
        ``set_params(clustering=clustering)`` and the same ``random_state`` (same
        references, same seeds), and changes nothing on the fitted detector.

        Parameters
        ----------
        clustering : {"signs", "mean"} or None, default=None
            None: the fitted ``clustering``. A detector fitted with ``"dynamics"`` has
            no contributions to re-split (and one fitted with ``"signs"`` or ``"mean"``
            no margin trajectories).

        Returns
        -------
        label_issues : ndarray of bool, shape (n_samples,)
        """
        check_is_fitted(self, "label_issues_")
        clustering = self.clustering if clustering is None else clustering
        if clustering not in _CLUSTERING:
            raise ValueError(f"clustering must be one of {_CLUSTERING}, got {clustering!r}.")
        if clustering == self.clustering:  # the fitted split: nothing to recompute
            return self.label_issues_.copy()
        if "dynamics" in (clustering, self.clustering):
            raise ValueError(
                f"label_issues(clustering={clustering!r}): a detector fitted with "
                f"clustering={self.clustering!r} holds no "
                f"{'margin trajectories' if clustering == 'dynamics' else 'contributions'};"
                f" fit one with set_params(clustering={clustering!r}).")
        out = np.zeros(len(self.label_issues_), dtype=bool)
        out[self.train_indices_] = self._clusters(clustering) == 1
        return out

    def to_frame(self):
        """The fitted decision as a table, one row per sample given to ``fit``.

        Returns
        -------
        frame : pandas.DataFrame
            The columns of :meth:`LabelNoiseCleaner.to_frame
            <hydrattr.cleaning.LabelNoiseCleaner.to_frame>` (``label``, ``part``,
            ``score``, ``removed``, indexed by ``row``) and ``cluster``
            (``cluster_labels_``: 1 flagged, 0 kept, -1 not clustered).
            ``frame.sort_values("score")`` lists the rows that hurt the references most
            first.
        """
        frame = self._decision_frame()
        frame["cluster"] = self.cluster_labels_
        return frame

    # -- fit -------------------------------------------------------------------------
    def _fit_dynamics(self, X, y_enc):
        n = X.shape[0]
        net_, dyn, _ = self._record_dynamics(X, y_enc, self._trusted_validation(X))
        self.net_, self.dynamics_ = net_, dyn
        self.train_indices_ = np.arange(n)
        self.validation_indices_ = np.array([], dtype=np.int64)
        self.scores_ = dyn.mean_margin()
        rs = check_random_state(self.random_state)
        self._y_train = y_enc
        self._split_seeds = {c: rs.randint(np.iinfo(np.int32).max) for c in np.unique(y_enc)}
        clusters = self._clusters("dynamics")
        self.cluster_labels_ = clusters
        # a row is flagged when it is in the low group and, on average over the run, the
        # net did not predict its given label: a clean class (or a binary task) still
        # splits in two, but its hard clean rows keep a positive mean margin
        self.label_issues_ = (clusters == 1) & (self.scores_ < 0)
        return self.label_issues_

    def _select(self, X_train, y_train, X_val, y_val, train_rows, n_samples):
        rs = check_random_state(self.random_state)
        n_val = len(X_val)
        n_ref = min(int(self.n_reference), n_val)
        ref = np.sort(rs.choice(n_val, size=n_ref, replace=False))
        self.n_reference_ = n_ref
        val_rows = self.validation_indices_
        self.reference_indices_ = val_rows[ref] if len(val_rows) else ref
        V, mean_c, finite = self._contributions(X_val[ref], y_val[ref], len(train_rows))
        self.sign_vectors_ = V
        trained = self._trained_rows(self.attributor_, len(train_rows)) & finite
        scores = np.full(n_samples, np.nan)
        scores[train_rows] = np.where(trained, mean_c, np.nan)
        self.scores_ = scores
        # one k-means / mixture seed per class, drawn whatever the clustering, so that
        # label_issues(clustering) reproduces a fit with that clustering
        self._y_train = np.asarray(y_train)
        self._split_seeds = {c: rs.randint(np.iinfo(np.int32).max)
                             for c in np.unique(y_train)}
        clusters = self._clusters(self.clustering)
        cluster_labels = np.full(n_samples, -1, dtype=np.int64)
        cluster_labels[train_rows] = clusters
        self.cluster_labels_ = cluster_labels
        self.label_issues_ = cluster_labels == 1
        return clusters == 1

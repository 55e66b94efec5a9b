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
import warnings

import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from ._sampler import _ContributionSampler

__all__ = ["SignClusterDetector"]

_SIGN_STORAGE = ("int8", "packed")
_CLUSTERING = ("signs", "mean")


class SignClusterDetector(_ContributionSampler):
    """Flag mislabeled samples by clustering the signs of their contributions.

    The data given to :meth:`fit_resample` is split into a training part and a
    validation part exactly as in :class:`~hydrattr.cleaning.LabelNoiseCleaner`
    (or ``validation_data`` is used). A clone of ``attributor`` is trained on the
    training part; ``n_reference`` validation points are drawn at random and each
    training sample's contributions to them (``C[i, j] ~ loss_j(without i) -
    loss_j(with all)``) are reduced to signs: ``+1`` helps reference ``j``, ``-1``
    hurts it. For each class (by the given, possibly wrong, label) the sign vectors
    are clustered into two groups with k-means (seeded); the group whose samples hurt
    the references more, i.e. whose mean contribution to them (``scores_``) is lower,
    is flagged. (The mean *sign* is a poorer referee: the mislabeled group is a mix of
    samples from every other true class, and its members help their given class's
    references about as often as the clean ones do, only by less.)

    With ``clustering="mean"`` each class is split instead by a two-component Gaussian
    mixture on the mean contributions; :meth:`label_issues` re-splits a fitted detector
    either way without recomputing any contribution.

    Note that every class with at least two distinct sign vectors (or scores) is split
    in two, so a clean class also has a flagged group; the method assumes noisy classes.

    Parameters
    ----------
    attributor : attributor or skorch.NeuralNet
        E.g. ``HydraAttributor(net, verbose=0)``; cloned at fit. A bare skorch net is
        wrapped as ``HydraAttributor(net, random_state=random_state,
        verbose=verbose)``: the whole run (truncating to the final learning-rate phase, which helps
        :class:`~hydrattr.cleaning.LabelNoiseCleaner`, lowers the Jaccard index here;
        ``benchmarks/table4_splits.py --windows``) and the dense fast-mode store, which
        serves all ``n_reference`` columns with one matrix product (``storage="half"``
        halves it at scale). Its net should use ``train_split=None``.
    n_reference : int, default=1000
        Number of validation points whose contributions form the feature vector (all
        validation points when fewer).
    validation_size : float in (0, 1) or int, default=0.2
        Held-out part when ``validation_data`` is None (stratified, seeded).
    validation_data : tuple (X_val, y_val) or None, default=None
        An explicit validation set; then every row of ``X`` is a training row.
    n_init : int, default=10
        Restarts per class of the clustering (k-means or the Gaussian mixture).
    clustering : {"signs", "mean"}, default="signs"
        How each class is split in two. ``"signs"`` is the paper's: k-means on the sign
        vectors. ``"mean"`` fits a two-component Gaussian mixture to the class's mean
        contributions (``scores_``, standardized within the class) and flags the
        component with the lower mean. The mean keeps the magnitudes that the signs
        drop: a reference that a sample barely moves counts as much as one it moves a
        lot in a sign vector, but hardly at all in the mean. On the paper's Table 4
        setting (MNIST, 50,000 rows, 50% wrong labels) ``"mean"`` raised the Jaccard
        index of single runs from 94.9-95.8% to 96.1-96.8%; on small runs (4,000 rows)
        neither split wins everywhere (see the results page of the docs).
    sign_storage : {"int8", "packed"}, default="int8"
        How ``sign_vectors_`` is kept: an int8 matrix of -1/0/+1 (one byte per entry),
        or bit-packed along the references with ``numpy.packbits`` (bit set = positive
        contribution; 8 times smaller). :meth:`sign_matrix` unpacks either.
    reference_batch_size : int or None, default=None
        Ask the attributor for this many reference columns at a time, so only an
        ``(n_train, reference_batch_size)`` float block is ever held (None: all at once).
        Each block may cost the attributor one pass over its data.
    random_state : int, RandomState instance or None, default=None
        Seeds the validation split, the choice of references and k-means.
    verbose : int, default=0
        Progress bars (training, sweeps) of the attributor a bare net is wrapped in; an
        attributor you pass keeps its own ``verbose``.

    Attributes
    ----------
    attributor_ : attributor
        The fitted clone.
    classes_ : ndarray
    label_issues_ : ndarray of bool, shape (n_samples,)
        True for rows in a flagged group (never a validation row).
    cluster_labels_ : ndarray of int, shape (n_samples,)
        1 = flagged group, 0 = the other group, -1 = not clustered (validation rows and
        rows without a score).
    scores_ : ndarray of shape (n_samples,)
        Mean contribution to the references (positive = helpful); NaN for validation
        rows and unscored rows.
    sign_vectors_ : ndarray
        int8 of shape (n_train, n_reference_) or uint8 of shape
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
                 validation_data=None, n_init=10, clustering="signs", sign_storage="int8",
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

    def _check_params(self, n):
        for name in ("n_reference", "n_init"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}.")
        rbs = self.reference_batch_size
        if rbs is not None and (isinstance(rbs, bool) or not isinstance(rbs, numbers.Integral)
                                or rbs < 1):
            raise ValueError(f"reference_batch_size must be None or a positive int, got {rbs!r}.")
        if self.clustering not in _CLUSTERING:
            raise ValueError(f"clustering must be one of {_CLUSTERING}, got "
                             f"{self.clustering!r}.")
        if self.sign_storage not in _SIGN_STORAGE:
            raise ValueError(f"sign_storage must be one of {_SIGN_STORAGE}, got "
                             f"{self.sign_storage!r}.")

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
    def _split_signs(self, pos, s_c, seed):
        """k-means on the class's sign vectors; the group with the lower mean
        contribution is flagged."""
        S = self.sign_matrix(pos).astype(np.float32)
        if len(np.unique(S, axis=0)) < 2:  # nothing to split
            return 0
        km = KMeans(n_clusters=2, n_init=int(self.n_init), random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            lab = km.fit_predict(S)
        # the group that hurts the references more: lower mean contribution
        helps = np.array([s_c[lab == k].mean() if np.any(lab == k) else np.inf
                          for k in (0, 1)])
        return (lab == int(np.argmin(helps))).astype(np.int64)

    def _split_mean(self, pos, s_c, seed):
        """Two-component Gaussian mixture on the class's standardized mean
        contributions; the component with the lower mean is flagged."""
        sd = s_c.std()
        if not sd > 0:  # nothing to split
            return 0
        z = ((s_c - s_c.mean()) / sd).reshape(-1, 1)
        gm = GaussianMixture(n_components=2, n_init=int(self.n_init), random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            lab = gm.fit(z).predict(z)
        return (lab == int(np.argmin(gm.means_.ravel()))).astype(np.int64)

    def _clusters(self, clustering):
        """Per-class split of the fitted contributions: 1 flagged, 0 kept, -1 unscored."""
        split = self._split_signs if clustering == "signs" else self._split_mean
        mean_c = self.scores_[self.train_indices_]
        scored = np.isfinite(mean_c)
        clusters = np.full(len(mean_c), -1, dtype=np.int64)
        for c, seed in self._split_seeds.items():
            pos = np.flatnonzero((self._y_train == c) & scored)
            clusters[pos] = split(pos, mean_c[pos], seed) if len(pos) >= 2 else 0
        return clusters

    def label_issues(self, clustering=None):
        """Flags of another per-class split, without recomputing the contributions.

        Attribution is the expensive part of :meth:`fit`; the split is cheap. This
        returns what ``label_issues_`` would be after a fit with
        ``set_params(clustering=clustering)`` and the same ``random_state`` (same
        references, same seeds), and changes nothing on the fitted detector.

        Parameters
        ----------
        clustering : {"signs", "mean"} or None, default=None
            None: the fitted ``clustering``.

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

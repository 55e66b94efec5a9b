"""Metrics comparing attribution matrices and evaluating their use.

Conventions
-----------
An attribution matrix ``C`` has shape ``(n_train, n_test)``: rows are training samples,
columns test points, and

    ``C[i, j] = loss_j(model trained without i) - loss_j(model trained on all)``,

so a *positive* value means training sample ``i`` is *helpful* for test point ``j``
(removing it raises the test loss). Rows that are entirely or partly NaN (e.g.
leave-one-out computed for only some training samples) are ignored entry-wise by
every function below; a 1-d array is treated as a single column.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

__all__ = [
    "loo_correlation",
    "sign_agreement",
    "sign_error_rate",
    "approximation_error",
    "linear_datamodeling_score",
    "mislabel_detection_auc",
    "precision_at_k",
    "jaccard_index",
]


def _as_matrix(C, name):
    C = np.asarray(C, dtype=np.float64)
    if C.ndim == 1:
        C = C[:, None]
    if C.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array of shape (n_train, n_test) or 1-d, "
                         f"got shape {C.shape}")
    return C


def _pair(A, B, name_a, name_b):
    A, B = _as_matrix(A, name_a), _as_matrix(B, name_b)
    if A.shape != B.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape (n_train, n_test), "
                         f"got {A.shape} and {B.shape}")
    return A, B


def _pearson(a, b):
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt(np.dot(a, a) * np.dot(b, b))
    if denom == 0:
        return np.nan
    return float(np.clip(np.dot(a, b) / denom, -1.0, 1.0))


def _column_correlations(A, B, method, valid):
    """Correlation of A[:, j] and B[:, j] over ``valid[:, j]`` rows; nan when undefined."""
    out = np.full(A.shape[1], np.nan)
    degenerate = []
    for j in range(A.shape[1]):
        m = valid[:, j]
        a, b = A[m, j], B[m, j]
        if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
            degenerate.append(j)
            continue
        if method == "spearman":
            a, b = rankdata(a), rankdata(b)
        out[j] = _pearson(a, b)
    if degenerate:
        shown = degenerate[:10]
        warnings.warn(f"correlation undefined (constant or fewer than 2 non-NaN entries) for "
                      f"{len(degenerate)} column(s), e.g. {shown}; returning nan for them",
                      RuntimeWarning, stacklevel=3)
    return out


def _nanmean(values):
    if np.all(np.isnan(values)):
        return np.nan
    return float(np.nanmean(values))


def loo_correlation(C_pred, C_true, method="pearson", average=True):
    """Per-test-point correlation between predicted and reference attributions.

    For each column ``j`` the Pearson or Spearman correlation between
    ``C_pred[:, j]`` and ``C_true[:, j]`` is computed over the rows where both are
    finite (not NaN).

    Parameters
    ----------
    C_pred, C_true : array-like of shape (n_train, n_test) or (n_train,)
    method : {"pearson", "spearman"}
        Spearman = Pearson correlation of the ranks (average ranks for ties).
    average : bool, default=True
        Return the mean over columns (ignoring nan columns) instead of the per-column
        array.

    Returns
    -------
    corr : float or ndarray of shape (n_test,)
        A column that is constant (or has fewer than 2 valid rows) gives nan, with a
        ``RuntimeWarning``.
    """
    if method not in ("pearson", "spearman"):
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}")
    A, B = _pair(C_pred, C_true, "C_pred", "C_true")
    corr = _column_correlations(A, B, method, ~(np.isnan(A) | np.isnan(B)))
    return _nanmean(corr) if average else corr


def sign_agreement(C_pred, C_true):
    """Fraction of entries where ``np.sign(C_pred) == np.sign(C_true)``.

    Entries that are NaN in either matrix are ignored. Zero has its own sign (0), so
    a 0 against a positive value counts as a disagreement.

    Parameters
    ----------
    C_pred, C_true : array-like of shape (n_train, n_test) or (n_train,)

    Returns
    -------
    agreement : float in [0, 1]; nan (with a warning) if no entry is valid.
    """
    A, B = _pair(C_pred, C_true, "C_pred", "C_true")
    valid = ~(np.isnan(A) | np.isnan(B))
    if not valid.any():
        warnings.warn("sign_agreement: no entry is non-NaN in both C_pred and C_true",
                      RuntimeWarning, stacklevel=2)
        return np.nan
    return float(np.mean(np.sign(A[valid]) == np.sign(B[valid])))


def sign_error_rate(C_pred, C_true):
    """``1 - sign_agreement(C_pred, C_true)``: the HYDRA paper's sign error rate.

    Chen et al. (AAAI 2021), "Hessian-free approximation" experiments (Figure 4): the
    fraction of contributions whose sign is flipped relative to the reference.
    """
    return 1.0 - sign_agreement(C_pred, C_true)


def approximation_error(C_pred, C_ref):
    """Relative Frobenius error ``||C_pred - C_ref||_F / ||C_ref||_F``.

    Entries that are NaN in either matrix are left out of both norms.

    Parameters
    ----------
    C_pred, C_ref : array-like of shape (n_train, n_test) or (n_train,)

    Returns
    -------
    error : float >= 0

    Raises
    ------
    ValueError
        If ``C_ref`` is zero on all valid entries (relative error undefined).
    """
    A, B = _pair(C_pred, C_ref, "C_pred", "C_ref")
    valid = ~(np.isnan(A) | np.isnan(B))
    ref = np.linalg.norm(B[valid])
    if ref == 0:
        raise ValueError("C_ref must have a non-zero entry where C_pred and C_ref are both "
                         "non-NaN; the relative error is undefined")
    return float(np.linalg.norm(A[valid] - B[valid]) / ref)


def linear_datamodeling_score(C, subset_masks, subset_outputs, output="loss", average=True):
    """Linear datamodeling score (LDS) of an attribution matrix.

    For a training subset ``S`` the additive (linear datamodel) prediction of test
    point ``j``'s loss, up to a constant, is

        ``pred_loss(S, j) = - sum_{i in S} C[i, j]``,

    because ``C[i, j] > 0`` means sample ``i`` lowers test loss ``j`` (see the module
    docstring). The LDS of column ``j`` is the Spearman correlation, across subsets,
    between ``pred_loss(S, j)`` and the loss actually measured after retraining on
    ``S``, ``subset_outputs[s, j]`` (Park et al., 2023, TRAK; dattri). A perfect
    attribution gives +1.

    Parameters
    ----------
    C : array-like of shape (n_train, n_test)
        NaN entries are treated as 0 (the sample is left out of the sum).
    subset_masks : array-like of bool, shape (n_subsets, n_train)
        ``subset_masks[s, i]`` is True if training sample ``i`` is in subset ``s``.
    subset_outputs : array-like of shape (n_subsets, n_test)
        Measured output of the model retrained on each subset.
    output : {"loss", "margin"}, default="loss"
        ``"loss"``: ``subset_outputs`` are losses (lower is better), compared with
        ``pred_loss``. ``"margin"``: they are margins / log-odds / accuracies (higher is
        better, TRAK's convention) and are compared with ``-pred_loss``.
    average : bool, default=True
        Mean over test columns (ignoring nan columns) instead of the per-column array.

    Returns
    -------
    lds : float or ndarray of shape (n_test,)
    """
    if output not in ("loss", "margin"):
        raise ValueError(f"output must be 'loss' or 'margin', got {output!r}")
    C = _as_matrix(C, "C")
    masks = np.asarray(subset_masks)
    if masks.ndim != 2 or masks.shape[1] != C.shape[0]:
        raise ValueError(f"subset_masks must have shape (n_subsets, n_train={C.shape[0]}), "
                         f"got {masks.shape}")
    if masks.dtype != bool:
        if not np.all(np.isin(masks, (0, 1))):
            raise ValueError("subset_masks must be boolean (or 0/1)")
        masks = masks.astype(bool)
    Y = _as_matrix(subset_outputs, "subset_outputs")
    if Y.shape != (masks.shape[0], C.shape[1]):
        raise ValueError(f"subset_outputs must have shape (n_subsets={masks.shape[0]}, "
                         f"n_test={C.shape[1]}), got {Y.shape}")
    pred_loss = -(masks.astype(np.float64) @ np.nan_to_num(C, nan=0.0))
    target = Y if output == "loss" else -Y
    lds = _column_correlations(pred_loss, target, "spearman", ~np.isnan(target))
    return _nanmean(lds) if average else lds


def _scores_and_mask(scores, flipped_mask):
    s = np.asarray(scores, dtype=np.float64)
    f = np.asarray(flipped_mask)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-d (one score per training sample), got shape {s.shape}")
    if f.shape != s.shape:
        raise ValueError(f"flipped_mask must have the same shape as scores {s.shape}, got {f.shape}")
    if f.dtype != bool:
        if not np.all(np.isin(f, (0, 1))):
            raise ValueError("flipped_mask must be boolean (or 0/1)")
        f = f.astype(bool)
    valid = ~np.isnan(s)
    return s[valid], f[valid]


def mislabel_detection_auc(scores, flipped_mask):
    """ROC AUC for detecting mislabeled samples, where a LOW score means suspect.

    Parameters
    ----------
    scores : array-like of shape (n_train,)
        E.g. a training sample's total contribution ``C.sum(axis=1)``; NaN ignored.
    flipped_mask : array-like of bool, shape (n_train,)
        True for samples whose label was corrupted.

    Returns
    -------
    auc : float
        ``sklearn.metrics.roc_auc_score(flipped_mask, -scores)``; 0.5 is chance.
    """
    s, f = _scores_and_mask(scores, flipped_mask)
    if f.all() or not f.any():
        raise ValueError("flipped_mask must contain both flipped and clean samples "
                         "(among the non-NaN scores) for the AUC to be defined")
    return float(roc_auc_score(f, -s))


def precision_at_k(scores, flipped_mask, k):
    """Fraction of flipped samples among the ``k`` lowest scores.

    Ties are broken by position (stable sort); NaN scores are ignored.

    Parameters
    ----------
    scores : array-like of shape (n_train,)
    flipped_mask : array-like of bool, shape (n_train,)
    k : int, 1 <= k <= number of non-NaN scores

    Returns
    -------
    precision : float in [0, 1]
    """
    s, f = _scores_and_mask(scores, flipped_mask)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= s.size:
        raise ValueError(f"k must be an integer in [1, {s.size}] (number of non-NaN scores), "
                         f"got {k!r}")
    lowest = np.argsort(s, kind="stable")[:k]
    return float(f[lowest].mean())


def _as_set(a, name):
    arr = np.asarray(a)
    if arr.dtype == bool:
        return None, arr
    if arr.ndim > 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be a boolean mask or a 1-d collection of integer indices, "
                         f"got dtype {arr.dtype} and shape {arr.shape}")
    return set(arr.ravel().tolist()), None


def jaccard_index(a, b, zero_division=1.0):
    """Jaccard index ``|A & B| / |A | B|`` of two boolean masks or two index sets.

    Parameters
    ----------
    a, b : array-like
        Either two boolean masks of the same shape, or two collections of integer
        indices (duplicates are ignored). Mixing the two kinds is an error.
    zero_division : float, default=1.0
        Value returned when both are empty (two empty sets are identical).

    Returns
    -------
    jaccard : float in [0, 1]
    """
    set_a, mask_a = _as_set(a, "a")
    set_b, mask_b = _as_set(b, "b")
    if (mask_a is None) != (mask_b is None):
        raise ValueError("a and b must both be boolean masks or both be index collections")
    if mask_a is not None:
        if mask_a.shape != mask_b.shape:
            raise ValueError(f"boolean masks a and b must have the same shape, got "
                             f"{mask_a.shape} and {mask_b.shape}")
        inter, union = np.sum(mask_a & mask_b), np.sum(mask_a | mask_b)
    else:
        inter, union = len(set_a & set_b), len(set_a | set_b)
    if union == 0:
        return float(zero_division)
    return float(inter / union)

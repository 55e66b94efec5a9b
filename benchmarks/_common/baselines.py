"""The cleanlab baseline: confident learning on k-fold out-of-fold probabilities of the
same network."""
from __future__ import annotations

import numpy as np

from .nets import fit_net


def oof_probs(net, X, y, seed, n_folds=5, n_classes=10):
    """Out-of-fold class probabilities of ``net`` (stratified ``n_folds``-fold, seeded;
    fold ``k`` trained with seed ``seed + 1 + k``): what cleanlab's confident learning
    scores the rows with."""
    from sklearn.model_selection import StratifiedKFold

    probs = np.zeros((len(y), n_classes))
    for k, (tr, te) in enumerate(StratifiedKFold(n_folds, shuffle=True,
                                                 random_state=seed).split(X, y)):
        probs[te] = fit_net(net, X[tr], y[tr], seed + 1 + k).predict_proba(X[te])
    return probs


def cleanlab_select(y, probs, fraction):
    """Confident learning's removed set from out-of-fold ``probs``: ``prune_by_class``
    with each given class's share of ``fraction``, filled up to ``fraction`` of all rows
    by the lowest self-confidence (cleanlab leaves out rows its model predicts as given).

    Returns ``(removed, info)``: the boolean mask and how many rows cleanlab found itself
    (with the quota, and with its default settings).
    """
    from cleanlab.filter import find_label_issues

    counts = np.bincount(y, minlength=10)
    per_class = [int(np.floor(fraction * c + 0.5)) for c in counts]
    ranked = find_label_issues(y, probs, filter_by="prune_by_class",
                               num_to_remove_per_class=per_class,
                               return_indices_ranked_by="self_confidence")
    k = int(np.floor(fraction * len(y) + 0.5))
    default_found = int(find_label_issues(y, probs).sum())  # CL's own estimate
    chosen = list(ranked[:k])
    if len(chosen) < k:  # fill up with the lowest self-confidence among the rest
        selfconf = probs[np.arange(len(y)), y]
        taken = set(chosen)
        rest = [i for i in np.argsort(selfconf, kind="stable") if i not in taken]
        chosen += rest[:k - len(chosen)]
    removed = np.zeros(len(y), dtype=bool)
    removed[np.asarray(chosen, dtype=np.int64)] = True
    return removed, {"cleanlab_found_prune_by_class": int(len(ranked)),
                     "cleanlab_found_default": default_found}


def cleanlab_removed(net, X, y, fraction, seed, n_folds=5):
    """:func:`cleanlab_select` on :func:`oof_probs` of ``net``: the cleanlab row of the
    cleaning benchmarks, ``(removed, info)``."""
    return cleanlab_select(y, oof_probs(net, X, y, seed, n_folds), fraction)

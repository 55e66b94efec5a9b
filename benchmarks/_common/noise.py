"""Label noise: the noisy setting every cleaning/detection benchmark starts from, and
how a removed set is scored against the flipped rows."""
from __future__ import annotations

import numpy as np

from .data import load_split
from .nets import cleaning_net


def noisy_setting(args, dataset, rate):
    """The data, noise and net every cleaning/detection benchmark starts from.

    Loads ``args.n_train``/``args.n_valid`` rows of ``dataset`` (seeded by ``args.seed``,
    from ``args.data_dir`` or ``$HYDRATTR_DATA``), flips ``rate`` of the training labels to
    a uniformly drawn wrong class, and builds the paper's LeNet-5
    (:func:`~_common.nets.cleaning_net` with ``args.epochs``, ``args.lr``,
    ``args.milestone``; clean validation loss logged). Returns ``(d, y, flipped, net)``:
    the split, the noisy labels and the mask of flipped rows.
    """
    from hydrattr.datasets import make_label_noise

    d = load_split(dataset, args.data_dir, args.seed, n_train=args.n_train,
                   n_valid=args.n_valid)
    y, flipped = make_label_noise(d.y_train, rate, n_classes=10, random_state=args.seed)
    net = cleaning_net(dataset, args.epochs, d.X_valid, d.y_valid, lr=args.lr,
                       milestone=args.milestone)
    return d, y, flipped, net


def retrain_seeds(args):
    """Seeds of the retrainings behind each row's test accuracy: ``--seed`` first (the
    single retraining of earlier runs), then ``--seed + 1000 j`` for ``j`` up to
    ``--retrain-seeds``."""
    return [args.seed + 1000 * j for j in range(args.retrain_seeds)]


def precision_recall(removed, flipped):
    """``(precision, recall)`` of the boolean mask ``removed`` against ``flipped`` (0 where
    a set is empty)."""
    tp = int((removed & flipped).sum())
    return (tp / max(int(removed.sum()), 1), tp / max(int(flipped.sum()), 1))


def rank(v):
    """0-based ranks of ``v`` (ties by position)."""
    return np.argsort(np.argsort(v, kind="stable"), kind="stable")


def hybrid_scores(scores, probs, y):
    """The hybrid ranking of ``oof_cleaning`` and ``table3_tuned``: the rank of each row's
    contribution ``scores`` plus the rank of its out-of-fold probability of the given
    label ``y``; the lowest are removed."""
    return rank(scores) + rank(probs[np.arange(len(y)), y])

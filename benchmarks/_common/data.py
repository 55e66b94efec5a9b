"""Data: the folder of the (Fashion-)MNIST files, the splits the benchmarks train on,
and the command-line options every cleaning/detection benchmark shares."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .results import BENCH

DATA_ENV = "HYDRATTR_DATA"
WORK = BENCH / "_work"  # memmapped trajectories and stores, cached scores (git-ignored)


def resolve_data_dir(path=None):
    """The data folder: ``path`` (``--data-dir``), else ``$HYDRATTR_DATA``.

    Stops with a message saying what to set when neither is given or the folder does not
    exist, instead of failing later inside a loader.
    """
    path = path or os.environ.get(DATA_ENV)
    if not path:
        raise SystemExit(f"no data folder: set {DATA_ENV} or pass --data-dir (a folder "
                         "holding mnist/ and fashion-mnist/ with the IDX .gz files)")
    if not Path(path).is_dir():
        raise SystemExit(f"data folder {path} does not exist (from --data-dir or "
                         f"{DATA_ENV})")
    return str(path)


def load_split(dataset, data_dir=None, seed=0, n_train=50000, n_valid=10000):
    """:func:`hydrattr.datasets.load_mnist_split` from :func:`resolve_data_dir`'s folder: the
    HYDRA paper's train / validation / test split of ``dataset`` (``"mnist"`` or
    ``"fashion-mnist"``), the permutation seeded by ``seed``."""
    from hydrattr.datasets import load_mnist_split

    return load_mnist_split(dataset, data_dir=resolve_data_dir(data_dir),
                            random_state=seed, n_train=n_train, n_valid=n_valid)


def peers_data(n_train, n_test, seed=0, data_dir=None):
    """The peer comparison's task (``bench_peers``, ``bench_linearity``): ``n_train`` MNIST
    training rows flattened to 784 features, ``n_test`` test rows drawn at random, and a
    copy of the labels with 10% flipped (the mislabel-detection experiment)."""
    from hydrattr.datasets import make_label_noise

    split = load_split("mnist", data_dir, seed, n_train=n_train, n_valid=0)
    te = np.random.RandomState(seed + 1).choice(len(split.X_test), size=n_test,
                                                replace=False)
    X = split.X_train.reshape(len(split.X_train), -1).astype(np.float32)
    Xt = split.X_test[te].reshape(n_test, -1).astype(np.float32)
    y, yt = split.y_train.astype(np.int64), split.y_test[te].astype(np.int64)
    y_noisy, flipped = make_label_noise(y, 0.1, n_classes=10, random_state=seed + 2)
    return dict(X=X, y=y, Xt=Xt, yt=yt, y_noisy=y_noisy, flipped=flipped,
                train_index=split.train_index, test_index=te)


def add_data_arg(parser):
    """``--data-dir`` (default: ``$HYDRATTR_DATA``, resolved by :func:`resolve_data_dir`)."""
    parser.add_argument("--data-dir", default=None,
                        help=f"folder with mnist/ and fashion-mnist/ (default: ${DATA_ENV})")


def add_run_args(parser, work=True):
    """The run options the cleaning/detection benchmarks share: ``--seed``, ``--threads``,
    ``--data-dir`` (:func:`add_data_arg`), ``--tag`` and, with ``work=True``,
    ``--memmap`` and ``--work-dir`` (where memmapped trajectories and stores go)."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    if work:
        parser.add_argument("--memmap", action="store_true",
                            help="trajectory on disk (work dir)")
    add_data_arg(parser)
    if work:
        parser.add_argument("--work-dir", default=str(WORK))
    parser.add_argument("--tag", default=None, help="suffix of the result files")


def parse_settings(parser, values):
    """``dataset:rate`` strings (``--settings``) as ``(dataset, float(rate))`` pairs; any
    other dataset or a rate outside (0, 1) is a ``parser.error`` naming the value."""
    settings = []
    for s in values:
        ds, _, r = s.partition(":")
        try:
            rate = float(r)
        except ValueError:
            rate = float("nan")
        if ds not in ("mnist", "fashion-mnist") or not 0 < rate < 1:
            parser.error(f"--settings: expected dataset:rate with dataset mnist or "
                         f"fashion-mnist and 0 < rate < 1, got {s!r}")
        settings.append((ds, rate))
    return settings

"""CIFAR-10 from the files a user already has (torchvision's ``CIFAR10(root, download=False)``).

The "python version" distribution, as torchvision unpacks it::

    root/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta

Each batch file is a pickle of a dict with ``data`` (``uint8``, ``(n, 3072)``, the
channels of a 32x32 image one after the other) and ``labels`` (list of int); the meta
file holds ``label_names``. Nothing is downloaded. Re-exported by
:mod:`hydrattr.datasets`.

Security: these files are pickles, and unpickling an arbitrary file can run arbitrary
code. They are read with a restricted unpickler that builds only plain containers and
numpy arrays (all a CIFAR file holds) and refuses anything else with a ``ValueError``;
still, only read CIFAR files from a source you trust (the official archive).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
from sklearn.utils import Bunch, check_random_state

__all__ = ["CIFAR10_FOLDER", "CIFAR10_FILES", "read_cifar_batch", "load_cifar10"]

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
                 "meta": "batches.meta"}


# what CIFAR's pickles (Python 2 cPickle of dicts of numpy arrays, lists, strings) need
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a CIFAR file holds only dicts, lists, "
            f"strings and numpy arrays")


def _load(path):
    """Unpickle a CIFAR file with :class:`_CifarUnpickler` (no arbitrary code)."""
    with open(path, "rb") as f:
        try:
            return _CifarUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as err:
            raise ValueError(f"{path}: not a CIFAR file ({err}).") from err


def read_cifar_batch(path):
    """Read one CIFAR batch file: ``(X uint8 (n, 3, 32, 32), y int64 (n,))``.

    The file is a pickle: it is read with a restricted unpickler that only builds
    containers and numpy arrays (``ValueError`` for anything else), but read only files
    from a source you trust.
    """
    entry = _load(path)
    if not isinstance(entry, dict) or "data" not in entry:
        raise ValueError(f"{path}: not a CIFAR batch file (expected a pickled dict with "
                         f"'data' and 'labels').")
    labels = entry.get("labels", entry.get("fine_labels"))
    if labels is None:
        raise ValueError(f"{path}: no 'labels' in the batch file.")
    X = np.asarray(entry["data"], dtype=np.uint8)
    if X.ndim != 2 or X.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must have shape (n, 3072), got {X.shape}.")
    y = np.asarray(labels, dtype=np.int64)
    if len(y) != len(X):
        raise ValueError(f"{path}: {len(X)} images but {len(y)} labels.")
    return X.reshape(-1, 3, 32, 32), y


def _resolve_root(root):
    from .datasets import DATA_ENV_VAR

    source = "root"
    if root is None:
        root = os.environ.get(DATA_ENV_VAR) or None
        source = f"${DATA_ENV_VAR}"
    if root is None:
        raise FileNotFoundError(
            f"No CIFAR-10 directory: pass root=... (the folder given to torchvision's "
            f"CIFAR10(root)) or set {DATA_ENV_VAR}. Nothing is downloaded.")
    base = Path(root).expanduser()
    need = CIFAR10_FILES["train"] + CIFAR10_FILES["test"]
    candidates = [base / CIFAR10_FOLDER, base, base / "cifar10" / CIFAR10_FOLDER]
    for cand in candidates:
        if all((cand / f).is_file() for f in need):
            return cand
    raise FileNotFoundError(
        f"Could not find the CIFAR-10 python batches ({', '.join(need)}) in "
        f"{', '.join(str(c) for c in candidates)} (directory from {source}). Expected "
        f"torchvision's layout root/{CIFAR10_FOLDER}/. Nothing is downloaded.")


def load_cifar10(root=None, n_train=40000, n_valid=10000, random_state=0, dtype=np.float32):
    """CIFAR-10 split as in the HYDRA paper: 40,000 train / 10,000 validation / 10,000 test.

    A seeded permutation of the official 50,000 training images gives ``n_train``
    training and the next ``n_valid`` validation images; the official test batch is the
    test set. The files are pickles, read with a restricted unpickler (containers and
    numpy arrays only); still, load only files from a source you trust.

    Parameters
    ----------
    root : str or path-like, optional
        The directory given to ``torchvision.datasets.CIFAR10(root)`` (holding
        ``cifar-10-batches-py/``) or that folder itself. Defaults to ``$HYDRATTR_DATA``.
    n_train, n_valid : int
        ``n_train >= 1``, ``n_valid >= 0``, ``n_train + n_valid <=`` the training images.
    random_state : int, RandomState instance or None, default=0
    dtype : numpy dtype, default=float32
        Images are scaled to [0, 1] in this dtype (``None`` keeps ``uint8``).

    Returns
    -------
    split : sklearn.utils.Bunch
        ``X_train, y_train, X_valid, y_valid, X_test, y_test`` (X of shape
        ``(n, 3, 32, 32)``, y int64), ``train_index``, ``valid_index``, ``classes`` (the
        label names) and ``name="cifar10"``.
    """
    folder = _resolve_root(root)
    parts = [read_cifar_batch(folder / f) for f in CIFAR10_FILES["train"]]
    X = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    X_test, y_test = read_cifar_batch(folder / CIFAR10_FILES["test"][0])
    classes = None
    meta = folder / CIFAR10_FILES["meta"]
    if meta.is_file():
        classes = list(_load(meta).get("label_names", [])) or None
    for name, v, lo in (("n_train", n_train, 1), ("n_valid", n_valid, 0)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not lo <= v <= len(X):
            raise ValueError(f"{name} must be an int in [{lo}, {len(X)}], got {v!r}")
    if n_train + n_valid > len(X):
        raise ValueError(f"n_train + n_valid must be <= {len(X)} (the training images), got "
                         f"{n_train} + {n_valid} = {n_train + n_valid}")
    perm = check_random_state(random_state).permutation(len(X))
    tr, va = perm[:n_train], perm[n_train:n_train + n_valid]

    def scale(a):
        if dtype is None:
            return a
        dt = np.dtype(dtype)
        return a.astype(dt) / dt.type(255)

    return Bunch(X_train=scale(X[tr]), y_train=y[tr], X_valid=scale(X[va]), y_valid=y[va],
                 X_test=scale(X_test), y_test=y_test, train_index=tr, valid_index=va,
                 classes=classes, name="cifar10")

"""CIFAR-10 from the files a user already has (torchvision's ``CIFAR10(root, download=False)``).

The "python version" distribution, as torchvision unpacks it::

    root/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta

Each batch file is a pickle of a dict with ``data`` (``uint8``, ``(n, 3072)``, the
channels of a 32x32 image one after the other) and ``labels`` (list of int); the meta
file holds ``label_names``. Nothing is downloaded. :func:`hydrattr.datasets.load_cifar10`
finds the folder and splits what :func:`read_cifar10` reads.

Security: these files are pickles, and unpickling an arbitrary file can run arbitrary
code. They are read with a restricted unpickler that builds only plain containers and
numpy arrays (all a CIFAR file holds) and refuses anything else with a ``ValueError``;
still, only read CIFAR files from a source you trust (the official archive).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

__all__ = ["CIFAR10_FOLDER", "CIFAR10_FILES", "read_cifar_batch", "read_cifar10",
           "cifar10_candidates"]

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


def cifar10_candidates(root):
    """The folders under ``root`` that may hold the CIFAR-10 batches, in the order tried:
    torchvision's ``root/cifar-10-batches-py``, ``root`` itself, ``root/cifar10/...``."""
    base = Path(root).expanduser()
    return [base / CIFAR10_FOLDER, base, base / "cifar10" / CIFAR10_FOLDER]


def read_cifar10(folder):
    """``(X, y, X_test, y_test, classes)`` from the batches in ``folder``: the 50,000
    training images, the test batch, and the label names (None without the meta file)."""
    folder = Path(folder)
    parts = [read_cifar_batch(folder / f) for f in CIFAR10_FILES["train"]]
    X = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    X_test, y_test = read_cifar_batch(folder / CIFAR10_FILES["test"][0])
    classes = None
    meta = folder / CIFAR10_FILES["meta"]
    if meta.is_file():
        classes = list(_load(meta).get("label_names", [])) or None
    return X, y, X_test, y_test, classes

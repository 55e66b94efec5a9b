"""Dataset loaders and synthetic data.

* :func:`load_idx_dataset`, :func:`load_mnist`, :func:`load_fashion_mnist` read the
  original IDX ``.gz`` files of MNIST / Fashion-MNIST from a local directory (never
  download anything).
* :func:`load_mnist_split` builds the 50k/10k/10k train/validation/test split used by
  the HYDRA paper (Chen et al., AAAI 2021, supplement "Datasets").
* :func:`load_digits_split` is the no-files default (scikit-learn's 8x8 digits).
* :func:`load_cifar10` reads torchvision's CIFAR-10 python batches (the reader is
  ``hydrattr/_cifar.py``) into the paper's 40k/10k/10k split.
* :func:`make_label_noise` and :func:`make_logistic_toy` create synthetic data.

The data directory is resolved as: the explicit ``data_dir`` (``root``) argument, else
the ``HYDRATTR_DATA`` environment variable. Inside it, the four IDX files may lie
directly or in a subfolder named after the dataset (``mnist/``, ``fashion-mnist/``).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.utils import Bunch, check_random_state

from ._cifar import CIFAR10_FILES, CIFAR10_FOLDER, cifar10_candidates, read_cifar10

__all__ = [
    "DATA_ENV_VAR",
    "IDX_FILES",
    "idx_folder",
    "read_idx_images",
    "read_idx_labels",
    "load_idx_dataset",
    "load_mnist",
    "load_fashion_mnist",
    "load_mnist_split",
    "load_digits_split",
    "make_label_noise",
    "make_logistic_toy",
    "load_cifar10",
]

DATA_ENV_VAR = "HYDRATTR_DATA"

#: File names of the original distributions (identical for MNIST and Fashion-MNIST).
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension

# canonical dataset name -> accepted subfolder names
_SUBFOLDERS = {
    "mnist": ("mnist", "MNIST"),
    "fashion-mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST"),
}
_ALIASES = {"mnist": "mnist", "fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist",
            "fashionmnist": "fashion-mnist"}


# --------------------------------------------------------------------------- IDX

def _read_gz(path):
    with gzip.open(path, "rb") as fh:
        return fh.read()


def read_idx_images(path):
    """Read a gzipped IDX3 image file.

    Parameters
    ----------
    path : str or path-like
        Path to a ``*-images-idx3-ubyte.gz`` file.

    Returns
    -------
    images : ndarray of shape (n, 1, rows, cols), dtype float32
        Pixel values divided by 255, hence in [0, 1].

    Raises
    ------
    ValueError
        If the magic number is not 2051 or the payload size does not match the
        header ``n * rows * cols``.
    """
    raw = _read_gz(path)
    if len(raw) < 16:
        raise ValueError(f"IDX image file {path} is too short ({len(raw)} bytes) for a 16-byte header")
    magic, n, rows, cols = np.frombuffer(raw, dtype=">u4", count=4, offset=0).astype(np.int64)
    if magic != _IMAGES_MAGIC:
        raise ValueError(f"IDX image file {path} has magic number {magic}, expected {_IMAGES_MAGIC}")
    expected = 16 + n * rows * cols
    if len(raw) != expected:
        raise ValueError(f"IDX image file {path} has {len(raw)} bytes, but its header "
                         f"(n={n}, rows={rows}, cols={cols}) implies {expected}")
    pixels = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, 1, rows, cols)
    return pixels.astype(np.float32) / np.float32(255.0)


def read_idx_labels(path):
    """Read a gzipped IDX1 label file.

    Parameters
    ----------
    path : str or path-like
        Path to a ``*-labels-idx1-ubyte.gz`` file.

    Returns
    -------
    labels : ndarray of shape (n,), dtype int64

    Raises
    ------
    ValueError
        If the magic number is not 2049 or the payload size does not match the header.
    """
    raw = _read_gz(path)
    if len(raw) < 8:
        raise ValueError(f"IDX label file {path} is too short ({len(raw)} bytes) for an 8-byte header")
    magic, n = np.frombuffer(raw, dtype=">u4", count=2, offset=0).astype(np.int64)
    if magic != _LABELS_MAGIC:
        raise ValueError(f"IDX label file {path} has magic number {magic}, expected {_LABELS_MAGIC}")
    if len(raw) != 8 + n:
        raise ValueError(f"IDX label file {path} has {len(raw)} bytes, but its header (n={n}) "
                         f"implies {8 + n}")
    return np.frombuffer(raw, dtype=np.uint8, offset=8).astype(np.int64)


def _canonical_name(name):
    key = str(name).lower()
    if key not in _ALIASES:
        raise ValueError(f"name must be one of {sorted(_SUBFOLDERS)}, got {name!r}")
    return _ALIASES[key]


def _find_folder(given, arg, candidates, files, what, hint):
    """The first of ``candidates(directory)`` holding every file of ``files``, where the
    directory is ``given`` or else ``$HYDRATTR_DATA``; ``FileNotFoundError`` otherwise.
    ``arg`` names the argument, ``what`` the data, ``hint`` where the files may lie."""
    source = arg
    if given is None:
        given = os.environ.get(DATA_ENV_VAR) or None
        source = f"${DATA_ENV_VAR}"
    expected = ", ".join(files)
    if given is None:
        raise FileNotFoundError(
            f"No data directory for {what}: pass {arg}=... or set the {DATA_ENV_VAR} "
            f"environment variable to a folder holding {expected} ({hint}). Nothing is "
            f"downloaded.")
    tried = candidates(given)
    for cand in tried:
        if all((cand / f).is_file() for f in files):
            return cand
    raise FileNotFoundError(
        f"Could not find the {what} files {expected} in "
        f"{', '.join(str(c) for c in tried)} (directory taken from {source}). Pass "
        f"{arg}=... or set the {DATA_ENV_VAR} environment variable to a folder holding "
        f"these files ({hint}). Nothing is downloaded.")


def idx_folder(name, data_dir, files):
    """The directory holding the IDX ``files`` of dataset ``name`` (``data_dir``, else
    ``$HYDRATTR_DATA``, or a subfolder named after the dataset); ``FileNotFoundError``
    naming what was tried otherwise."""
    def candidates(d):
        base = Path(d).expanduser()
        return [base] + [base / sub for sub in _SUBFOLDERS[name]]

    return _find_folder(data_dir, "data_dir", candidates, files, repr(name),
                        f"directly or in a {_SUBFOLDERS[name][0]}/ subfolder")


def _load_part(name, data_dir, kind):
    if kind not in ("train", "test"):
        raise ValueError(f"kind must be 'train' or 'test', got {kind!r}")
    files = (IDX_FILES[f"{kind}_images"], IDX_FILES[f"{kind}_labels"])
    folder = idx_folder(name, data_dir, files)
    X = read_idx_images(folder / files[0])
    y = read_idx_labels(folder / files[1])
    if len(X) != len(y):
        raise ValueError(f"{folder}: {files[0]} holds {len(X)} images but {files[1]} "
                         f"holds {len(y)} labels")
    return X, y


def load_idx_dataset(name, data_dir=None):
    """Load MNIST or Fashion-MNIST from the original IDX ``.gz`` files.

    Parameters
    ----------
    name : {"mnist", "fashion-mnist"}
        Dataset name (``"fashion_mnist"`` is accepted as an alias).
    data_dir : str or path-like, optional
        Folder holding the four files (or a ``mnist/`` resp. ``fashion-mnist/``
        subfolder holding them). Defaults to the ``HYDRATTR_DATA`` environment variable.

    Returns
    -------
    X_train : ndarray of shape (60000, 1, 28, 28), float32 in [0, 1]
    y_train : ndarray of shape (60000,), int64
    X_test : ndarray of shape (10000, 1, 28, 28), float32 in [0, 1]
    y_test : ndarray of shape (10000,), int64

    Raises
    ------
    FileNotFoundError
        If no directory is given or the files are missing.
    ValueError
        If a file is not a valid IDX file (wrong magic number or size).
    """
    name = _canonical_name(name)
    X_train, y_train = _load_part(name, data_dir, "train")
    X_test, y_test = _load_part(name, data_dir, "test")
    return X_train, y_train, X_test, y_test


def load_mnist(data_dir=None, kind="train"):
    """Load one part of MNIST.

    Parameters
    ----------
    data_dir : str or path-like, optional
        See :func:`load_idx_dataset`.
    kind : {"train", "test"}
        The official 60k training part or the 10k ``t10k`` test part.

    Returns
    -------
    X : ndarray of shape (n, 1, 28, 28), float32 in [0, 1]
    y : ndarray of shape (n,), int64
    """
    return _load_part("mnist", data_dir, kind)


def load_fashion_mnist(data_dir=None, kind="train"):
    """Load one part of Fashion-MNIST; same interface as :func:`load_mnist`."""
    return _load_part("fashion-mnist", data_dir, kind)


# ------------------------------------------------------------------------ splits

def _check_count(value, name, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def load_mnist_split(name="mnist", data_dir=None, random_state=0, n_train=50000, n_valid=10000):
    """The HYDRA paper's train/validation/test split of (Fashion-)MNIST.

    A seeded permutation of the official 60k training set gives ``n_train`` training
    and the next ``n_valid`` validation samples (50,000 / 10,000 in the paper,
    supplement "Datasets"); the official 10k test set is the test set.

    Parameters
    ----------
    name : {"mnist", "fashion-mnist"}
    data_dir : str or path-like, optional
        See :func:`load_idx_dataset`.
    random_state : int, RandomState instance or None, default=0
        Seed of the permutation.
    n_train, n_valid : int
        Sizes of the training and validation parts; ``n_train >= 1``,
        ``n_valid >= 0`` and ``n_train + n_valid <= 60000``. Smaller values give quick
        runs (the two parts stay disjoint).

    Returns
    -------
    split : sklearn.utils.Bunch
        ``X_train, y_train, X_valid, y_valid, X_test, y_test`` plus ``train_index`` and
        ``valid_index`` (positions in the official training set) and ``name``.
    """
    name = _canonical_name(name)
    X, y = _load_part(name, data_dir, "train")
    n_train = _check_count(n_train, "n_train", 1, len(X))
    n_valid = _check_count(n_valid, "n_valid", 0, len(X))
    if n_train + n_valid > len(X):
        raise ValueError(f"n_train + n_valid must be <= {len(X)} (the official training set), "
                         f"got {n_train} + {n_valid} = {n_train + n_valid}")
    X_test, y_test = _load_part(name, data_dir, "test")
    perm = check_random_state(random_state).permutation(len(X))
    tr, va = perm[:n_train], perm[n_train:n_train + n_valid]
    return Bunch(X_train=X[tr], y_train=y[tr], X_valid=X[va], y_valid=y[va],
                 X_test=X_test, y_test=y_test, train_index=tr, valid_index=va, name=name)


def load_digits_split(test_size=0.25, valid_size=0.2, random_state=0):
    """scikit-learn's 8x8 digits as a train/validation/test split (no files needed).

    The 1797 images are scaled to [0, 1] by dividing by 16. First ``test_size`` is
    held out as test set (stratified); then ``valid_size`` of the *remaining* samples is
    held out as validation set (stratified). ``valid_size=0`` gives empty validation
    arrays of shape (0, 64).

    Parameters
    ----------
    test_size : float in (0, 1), default=0.25
    valid_size : float in [0, 1), default=0.2
        Fraction of the non-test samples used for validation.
    random_state : int, RandomState instance or None, default=0

    Returns
    -------
    split : sklearn.utils.Bunch
        ``X_train, y_train, X_valid, y_valid, X_test, y_test``; X float32 of shape
        (n, 64), y int64.
    """
    if not 0 < float(test_size) < 1:
        raise ValueError(f"test_size must be a float in (0, 1), got {test_size!r}")
    if not 0 <= float(valid_size) < 1:
        raise ValueError(f"valid_size must be a float in [0, 1), got {valid_size!r}")
    rng = check_random_state(random_state)
    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    X_rest, X_test, y_rest, y_test = train_test_split(
        X, y, test_size=test_size, stratify=y, random_state=rng)
    if valid_size > 0:
        X_train, X_valid, y_train, y_valid = train_test_split(
            X_rest, y_rest, test_size=valid_size, stratify=y_rest, random_state=rng)
    else:
        X_train, y_train = X_rest, y_rest
        X_valid, y_valid = X[:0], y[:0]
    return Bunch(X_train=X_train, y_train=y_train, X_valid=X_valid, y_valid=y_valid,
                 X_test=X_test, y_test=y_test, name="digits")


# --------------------------------------------------------------------- synthetic

def make_label_noise(y, rate, n_classes=None, random_state=None):
    """Flip a fixed fraction of labels to a uniformly drawn *different* class.

    Exactly ``k = floor(rate * n + 0.5)`` labels (rounding half up) are chosen uniformly
    without replacement; each gets a label drawn uniformly from the ``n_classes - 1``
    other classes.

    Parameters
    ----------
    y : array-like of shape (n,)
        Integer labels in ``[0, n_classes)``.
    rate : float in [0, 1]
        Fraction of labels to flip.
    n_classes : int, optional
        Number of classes; defaults to ``y.max() + 1``. Must be >= 2 if anything is
        flipped.
    random_state : int, RandomState instance or None

    Returns
    -------
    y_noisy : ndarray of shape (n,), int64
    flipped_mask : ndarray of shape (n,), bool
        True where the label was changed.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-d, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    y = y.astype(np.int64)
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate!r}")
    if n_classes is None:
        n_classes = int(y.max()) + 1 if y.size else 0
    n_classes = int(n_classes)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"y must lie in [0, n_classes={n_classes}), got range "
                         f"[{y.min()}, {y.max()}]")
    n_flip = int(np.floor(rate * y.size + 0.5))
    if n_flip > 0 and n_classes < 2:
        raise ValueError(f"n_classes must be >= 2 to flip labels, got {n_classes}")
    rng = check_random_state(random_state)
    idx = rng.choice(y.size, size=n_flip, replace=False)
    y_noisy = y.copy()
    if n_flip:
        # an offset drawn uniformly from 1..n_classes-1, modulo n_classes, is uniform
        # over the n_classes - 1 other classes
        y_noisy[idx] = (y[idx] + rng.randint(1, n_classes, size=n_flip)) % n_classes
    mask = np.zeros(y.size, dtype=bool)
    mask[idx] = True
    return y_noisy, mask


def make_logistic_toy(n_samples=200, centers=((-2.0, -2.0), (2.0, 2.0)), cluster_std=1.0,
                      coef=(1.0, 1.0), intercept=1.0, outlier=(8.0, 8.0), outlier_label=0,
                      random_state=None):
    """Two Gaussian clusters plus one extreme outlier, with logistic labels.

    After Brinkman & Horken (2018), "Finding influential examples", Section 4.1.3
    ("Dataset", Figure 4.1): two distinct point clusters drawn from bivariate normal
    distributions with *equal diagonal covariance* but different means; labels drawn
    as ``Y ~ Bernoulli(pi(x))`` with ``pi(x) = 1 / (1 + exp(-(1 + b1 x1 + b2 x2)))``
    (Eq. 4.2, intercept 1); finally one extreme outlier is added.

    The thesis gives only the intercept (1) and the construction; it does not state
    the cluster means, the variance, ``b1, b2``, the sample size or the outlier's
    position. The defaults here are our choices: means (-2, -2) and (2, 2), standard
    deviation 1, ``b1 = b2 = 1``, and an outlier at (8, 8) whose label is 0, the
    opposite of what the model predicts there (a high-leverage, mislabeled point).
    The cluster points are split as evenly as possible between the two clusters;
    the outlier is the last sample.

    Parameters
    ----------
    n_samples : int, default=200
        Total number of samples including the outlier (>= 3).
    centers : pair of 2-d points
    cluster_std : float > 0
    coef : pair of float
        ``(b1, b2)`` of Eq. 4.2.
    intercept : float, default=1.0
        The constant in Eq. 4.2 (1 in the thesis).
    outlier : 2-d point
    outlier_label : {0, 1}, default=0
    random_state : int, RandomState instance or None

    Returns
    -------
    data : sklearn.utils.Bunch
        ``X`` (n_samples, 2) float64, ``y`` (n_samples,) int64, ``outlier_index`` (int),
        ``coef`` (2,), ``intercept``, ``cluster`` (n_samples,) int64 with 0/1 for the
        cluster of each point and -1 for the outlier, ``proba`` (n_samples,) the model
        probability ``pi(x)`` of each point.
    """
    n_samples = _check_count(n_samples, "n_samples", 3, np.iinfo(np.int64).max)
    centers = np.asarray(centers, dtype=np.float64)
    if centers.shape != (2, 2):
        raise ValueError(f"centers must have shape (2, 2), got {centers.shape}")
    if not float(cluster_std) > 0:
        raise ValueError(f"cluster_std must be > 0, got {cluster_std!r}")
    coef = np.asarray(coef, dtype=np.float64)
    if coef.shape != (2,):
        raise ValueError(f"coef must be a pair (b1, b2), got shape {coef.shape}")
    outlier = np.asarray(outlier, dtype=np.float64)
    if outlier.shape != (2,):
        raise ValueError(f"outlier must be a 2-d point, got shape {outlier.shape}")
    if outlier_label not in (0, 1):
        raise ValueError(f"outlier_label must be 0 or 1, got {outlier_label!r}")
    rng = check_random_state(random_state)
    n_clustered = n_samples - 1
    cluster = np.repeat([0, 1], [n_clustered - n_clustered // 2, n_clustered // 2])
    X = centers[cluster] + float(cluster_std) * rng.standard_normal((n_clustered, 2))
    proba = 1.0 / (1.0 + np.exp(-(float(intercept) + X @ coef)))
    y = (rng.random_sample(n_clustered) < proba).astype(np.int64)
    out_p = 1.0 / (1.0 + np.exp(-(float(intercept) + outlier @ coef)))
    return Bunch(
        X=np.vstack([X, outlier[None]]),
        y=np.append(y, np.int64(outlier_label)),
        outlier_index=n_samples - 1,
        coef=coef,
        intercept=float(intercept),
        cluster=np.append(cluster, -1).astype(np.int64),
        proba=np.append(proba, out_p),
    )


# --------------------------------------------------------------------------- CIFAR-10
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
    folder = _find_folder(root, "root", cifar10_candidates,
                          CIFAR10_FILES["train"] + CIFAR10_FILES["test"], "CIFAR-10",
                          f"torchvision's layout root/{CIFAR10_FOLDER}/")
    X, y, X_test, y_test, classes = read_cifar10(folder)
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

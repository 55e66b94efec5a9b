"""Input kinds accepted by every attributor, following skorch's own conventions.

``X`` may be

* a numpy array (or anything ``np.asarray`` takes), cast to the module's parameter dtype;
* a ``torch.Tensor`` (any device): treated exactly like its numpy copy;
* a dict of arrays/tensors, e.g. skorch's ``SliceDict`` (the module's ``forward`` gets
  the keys as keyword arguments): float values are cast like arrays, integer values
  (token ids, ...) are kept;
* a ``torch.utils.data.Dataset`` whose items are ``(x, y)`` pairs, as skorch requires;
  ``y`` may then be None (skorch reads targets from the dataset). Items are never cast:
  batches are built by the net's own collate function (``iterator_train__collate_fn``,
  torch's ``default_collate`` by default), exactly as skorch's data loader builds them.
  The dataset must return the same item for the same index every time (no random
  augmentation): HYDRA replays batches.

Row ``i`` of the contribution matrix is always item ``i`` of ``X`` as given to ``fit``
(dataset index ``i``), whatever shuffling or ``train_split`` skorch applies.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping

import numpy as np
import scipy.sparse
import torch
from sklearn.utils import check_random_state

__all__ = ["input_kind", "check_mapping", "check_dataset", "n_rows", "input_shape",
           "cast_inputs", "slice_rows", "take_rows", "to_device", "dataset_data_fn",
           "collate_fn_of", "collate_all", "select_rows"]


def input_kind(X):
    """``"dataset"``, ``"dict"``, ``"tensor"`` or ``"array"``."""
    if scipy.sparse.issparse(X):  # a DOK matrix is a dict subclass: let sklearn's
        return "array"  # validation reject sparse input with its usual message
    if isinstance(X, torch.utils.data.Dataset):
        return "dataset"
    if isinstance(X, Mapping):
        return "dict"
    if isinstance(X, torch.Tensor):
        return "tensor"
    return "array"


def _check_values(name, v):
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    v = np.asarray(v)
    if v.dtype.kind not in "fiub":
        raise ValueError(f"{name} must be numeric, got dtype {v.dtype}.")
    if v.ndim == 0:
        raise ValueError(f"{name} must have a leading sample axis, got a scalar.")
    if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
        raise ValueError(f"{name} contains NaN or infinity.")
    return v


def _check_y(y, n, what):
    if y is None:
        return None
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
        raise ValueError("y contains NaN or infinity.")
    if len(y) != n:
        raise ValueError(f"y has {len(y)} rows but {what} has {n}.")
    return y


def check_mapping(X, y, require_y=True):
    """Validate a dict / ``SliceDict`` input: equal row counts, numeric, finite.

    Returns ``(dict of numpy arrays, y)``.
    """
    if len(X) == 0:
        raise ValueError("X is an empty dict; expected one array per forward() argument.")
    out = {str(k): _check_values(f"X[{k!r}]", v) for k, v in X.items()}
    lengths = {k: len(v) for k, v in out.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"every value of the X dict must have the same number of rows, "
                         f"got {lengths}.")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError("X has 0 samples.")
    if y is None and require_y:
        raise ValueError("y is required unless X is a torch Dataset.")
    return out, _check_y(y, n, "X")


def check_dataset(X, y):
    """Validate a ``torch.utils.data.Dataset`` input (sized, ``(x, y)`` items)."""
    try:
        n = len(X)
    except TypeError:
        raise TypeError("X: a torch Dataset must define __len__ (iterable datasets cannot be "
                        "indexed by row).") from None
    if n == 0:
        raise ValueError("X has 0 samples.")
    return X, _check_y(y, n, "the dataset")


def n_rows(X):
    """Number of samples of any accepted input."""
    if isinstance(X, Mapping):
        return len(next(iter(X.values())))
    return len(X)


def input_shape(X):
    """Per-sample shape (tuple, or dict of tuples); None for datasets (not checked)."""
    kind = input_kind(X)
    if kind == "dataset":
        return None
    if kind == "dict":
        return {k: tuple(v.shape[1:]) for k, v in X.items()}
    return tuple(X.shape[1:])


def cast_inputs(X, np_dtype):
    """Cast float arrays (or dict values) to the module's dtype; datasets are untouched."""
    kind = input_kind(X)
    if kind == "dataset":
        return X
    if kind == "dict":
        return {k: (v.astype(np_dtype, copy=False) if v.dtype.kind == "f" else v)
                for k, v in X.items()}
    return X.astype(np_dtype, copy=False)


def slice_rows(X, start, stop):
    """Rows ``start:stop`` of a tensor or of every value of a dict."""
    if isinstance(X, Mapping):
        return {k: v[start:stop] for k, v in X.items()}
    return X[start:stop]


def take_rows(X, rows):
    """Rows ``rows`` (index tensor) of a tensor or of every value of a dict."""
    if isinstance(X, Mapping):
        return {k: v[rows] for k, v in X.items()}
    return X[rows]


def to_device(X, device):
    """Move a tensor or every tensor of a dict/tuple/list to ``device``."""
    if isinstance(X, Mapping):
        return {k: to_device(v, device) for k, v in X.items()}
    if isinstance(X, (tuple, list)):
        return type(X)(to_device(v, device) for v in X)
    return X.to(device)


def collate_fn_of(net):
    """The collate function skorch's training data loader uses for ``net``."""
    from torch.utils.data import default_collate

    return net.get_params_for("iterator_train").get("collate_fn") or default_collate


def _as_plain(x):
    # vmap/functional_call need plain dicts (skorch's SliceDict is not a registered pytree)
    if isinstance(x, Mapping):
        return {k: _as_plain(v) for k, v in x.items()}
    return x


def collate_all(dataset, collate, rows=None):
    """``(x, y)`` of ``rows`` (default: all) of a dataset, batched by ``collate``."""
    rows = range(len(dataset)) if rows is None else rows
    batch = collate([dataset[int(i)] for i in rows])
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError("X: a torch Dataset must return (x, y) pairs, as skorch requires "
                         "(use a dummy y for unsupervised data).")
    return _as_plain(batch[0]), batch[1]


def dataset_data_fn(dataset, collate, device):
    """``data_fn(rows) -> (x, y)``: the batch of dataset rows as skorch's loader builds it."""
    def data_fn(rows):
        x, y = collate_all(dataset, collate, np.asarray(rows))
        return to_device(x, device), to_device(y, device)

    return data_fn


def select_rows(value, n, random_state, name):
    """The training rows a parameter ``name`` picks out of ``n``, sorted.

    ``value`` is None (every row), an int k (k rows drawn without replacement with
    ``random_state``, a ``check_random_state`` argument) or a 1-d array of unique row
    indices. Raises ``ValueError`` naming ``name`` otherwise.
    """
    if value is None:
        return np.arange(n)
    if isinstance(value, numbers.Integral):
        if not 0 < value <= n:
            raise ValueError(f"{name} must be between 1 and n_samples={n}, got {value}.")
        rs = check_random_state(random_state)
        return np.sort(rs.choice(n, size=int(value), replace=False))
    rows = np.asarray(value)
    if rows.ndim != 1 or rows.dtype.kind not in "iu" or len(rows) == 0:
        raise ValueError(f"{name} must be None, an int or a 1-d array of row indices.")
    if rows.min() < 0 or rows.max() >= n or len(np.unique(rows)) != len(rows):
        raise ValueError(f"{name} must hold unique row indices in [0, {n}).")
    return rows.astype(np.int64)

"""Cheap similarity baselines in pixel and embedding space.

After Brinkman & Horken (2018), "Finding influential examples" (Sections 2.4 and
4.2.5, discussion 6.4.1), which compared leave-one-out influence with

* the cosine similarity ``d(p, q) = p.q / (|p| |q|)`` (Eq. 2.13) between train and
  test points, in *pixel space* (vectorised images) and in the *embedding space*
  (output of a network layer, vectorised);
* the Mahalanobis distance ``sqrt((p - q)^T S^{-1} (p - q))`` (Eq. 2.14) of each
  training embedding to its class centroid, ``S`` the class covariance. This is
  independent of the test point (Section 6.4.1);
* the *centroid relationship* ``d_test->cluster / d_train->cluster`` for a training
  and a test example, where ``cluster`` is the centroid of the training example's
  class and ``d`` is the cosine similarity (Section 4.2.5).

Every pairwise function returns an array of shape ``(n_train, n_test)`` like an
attribution matrix ``C``, so it can be compared with :mod:`hydrattr.metrics`.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.spatial.distance import cdist
from torch import nn

__all__ = [
    "cosine_similarity_scores",
    "extract_embeddings",
    "embedding_scores",
    "mahalanobis_scores",
    "centroid_relationship",
]

_METRICS = ("cosine", "euclidean", "dot")


def _flat(X, name):
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    X = np.asarray(X, dtype=np.float64)
    if X.ndim < 1:
        raise ValueError(f"{name} must be an array with one row per sample, got a scalar")
    if X.ndim == 1:
        X = X[:, None]
    return X.reshape(len(X), -1)


def _normalize_rows(X):
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    norms[norms == 0] = 1.0  # zero vectors stay zero -> similarity 0 (as in sklearn)
    return X / norms


def _pairwise(A, B, metric):
    if metric == "cosine":
        return _normalize_rows(A) @ _normalize_rows(B).T
    if metric == "dot":
        return A @ B.T
    if metric == "euclidean":
        return cdist(A, B, "euclidean")
    raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")


def _check_pair(X_train, X_test, name_train="X_train", name_test="X_test"):
    A, B = _flat(X_train, name_train), _flat(X_test, name_test)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"{name_train} and {name_test} must have the same number of features "
                         f"per sample, got {A.shape[1]} and {B.shape[1]}")
    return A, B


def cosine_similarity_scores(X_train, X_test):
    """Cosine similarity between flattened train and test inputs ("pixel space").

    Parameters
    ----------
    X_train : array-like of shape (n_train, ...)
    X_test : array-like of shape (n_test, ...)
        Each sample is flattened; both must have the same number of features.

    Returns
    -------
    S : ndarray of shape (n_train, n_test)
        ``S[i, j] = cos(x_i, x_j)``; a zero vector has similarity 0 with everything.
    """
    A, B = _check_pair(X_train, X_test)
    return _pairwise(A, B, "cosine")


def _get_module(net_or_module):
    module = getattr(net_or_module, "module_", net_or_module)
    if not isinstance(module, nn.Module):
        raise ValueError("net_or_module must be a torch.nn.Module or a fitted skorch net "
                         f"(with a module_ attribute), got {type(net_or_module).__name__}")
    return module


def extract_embeddings(net_or_module, X, layer=None, batch_size=256, device=None):
    """Activations of one layer for every sample, via a forward hook.

    The module is run in eval mode (its previous train/eval state is restored
    afterwards) without gradients, in batches.

    Parameters
    ----------
    net_or_module : torch.nn.Module or fitted skorch net
        A skorch net is unwrapped through its ``module_`` attribute.
    X : array-like or torch.Tensor of shape (n, ...)
        Inputs, cast to the dtype of the module's parameters.
    layer : str, optional
        Name of a submodule in ``dict(module.named_modules())``; its *output* is
        returned. ``None`` (default) returns the *input* of the last ``nn.Linear``
        submodule (in ``named_modules`` order), i.e. the penultimate embedding.
    batch_size : int, default=256
    device : str or torch.device, optional
        Defaults to the device of the module's first parameter (CPU if none).

    Returns
    -------
    E : ndarray of shape (n, d), float64
        Activations flattened per sample.
    """
    module = _get_module(net_or_module)
    modules = dict(module.named_modules())
    if layer is None:
        linears = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("layer=None needs a module with an nn.Linear layer; pass layer=<name> "
                             f"from {list(modules)}")
        target, use_input = modules[linears[-1]], True
    else:
        if layer not in modules:
            raise ValueError(f"layer must be a submodule name in {list(modules)}, got {layer!r}")
        target, use_input = modules[layer], False
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    if device is None:
        device = param.device if param is not None else torch.device("cpu")
    X = torch.as_tensor(np.asarray(X) if not isinstance(X, torch.Tensor) else X)

    captured = []

    def hook(_mod, inputs, output):
        value = inputs[0] if use_input else output
        captured.append(value.detach().reshape(value.shape[0], -1).to("cpu", torch.float64))

    handle = target.register_forward_hook(hook)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(X), int(batch_size)):
                module(X[start:start + int(batch_size)].to(device=device, dtype=dtype))
    finally:
        handle.remove()
        module.train(was_training)
    if not captured:
        raise ValueError("X must contain at least one sample")
    if len(captured) != -(-len(X) // int(batch_size)):
        raise ValueError(f"the hooked layer ran {len(captured)} times for "
                         f"{-(-len(X) // int(batch_size))} batches; choose a layer used once per forward")
    return torch.cat(captured).numpy()


def embedding_scores(net_or_module, X_train, X_test, layer=None, metric="cosine",
                     batch_size=256, device=None):
    """Similarity of train and test points in a network's embedding space.

    Parameters
    ----------
    net_or_module, layer, batch_size, device
        See :func:`extract_embeddings`.
    X_train : array-like of shape (n_train, ...)
    X_test : array-like of shape (n_test, ...)
    metric : {"cosine", "dot", "euclidean"}, default="cosine"
        Cosine similarity (the thesis' measure), inner product, or Euclidean distance.

    Returns
    -------
    S : ndarray of shape (n_train, n_test)
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    E_train = extract_embeddings(net_or_module, X_train, layer, batch_size, device)
    E_test = extract_embeddings(net_or_module, X_test, layer, batch_size, device)
    return _pairwise(E_train, E_test, metric)


def _check_labels(y, n, name, n_name):
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{name} must be 1-d with one label per row of {n_name} ({n}), "
                         f"got shape {y.shape}")
    return y


def mahalanobis_scores(E_train, y_train, E_test=None, reg=1e-6):
    """Mahalanobis distance of each training embedding to its class centroid.

    For class ``c`` with training embeddings ``e_i`` (``y_i = c``), centroid ``mu_c``
    (their mean) and covariance ``S_c`` (``np.cov``, ddof=1), the score of sample
    ``i`` is ``sqrt((e_i - mu_c)^T (S_c + lam_c I)^{-1} (e_i - mu_c))`` with the
    ridge ``lam_c = reg * trace(S_c) / d`` (scale-invariant; ``reg=0`` gives the plain
    inverse, raising on a singular ``S_c``). As in the thesis (Sections 5.3, 6.4.1)
    the score does not depend on the test point.

    Parameters
    ----------
    E_train : array-like of shape (n_train, ...)
        Training embeddings (flattened per sample).
    y_train : array-like of shape (n_train,)
        Class labels; every class needs at least 2 samples.
    E_test : array-like of shape (n_test, ...), optional
        Only its length is used: if given, the scores are repeated as ``n_test``
        identical columns so the result is shaped like ``C``.
    reg : float >= 0, default=1e-6

    Returns
    -------
    D : ndarray of shape (n_train,), or (n_train, n_test) if ``E_test`` is given
    """
    E = _flat(E_train, "E_train")
    y = _check_labels(y_train, len(E), "y_train", "E_train")
    reg = float(reg)
    if not reg >= 0:
        raise ValueError(f"reg must be >= 0, got {reg!r}")
    d = E.shape[1]
    out = np.empty(len(E))
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if idx.size < 2:
            raise ValueError(f"y_train class {c!r} has {idx.size} sample; the class covariance "
                             "needs at least 2")
        diff = E[idx] - E[idx].mean(axis=0)
        S = np.atleast_2d(np.cov(E[idx], rowvar=False))
        S = S + reg * np.trace(S) / d * np.eye(d)
        try:
            sol = np.linalg.solve(S, diff.T)
        except np.linalg.LinAlgError as err:
            raise ValueError(f"covariance of y_train class {c!r} is singular; use reg > 0") from err
        out[idx] = np.sqrt(np.maximum(np.einsum("ij,ji->i", diff, sol), 0.0))
    if E_test is None:
        return out
    n_test = len(_flat(E_test, "E_test"))
    return np.repeat(out[:, None], n_test, axis=1)


def centroid_relationship(E_train, y_train, E_test, metric="cosine"):
    """The thesis' centroid relationship ``d_test->cluster / d_train->cluster``.

    Brinkman & Horken (2018), Section 4.2.5: for training example ``i`` of class
    ``c = y_train[i]`` and test example ``j``, with ``mu_c`` the centroid (mean) of the
    training embeddings of class ``c``,

        ``R[i, j] = d(e_test_j, mu_c) / d(e_train_i, mu_c)``,

    with ``d`` the cosine similarity (Eq. 2.13). Only the training example's class
    is used, so test labels are not needed.

    Parameters
    ----------
    E_train : array-like of shape (n_train, ...)
    y_train : array-like of shape (n_train,)
    E_test : array-like of shape (n_test, ...)
    metric : {"cosine", "euclidean"}, default="cosine"
        ``"euclidean"`` uses Euclidean distance for ``d`` instead.

    Returns
    -------
    R : ndarray of shape (n_train, n_test)
        Entries with a zero denominator are ``nan`` (``inf`` would dominate any
        correlation).
    """
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    A, B = _check_pair(E_train, E_test, "E_train", "E_test")
    y = _check_labels(y_train, len(A), "y_train", "E_train")
    classes, inv = np.unique(y, return_inverse=True)
    centroids = np.stack([A[inv == k].mean(axis=0) for k in range(len(classes))])
    d_train = _pairwise(A, centroids, metric)[np.arange(len(A)), inv]  # (n_train,)
    d_test = _pairwise(B, centroids, metric)[:, inv].T  # (n_train, n_test)
    with np.errstate(divide="ignore", invalid="ignore"):
        R = d_test / d_train[:, None]
    R[d_train == 0, :] = np.nan
    return R

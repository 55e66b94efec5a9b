"""Exact-mode sweeps over many test chunks as parallel tasks (joblib; dask via its backend).

Exact mode costs one reverse sweep over the whole trajectory per block of test points,
and the blocks are independent: :func:`parallel_attribute` splits the test points into
chunks and runs one ``attribute`` call per chunk as a joblib task. Any joblib backend
works; with ``joblib.parallel_config(backend="dask")`` the chunks are ``dask.distributed``
tasks on the current client's workers.

Nothing large travels with the tasks. The recorded trajectory (parameter snapshots and,
for Adam, optimizer-state snapshots) and the training data are written **once** to
``shared_dir`` as ``.npy`` files; the attributor itself is pickled there without them
(a few hundred kB: the trained net and the bookkeeping). Each task gets the directory
name and its chunk of test points; a worker loads the attributor once per thread
(cached), maps the ``.npy`` files read-only (``mmap_mode``), and computes its chunk. On a
real cluster ``shared_dir`` must be a filesystem every worker sees (NFS, Lustre, a
mounted bucket)::

    from dask.distributed import Client
    import joblib
    from hydrattr.distributed import parallel_attribute

    client = Client("tcp://scheduler:8786")          # or LocalCluster() for one machine
    with joblib.parallel_config(backend="dask"):
        C = parallel_attribute(att, X_test, y_test, chunk_size=64,
                               shared_dir="/shared/scratch/hydrattr-run-1")

Parallelism comes from worker **processes** (dask's default ``LocalCluster``, a real
cluster, or joblib's ``loky`` backend): torch's forward-mode AD, used by every exact
sweep, keeps global state, so tasks that share a process (thread-based workers, e.g.
``LocalCluster(processes=False)``) take a lock and run one at a time; they still give
the right result. Each worker thread gets its own copy of the net (torch's
``functional_call`` swaps parameters into the module in place), and the memory maps are
shared through the page cache. The result is the same matrix as
``att.attribute(X_test, y_test)`` (the same code runs per chunk).

What is shared is fingerprinted (the attributor's class and simple parameters, its
trained weights, the trajectory's length and first snapshot, the training data):
``parallel_attribute`` refuses a ``shared_dir`` that holds another attributor, and
every task checks that it loaded the attributor it was sent for. ``attributor.pkl`` is
written last and atomically, so a directory whose writing was interrupted is never
taken for a complete one, and what a failed or interrupted write left is removed.

.. warning::

   :func:`load_shared` and the tasks read ``attributor.pkl`` and ``.pkl`` metadata with
   :mod:`pickle`, which can run arbitrary code: only load directories that you (or
   hydrattr, in this run) wrote, never ones from an untrusted source.
"""
from __future__ import annotations

import copy
import hashlib
import os
import pickle
import shutil
import signal
import tempfile
import threading

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from ._core.trajectory import Trajectory
from ._inputs import input_kind, n_rows, slice_rows

__all__ = ["parallel_attribute", "share_attributor", "load_shared", "fingerprint"]

_VERSION = 1
_local = threading.local()
# torch's forward-mode AD levels are process-global: one sweep per process at a time
_SWEEP_LOCK = threading.Lock()


# -- training data <-> files ---------------------------------------------------------------
def _save_data(X, y, directory):
    os.makedirs(directory, exist_ok=True)
    kind = input_kind(X)
    if kind == "dataset":
        with open(os.path.join(directory, "dataset.pkl"), "wb") as f:
            pickle.dump(X, f)
    elif kind == "dict":
        for k, v in X.items():
            np.save(os.path.join(directory, f"X__{k}.npy"), v.numpy())
    else:
        np.save(os.path.join(directory, "X.npy"), X.numpy())
    if y is not None:
        np.save(os.path.join(directory, "y.npy"), y.numpy())
    with open(os.path.join(directory, "kind.pkl"), "wb") as f:
        pickle.dump({"kind": kind, "keys": list(X) if kind == "dict" else None}, f)


def _load_data(directory):
    def arr(name):  # copy-on-write map: lazily read, writable for torch, file untouched
        return torch.from_numpy(np.load(os.path.join(directory, name), mmap_mode="c"))

    with open(os.path.join(directory, "kind.pkl"), "rb") as f:
        info = pickle.load(f)
    if info["kind"] == "dataset":
        with open(os.path.join(directory, "dataset.pkl"), "rb") as f:
            X = pickle.load(f)
    elif info["kind"] == "dict":
        X = {k: arr(f"X__{k}.npy") for k in info["keys"]}
    else:
        X = arr("X.npy")
    y = arr("y.npy") if os.path.exists(os.path.join(directory, "y.npy")) else None
    return X, y


# -- the attributor ------------------------------------------------------------------------
def _hash_array(h, a):
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))


def fingerprint(att):
    """A hex digest of what :func:`share_attributor` shares from the fitted ``att``.

    Covers the class, the parameters of simple types (so a ``set_params(mode=...)``
    changes it), the trained weights and buffers, the trajectory's length and first
    snapshot and the training data (a dataset by its length only).
    """
    h = hashlib.sha256(type(att).__qualname__.encode())
    simple = (str, int, float, bool, type(None))
    params = {k: (v if isinstance(v, simple) else type(v).__name__)
              for k, v in att.get_params(deep=False).items() if k != "net"}
    h.update(repr(sorted(params.items())).encode())
    for name, value in att.net_.module_.state_dict().items():
        h.update(name.encode())
        _hash_array(h, value)
    traj = getattr(att, "trajectory_", None)
    if traj is not None:
        h.update(f"steps={len(traj)}".encode())
        _hash_array(h, traj.theta(0))
    X, y = att._X, att._y
    if input_kind(X) == "dataset":
        h.update(f"dataset={len(X)}".encode())
    elif input_kind(X) == "dict":
        for k in sorted(X):
            h.update(str(k).encode())
            _hash_array(h, X[k])
    else:
        _hash_array(h, X)
    if y is not None:
        _hash_array(h, y)
    return h.hexdigest()


def _read_fingerprint(directory):
    try:
        with open(os.path.join(directory, "fingerprint.txt")) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def share_attributor(att, directory):
    """Write a fitted attributor to ``directory`` once: trajectory and training data as
    ``.npy`` files, the rest (trained net, bookkeeping) pickled without them, and its
    :func:`fingerprint` in ``fingerprint.txt``.

    ``attributor.pkl`` is written last, to a temporary name renamed into place, so it
    exists only once everything else is complete. If writing fails or is interrupted,
    what was written is removed again.

    Returns ``directory``. :func:`load_shared` reads it back (memory-mapped).
    """
    check_is_fitted(att, "net_")
    os.makedirs(directory, exist_ok=True)
    names = ("trajectory", "data", "fingerprint.txt", "attributor.pkl")
    existing = {n for n in names if os.path.exists(os.path.join(directory, n))}
    try:
        digest = fingerprint(att)
        traj = getattr(att, "trajectory_", None)
        if traj is not None:
            traj.save(os.path.join(directory, "trajectory"))
        _save_data(att._X, att._y, os.path.join(directory, "data"))
        shell = copy.copy(att)
        shell.trajectory_ = None
        shell._X = shell._y = None
        # (the fitted net holds no recording callback: _skorch.record_fit removes it, so
        # pickling the shell does not copy the trajectory or the data)
        _write_atomic(os.path.join(directory, "fingerprint.txt"),
                      lambda f: f.write(digest.encode()))
        _write_atomic(os.path.join(directory, "attributor.pkl"), lambda f: pickle.dump(
            {"version": _VERSION, "attributor": shell, "has_trajectory": traj is not None,
             "fingerprint": digest}, f))
    except BaseException:
        for n in names:
            if n not in existing:
                path = os.path.join(directory, n)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else \
                    _remove(path)
        raise
    return directory


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _write_atomic(path, write):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def load_shared(directory, expected=None):
    """The attributor written by :func:`share_attributor`, with memory-mapped arrays.

    .. warning:: This unpickles files of ``directory``, which can run arbitrary code:
       only load directories you wrote yourself, never ones from an untrusted source.

    Parameters
    ----------
    directory : str
    expected : str or None
        A :func:`fingerprint`; ``ValueError`` if the directory holds another attributor.
    """
    if expected is not None and _read_fingerprint(directory) != expected:
        raise ValueError(f"shared_dir={directory!r} holds another attributor than the one "
                         f"this task was sent for (fingerprint mismatch).")
    with open(os.path.join(directory, "attributor.pkl"), "rb") as f:
        payload = pickle.load(f)
    if expected is not None and payload.get("fingerprint") != expected:
        raise ValueError(f"shared_dir={directory!r}: attributor.pkl is not the attributor "
                         f"this task was sent for (fingerprint mismatch).")
    att = payload["attributor"]
    if payload["has_trajectory"]:
        att.trajectory_ = Trajectory.load(os.path.join(directory, "trajectory"))
    att._X, att._y = _load_data(os.path.join(directory, "data"))
    return att


def _cached(directory, digest):
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    if (directory, digest) not in cache:
        cache[(directory, digest)] = load_shared(directory, expected=digest)
    return cache[(directory, digest)]


def _chunk_task(directory, digest, X_chunk, y_chunk, objective):
    """One task: load (once per worker thread) and attribute one chunk of test points."""
    att = _cached(directory, digest)
    with _SWEEP_LOCK:
        return att.attribute(X_chunk, y_chunk, objective=objective)


class _TermAsExit:
    """In the main thread, turn SIGTERM into ``SystemExit`` for the block, so that a
    temporary shared directory is removed when the run is terminated (``kill``);
    nothing can clean up after SIGKILL."""

    def __enter__(self):
        self._old = None
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            def handler(signum, frame):
                raise SystemExit(128 + signum)

            self._old = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def _chunks(X, y, size):
    n = n_rows(X)
    kind = input_kind(X)
    for s in range(0, n, size):
        e = min(s + size, n)
        if kind == "dataset":
            Xc = torch.utils.data.Subset(X, range(s, e))
            yield Xc, (None if y is None else y[s:e]), e - s
        else:
            yield slice_rows(X, s, e), y[s:e], e - s


def parallel_attribute(att, X_test, y_test, objective="per_sample", *, chunk_size=64,
                       n_jobs=None, shared_dir=None):
    """``att.attribute(X_test, y_test, objective)`` with test chunks as parallel tasks.

    Parameters
    ----------
    att : BaseAttributor
        A fitted attributor; exact-mode (or ``storage="replay"``) :class:`HydraAttributor`
        is where this pays: one trajectory sweep per chunk.
    X_test, y_test : array-like, tensor, dict or Dataset (as for ``attribute``)
    objective : {"per_sample", "mean"}
    chunk_size : int, default=64
        Test points per task.
    n_jobs : int or None
        Passed to ``joblib.Parallel`` (None: the active ``joblib.parallel_config``; under
        the dask backend, as many tasks in flight as the cluster takes).
    shared_dir : str or None
        Where the trajectory, training data and attributor are written once (a fresh
        temporary directory when None, removed at the end, also when the run fails, is
        interrupted or gets SIGTERM; must be visible to all workers on a cluster).
        Reused if it already holds this attributor (same :func:`fingerprint`);
        ``ValueError`` if it holds another one. Only give directories you trust: their
        ``.pkl`` files are unpickled.

    Returns
    -------
    C : ndarray of shape (n_train, n_test) or (n_train, 1)
    """
    from joblib import Parallel, delayed

    check_is_fitted(att, "net_")
    if objective not in ("per_sample", "mean"):
        raise ValueError(f"objective must be 'per_sample' or 'mean', got {objective!r}.")
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    if input_kind(X_test) == "tensor":
        X_test = X_test.detach().cpu().numpy()
    if isinstance(y_test, torch.Tensor):
        y_test = y_test.detach().cpu().numpy()
    if y_test is not None and input_kind(X_test) != "dataset":
        y_test = np.asarray(y_test)
    tmp = None
    digest = fingerprint(att)
    with _TermAsExit():
        if shared_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="hydrattr-shared-")
            shared_dir = tmp.name
        try:
            if not os.path.exists(os.path.join(shared_dir, "attributor.pkl")):
                share_attributor(att, shared_dir)
            elif _read_fingerprint(shared_dir) != digest:
                raise ValueError(
                    f"shared_dir={shared_dir!r} already holds another attributor (or one "
                    f"fitted differently): its fingerprint does not match this one. Pass an "
                    f"empty or new directory, or remove that one.")
            parts = list(_chunks(X_test, y_test, int(chunk_size)))
            outs = Parallel(n_jobs=n_jobs)(
                delayed(_chunk_task)(shared_dir, digest, Xc, yc, objective)
                for Xc, yc, _ in parts)
        finally:
            if tmp is not None:
                _local.__dict__.get("cache", {}).pop((shared_dir, digest), None)
                tmp.cleanup()
    if objective == "mean":  # C is linear in the test gradient: weight chunk means by size
        n = sum(m for *_, m in parts)
        return sum(C * (m / n) for C, (*_, m) in zip(outs, parts))
    return np.concatenate(outs, axis=1)

"""The recorded SGD trajectory: what every HYDRA computation replays.

For each optimizer step ``t`` (0-based) the trajectory holds the parameters *before*
the step (``theta(t)``), the rows in the batch (indices into the data given to ``fit``),
the per-sample weight of the batch loss (``1/B`` for a mean loss, ``1`` for a sum),
the per-group hyperparameters actually used, and optionally the RNG state at the start
of the batch (to replay dropout masks). Parameters live in memory, in a disk memmap, or
only the last step's are kept (``storage="last"``: what influence functions and the
recorder's checks need).

:class:`Steps` is what every sweep and replay reads from a record of steps;
:class:`Trajectory` implements it, and so do the two records derived from one:
:meth:`Trajectory.head` (the first ``n`` steps, a run stopped at a checkpoint) and
:class:`Continuation` (the last steps replayed again from a trained state,
leave-one-out's warm start).
:meth:`Trajectory.save` and :meth:`Trajectory.load` write a trajectory to a directory of
``.npy`` files and map it back read-only.
"""
from __future__ import annotations

import copy
import os
import pickle
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .functional import ParamSpec
from .outofcore import anonymous_file, map_file, touch
from .adam import AdamHyper
from .sgd import SGDHyper

__all__ = ["Steps", "Trajectory", "Continuation", "hyper_from_rows"]


def hyper_from_rows(rows):
    """The recorded per-step hyperparameter rows as :class:`SGDHyper` or :class:`AdamHyper`."""
    if rows and "beta1" in rows[0]:
        return AdamHyper.from_rows(rows)
    return SGDHyper.from_rows(rows)


@runtime_checkable
class Steps(Protocol):
    """What a sweep or a replay reads from a record of optimizer steps.

    ``indices[t]`` are step ``t``'s batch rows, ``weights[t]`` their weight in the batch
    loss, ``rng_states[t]`` the RNG state the batch began with (None: no dropout),
    ``hyper`` the per-step hyperparameters (:class:`SGDHyper` or :class:`AdamHyper`),
    ``buffers0`` the module buffers before the first step (None: unknown), ``dtype`` the
    parameters' dtype (the per-step products of a sweep run in it), ``theta(t)`` the
    parameters before step ``t`` and ``opt_state(t)`` the optimizer state then (None:
    not recorded). A sweep reads nothing else: a new record of steps implements these.
    """

    spec: ParamSpec
    indices: list
    weights: list
    rng_states: list
    hyper: object
    buffers0: dict | None
    dtype: torch.dtype

    def __len__(self) -> int: ...

    def theta(self, t, device=None) -> torch.Tensor: ...

    def opt_state(self, t, device=None): ...


def _np_dtype(dtype):
    return torch.empty(0, dtype=dtype).numpy().dtype


def _save_rows(path, n, get_row, dtype, n_params):
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=_np_dtype(dtype),
                                    shape=(n, n_params))
    for t in range(n):
        arr[t] = get_row(t).numpy()
    arr.flush()
    del arr


_LAST_ONLY = ("this trajectory kept only the last step's parameters (storage='last'); "
              "record with storage='memory' or 'memmap' to keep every step's.")


class _Series:
    """A growing sequence of ``(n_params,)`` snapshots in memory or in a raw disk file
    (``keep_last``: only the latest one)."""

    def __init__(self, n_params, dtype, directory=None, prefix="series-", keep_last=False):
        self.n_params = int(n_params)
        self.dtype = dtype
        self.keep_last = keep_last
        self._rows = []
        self._file = None
        if directory is not None and not keep_last:
            self._file = anonymous_file(directory, prefix)

    @classmethod
    def load(cls, path, n_params, dtype):
        """A series whose rows are the read-only memory map of the ``.npy`` file ``path``."""
        out = cls(n_params, dtype)
        out._rows = np.load(path, mmap_mode="r")
        return out

    def append(self, vec):
        vec = vec.detach().to("cpu", self.dtype)
        if self._file is not None:
            self._file.write(vec.numpy().tobytes())
        else:
            self._rows.append(vec.clone())
            if self.keep_last and len(self._rows) > 1:
                self._rows[-2] = None  # only the latest snapshot is kept

    def finish(self, n_rows):
        if self._file is not None:
            np_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype
            self._rows = map_file(self._file, np_dtype, (int(n_rows), self.n_params))
            self._file = None

    def __getitem__(self, t):
        row = self._rows[t]
        if row is None:
            raise RuntimeError(_LAST_ONLY)
        if isinstance(row, np.ndarray):
            touch(self._rows, row.nbytes)
            return torch.from_numpy(np.array(row))
        return row

    def __len__(self):
        return len(self._rows)

    def __getstate__(self):
        state = self.__dict__.copy()
        if isinstance(self._rows, np.memmap):
            state["_rows"] = [torch.from_numpy(np.array(r)) for r in self._rows]
        state["_file"] = None
        return state


class Trajectory:
    """Append-only record of a training run.

    Parameters
    ----------
    spec : ParamSpec
    n_rows : int
        Number of rows of the data the training indices refer to.
    storage : {"memory", "memmap", "last"}
        Where parameter snapshots live. ``"memmap"`` appends them to a raw file in
        ``directory`` (a fresh temporary directory when None) and maps it read-only
        when recording ends, so RAM stays O(P). ``"last"`` keeps only the latest
        snapshot (``theta(t)`` of earlier steps raises): batch rows, weights and
        hyperparameters at O(P) memory.
    dtype : torch.dtype
        Snapshot dtype (the module's parameter dtype).
    """

    def __init__(self, spec: ParamSpec, n_rows: int, storage="memory", directory=None,
                 dtype=torch.float32):
        if storage not in ("memory", "memmap", "last"):
            raise ValueError(f"trajectory storage must be 'memory', 'memmap' or 'last', got "
                             f"{storage!r}")
        self.spec = spec
        self.n_rows = int(n_rows)
        self.storage = storage
        self.dtype = dtype
        self.indices = []
        self.weights = []
        self.rng_states = []
        self._hyper_rows = []
        self._thetas = []
        self._file = None
        if storage == "memmap":  # a file without a name: gone however the process ends
            self._file = anonymous_file(directory, "hydrattr-trajectory-")
        self._directory = directory
        self._opt_series = None  # optimizer state snapshots (Adam: exp_avg, exp_avg_sq)
        self.theta_final = None
        self.hyper = None
        self.epoch_starts = []  # step index at which each training epoch began
        self.buffers0 = None  # module buffers before the first step (set by the recorder)

    # -- recording -------------------------------------------------------------------
    def append(self, theta, indices, weight, hyper_row, rng_state=None, opt_state=None):
        """Record one step: parameters before it, batch rows, loss weight, hyperparameters.

        ``opt_state`` is an optional tuple of flat optimizer-state vectors before the step
        (Adam: ``(exp_avg, exp_avg_sq)``), stored like the parameters.
        """
        if opt_state is not None:
            if self._opt_series is None:
                self._opt_series = [_Series(self.spec.n_params, self.dtype, self._directory,
                                            prefix=f"hydrattr-optstate{k}-",
                                            keep_last=self.storage == "last")
                                    for k in range(len(opt_state))]
            for series, vec in zip(self._opt_series, opt_state):
                series.append(vec)
        theta = theta.detach().to("cpu", self.dtype)
        if self._file is not None:
            self._file.write(theta.numpy().tobytes())
        else:
            self._thetas.append(theta.clone())
            if self.storage == "last" and len(self._thetas) > 1:
                self._thetas[-2] = None  # only the latest snapshot is kept
        self.indices.append(np.asarray(indices, dtype=np.int64))
        self.weights.append(float(weight))
        self._hyper_rows.append(hyper_row)
        self.rng_states.append(rng_state)

    def finish(self, theta_final):
        """Close recording with the trained parameters."""
        self.theta_final = theta_final.detach().to("cpu", self.dtype).clone()
        if not self._hyper_rows:
            raise RuntimeError("no optimizer step was recorded: was the net trained at all?")
        self.hyper = hyper_from_rows(self._hyper_rows)
        if self._opt_series is not None:
            for series in self._opt_series:
                series.finish(len(self.indices))
        if self._file is not None:
            np_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype
            self._thetas = map_file(self._file, np_dtype,
                                    (len(self.indices), self.spec.n_params))
            self._file = None
        if all(s is None for s in self.rng_states):
            self.rng_states = [None] * len(self.indices)

    def begin_epoch(self):
        """Mark that the next recorded step is the first of a new training epoch."""
        self.epoch_starts.append(len(self.indices))

    # -- reading ---------------------------------------------------------------------
    def __len__(self):
        return len(self.indices)

    def start_of_last_epochs(self, k):
        """Index of the first step of the last ``k`` training epochs (0 for the whole run).

        ``k=None``, or ``k`` at least the number of recorded epochs, gives 0. ``k="final_lr"``
        takes the epochs since the learning rate (of any parameter group) last changed: the
        final phase of the schedule (the whole run at a constant rate; the last epoch if the
        rate changes every step). Epochs without a training step do not count.
        """
        if k is None:
            return 0
        starts = sorted(set(s for s in self.epoch_starts if s < len(self)))
        if not starts:
            raise ValueError("this trajectory has no epoch boundaries recorded; refit to "
                             "use last_epochs.")
        if isinstance(k, str):  # "final_lr", validated by the estimator
            lr = np.asarray(self.hyper.lr, dtype=np.float64)
            changed = np.flatnonzero(np.any(lr[1:] != lr[:-1], axis=1)) + 1
            if not len(changed):
                return 0
            return max(s for s in starts if s <= changed[-1])
        return 0 if k >= len(starts) else starts[-k]

    def theta(self, t, device=None):
        """Parameters before step ``t`` as a tensor on ``device``."""
        th = self._thetas[t]
        if th is None:
            raise RuntimeError(_LAST_ONLY)
        if isinstance(th, np.ndarray):
            touch(self._thetas, th.nbytes)  # memmap: keep RSS bounded on long passes
            th = torch.from_numpy(np.array(th))
        return th.to(device) if device is not None else th

    def head(self, n):
        """The first ``n`` steps as a trajectory of their own: training stopped after them.

        Its ``theta_final`` is the parameters after ``n`` steps (``theta(n)``); snapshots,
        optimizer states and RNG states are shared with this trajectory, not copied. Any
        sweep or replay of the result differentiates, or reproduces, the checkpoint
        ``theta(n)``: e.g. the fast or exact contributions to a loss measured at an
        earlier epoch, one sweep per checkpoint (one ``exact_adjoint`` sweep of the whole
        trajectory can instead carry several checkpoints' losses at once, added by its
        ``on_step`` hook). ``n == len(self)`` returns this trajectory itself.
        Needs every step's parameters (not ``storage="last"`` or a fused fit's record).
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 < n <= len(self):
            raise ValueError(f"n: expected an int in [1, {len(self)}], got {n!r}")
        if n == len(self):
            return self
        out = copy.copy(self)
        out.indices, out.weights = self.indices[:n], self.weights[:n]
        out.rng_states, out._hyper_rows = self.rng_states[:n], self._hyper_rows[:n]
        out.hyper = hyper_from_rows(out._hyper_rows)
        out._thetas = self._thetas[:n]
        out.theta_final = self.theta(n).clone()
        out.epoch_starts = [s for s in self.epoch_starts if s < n]
        return out

    def continued(self, start, theta0, hyper):
        """Steps ``start..`` replayed again from ``theta0`` at hyperparameters ``hyper``
        (a :class:`Continuation`: the same batches, weights and RNG states)."""
        return Continuation(self, start, theta0, hyper)

    def opt_state(self, t, device=None):
        """Optimizer state before step ``t`` (tuple of flat tensors), or None if not recorded."""
        if self._opt_series is None:
            return None
        return tuple(s[t].to(device) if device is not None else s[t] for s in self._opt_series)

    def used_rows(self):
        """Boolean mask of rows that entered at least one gradient step."""
        mask = np.zeros(self.n_rows, dtype=bool)
        for idx in self.indices:
            mask[idx] = True
        return mask

    @property
    def nbytes(self):
        """Bytes held by parameter snapshots (on disk for memmap storage)."""
        n_series = 1 + (len(self._opt_series) if self._opt_series is not None else 0)
        n_steps = min(len(self.indices), 1) if self.storage == "last" else len(self.indices)
        return (n_series * n_steps * self.spec.n_params
                * torch.empty(0, dtype=self.dtype).element_size())

    # -- files -------------------------------------------------------------------------
    def save(self, directory):
        """Write the trajectory to ``directory``: ``thetas.npy`` (and ``optstate{k}.npy``
        for Adam's moments) plus ``meta.pkl`` (rows, weights, hyperparameters, RNG states).

        :meth:`load` maps it back read-only. Needs every step's parameters (not
        ``storage="last"``).
        """
        if self.storage == "last":
            raise ValueError("a trajectory with storage='last' has no snapshots to save.")
        os.makedirs(directory, exist_ok=True)
        n, p = len(self), self.spec.n_params
        _save_rows(os.path.join(directory, "thetas.npy"), n, self.theta, self.dtype, p)
        series = self._opt_series or []
        for k, s in enumerate(series):
            _save_rows(os.path.join(directory, f"optstate{k}.npy"), n, s.__getitem__,
                       self.dtype, p)
        meta = {k: v for k, v in self.__dict__.items()
                if k not in ("_thetas", "_opt_series", "_file")}
        meta["n_opt_series"] = len(series)
        with open(os.path.join(directory, "meta.pkl"), "wb") as f:
            pickle.dump(meta, f)

    @classmethod
    def load(cls, directory):
        """The trajectory :meth:`save` wrote to ``directory``, its snapshots read-only
        memory maps of the ``.npy`` files.

        Unpickles ``meta.pkl``, which can run arbitrary code: only load directories you
        wrote yourself.
        """
        with open(os.path.join(directory, "meta.pkl"), "rb") as f:
            meta = pickle.load(f)
        n_series = meta.pop("n_opt_series")
        out = cls(meta["spec"], meta["n_rows"], dtype=meta["dtype"])
        out.__dict__.update(meta)
        out.storage = "memmap"
        out._thetas = np.load(os.path.join(directory, "thetas.npy"), mmap_mode="r")
        out._opt_series = [_Series.load(os.path.join(directory, f"optstate{k}.npy"),
                                        out.spec.n_params, out.dtype)
                           for k in range(n_series)] or None
        return out

    def __getstate__(self):
        state = self.__dict__.copy()
        if isinstance(self._thetas, np.memmap):  # pickle the data, not the file handle
            state["_thetas"] = [torch.from_numpy(np.array(r)) for r in self._thetas]
            state["storage"] = "memory"
        state["_file"] = None
        return state


class Continuation:
    """Steps ``start..`` of a trajectory replayed again from ``theta0`` at the
    hyperparameters ``hyper``: the same batches, weights and RNG states (leave-one-out's
    warm start continues a trained model this way). Implements :class:`Steps`; only
    ``theta(0)`` (``theta0``) is known."""

    def __init__(self, traj, start, theta0, hyper):
        self.spec = traj.spec
        self.indices = traj.indices[start:]
        self.weights = traj.weights[start:]
        self.rng_states = traj.rng_states[start:]
        self.hyper = hyper
        self.buffers0 = None
        self.dtype = traj.dtype
        self._theta0 = theta0

    def __len__(self):
        return len(self.indices)

    def theta(self, t, device=None):
        if t != 0:
            raise IndexError("a continuation only knows its starting parameters")
        return self._theta0.to(device) if device is not None else self._theta0

    def opt_state(self, t, device=None):
        return None

"""A recorded trajectory that keeps every k-th step's state and recomputes the rest.

Exact mode's reverse sweep reads the parameters before every step, ``theta(t)``, last
step first. A :class:`~hydrattr._core.trajectory.Trajectory` stores all ``T`` of them
(``T x P`` numbers). :class:`CheckpointedTrajectory` stores the full training state
(parameters, optimizer state such as momentum buffers or Adam's moments, module buffers
such as BatchNorm's running statistics) only at the steps ``0, k, 2k, ...`` and, when a
sweep asks for ``theta(t)``, recomputes the block of steps holding ``t`` from its
checkpoint *by running the training step itself again* (a :class:`ModuleReplayer`:
the real module, criterion and optimizer, the recorded batch rows, hyperparameters and
RNG state), into a buffer of that block's snapshots. The sweep then walks the buffer
backward. This is the two-level scheme of revolve / treeverse (Griewank 1992): with
``k`` chosen so that ``ceil(T / k) + k`` is smallest (about ``sqrt(T)``), at most
``ceil(2 sqrt(T)) - 1 <= 2 sqrt(T)`` parameter snapshots are held at once, and each step
is recomputed once per sweep (one training step, cheaper than the sweep's
forward-over-reverse product).

When training ends earlier than planned (early stopping, an interrupt), the checkpoints
are farther apart than the run's length calls for; the blocks are then recomputed in
more levels (each block's own sub-checkpoints, then a buffer of a sub-block), so the
snapshots held stay within ``2 sqrt(T)``; each further level recomputes every step once
more.

Because the recomputation runs the same ops in the same order on the same inputs, on
the CPU it reproduces the recorded run bit for bit. Every block recomputed from a
checkpoint is checked against the next checkpoint (or the trained parameters): a
difference within ``sqrt(eps)`` (nondeterministic GPU kernels, another number of
threads) warns, a larger one (a step that the recorded state does not determine:
randomness outside the recorded RNG stream, a callback that edits the step) raises.
"""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import torch

from .adam import AdamHyper
from .functional import rng_context
from .trajectory import Trajectory, hyper_from_rows

__all__ = ["CheckpointedTrajectory", "ModuleReplayer", "best_spacing", "inner_strides",
           "snapshot_budget", "capture_state", "NotReproducedError"]


class NotReproducedError(ValueError):
    """Recomputing steps from a checkpoint did not give the recorded parameters."""


def snapshot_budget(n_steps):
    """The most parameter snapshots a checkpointed sweep of ``n_steps`` steps holds at
    once: ``floor(2 sqrt(n_steps))`` (at least 1)."""
    return max(1, math.isqrt(4 * int(n_steps)))


def best_spacing(n_steps):
    """Checkpoint spacing ``k`` minimising ``ceil(n_steps / k) + k`` (the snapshots a
    two-level sweep holds: the checkpoints plus one block's buffer sharing its first).

    The minimum is ``ceil(2 sqrt(n_steps))``; among ties the largest ``k`` (fewest
    checkpoints) is taken.
    """
    n = max(1, int(n_steps))
    r = math.isqrt(n)
    best = None
    for k in range(max(1, r - 2), r + 4):
        cost = -(-n // k) + k
        if best is None or cost <= best[0]:
            best = (cost, k)
    return best[1]


def inner_strides(block, extra):
    """Strides below a checkpoint spacing of ``block`` steps that hold at most ``extra``
    snapshots besides the checkpoints (each level's snapshots share their first with the
    level above). Returns a list ending in 1: ``[1]`` is the plain two-level scheme
    (``block - 1`` snapshots); every further level recomputes each step once more.
    When even binary levels do not fit, the binary ones are returned (the fewest
    snapshots there are)."""
    block = max(1, int(block))
    if block - 1 <= extra:
        return [1]
    best = None
    for levels in range(2, max(2, block.bit_length()) + 1):
        q = max(2, math.ceil(block ** (1.0 / levels)))
        while q ** levels < block:
            q += 1
        strides, s = [], block
        while s > 1:
            s = -(-s // q)
            strides.append(s)
        held, prev = 0, block
        for s in strides:
            held += -(-prev // s) - 1
            prev = s
        best = strides
        if held <= extra:
            return strides
    return best


def _clone_to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _clone_to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def _nbytes(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def capture_state(module, optimizer):
    """The training state besides the parameters, copied to the CPU: the optimizer's
    ``state_dict`` (momentum buffers, Adam's moments and step counts, the param groups)
    and the module's buffers (BatchNorm running statistics)."""
    return {"optimizer": _clone_to_cpu(optimizer.state_dict()),
            "buffers": {n: b.detach().to("cpu", copy=True)
                        for n, b in module.named_buffers()}}


def _flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


class ModuleReplayer:
    """Takes recorded training steps again on a working copy of the module and optimizer.

    Parameters
    ----------
    module, optimizer : torch.nn.Module, torch.optim.Optimizer
        The working copies (a replay changes them; never pass the trained ones).
    train_step : callable
        ``train_step(x, y)``: one training step on the batch, exactly as training took it
        (zero the gradients, forward, loss, backward, ``optimizer.step()``).
    data_fn : callable
        ``data_fn(rows) -> (x, y)``, the batch of the recorded rows.
    """

    def __init__(self, module, optimizer, train_step, data_fn):
        self.module = module
        self.optimizer = optimizer
        self.train_step = train_step
        self.data_fn = data_fn
        self.params = [p for g in optimizer.param_groups for p in g["params"]
                       if p.requires_grad]
        self.adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))

    def load(self, theta, state):
        """Set the parameters to the flat ``theta`` and the rest to ``state``
        (:func:`capture_state`)."""
        with torch.no_grad():
            o = 0
            for p in self.params:
                n = p.numel()
                p.copy_(theta[o:o + n].view_as(p))
                o += n
            own = dict(self.module.named_buffers())
            for name, b in state["buffers"].items():
                own[name].copy_(b)
        # a deep copy: load_state_dict keeps tensors of the right dtype and device as
        # they are, and the next step would update the checkpoint in place
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))

    def state(self):
        """The working copy's state besides the parameters (:func:`capture_state`)."""
        return capture_state(self.module, self.optimizer)

    def theta(self, dtype):
        """The working parameters, flat, on the CPU (a copy)."""
        return _flat(self.params).to("cpu", dtype, copy=True)

    def opt_vectors(self, dtype):
        """Adam/AdamW: flat ``(exp_avg, exp_avg_sq)`` as the recorder stores them (zeros
        before the first step); None for SGD."""
        if not self.adam:
            return None
        return tuple(torch.cat([self.optimizer.state.get(p, {}).get(k, torch.zeros_like(p))
                                .detach().reshape(-1) for p in self.params])
                     .to("cpu", dtype, copy=True)
                     for k in ("exp_avg", "exp_avg_sq"))

    def step(self, traj, t):
        """Take recorded step ``t`` of ``traj``: its batch rows, its hyperparameters (as
        the optimizer's param groups held them, so LR schedules are followed) and, when
        recorded, its RNG state (dropout masks)."""
        row = traj.hyper_rows[t]
        for i, g in enumerate(self.optimizer.param_groups):
            g["lr"] = row["lr"][i]
            g["weight_decay"] = row["weight_decay"][i]
            if self.adam:
                g["betas"] = (row["beta1"][i], row["beta2"][i])
                g["eps"] = row["eps"][i]
            else:
                g["momentum"] = row["momentum"][i]
                g["dampening"] = row["dampening"][i]
                g["nesterov"] = row["nesterov"][i]
        x, y = self.data_fn(traj.indices[t])
        device = self.params[0].device if self.params else None
        with rng_context(traj.rng_states[t], device if device is not None and
                         device.type == "cuda" else None):
            self.train_step(x, y)


class CheckpointedTrajectory:
    """A training record that keeps the full state every ``stride`` steps only.

    Implements :class:`~hydrattr._core.trajectory.Steps`: ``theta(t)`` and
    ``opt_state(t)`` of steps between checkpoints are recomputed (see the module
    docstring) by the replayer that :meth:`bind` provides. Batch rows, weights,
    hyperparameters and RNG states are kept for every step, as in
    :class:`~hydrattr._core.trajectory.Trajectory`.

    Parameters
    ----------
    spec : ParamSpec
    n_rows : int
        Number of rows of the data the training indices refer to.
    every : "auto" or int
        Checkpoint spacing; ``"auto"``: :func:`best_spacing` of the planned number of
        steps (:meth:`plan`, called before the first step).
    dtype : torch.dtype
        Snapshot dtype (the module's parameter dtype).

    Attributes
    ----------
    stride : int or None
        The checkpoint spacing (None until planned).
    held_, peak_held_ : int
        Parameter snapshots held now and at most so far (checkpoints plus recomputed
        snapshots); ``peak_nbytes_`` the most bytes held by them with their optimizer
        states and module buffers.
    recomputed_steps_ : int
        Training steps taken again so far (checks included).
    """

    storage = "checkpoint"

    def __init__(self, spec, n_rows, every="auto", dtype=torch.float32):
        if not (every == "auto" or (isinstance(every, (int, np.integer))
                                    and not isinstance(every, bool) and every >= 1)):
            raise ValueError(f"every: expected 'auto' or an int >= 1, got {every!r}")
        self.spec = spec
        self.n_rows = int(n_rows)
        self.dtype = dtype
        self.every = every
        self.stride = None if every == "auto" else int(every)
        self.planned_steps = None
        self.indices = []
        self.weights = []
        self.rng_states = []
        self.hyper_rows = []
        self.hyper = None
        self.epoch_starts = []
        self.buffers0 = None
        self.theta_final = None  # not kept: the trained net holds it
        self._ckpts = {}  # step -> (theta, state)
        self._factory = None
        self._final = None
        self._replayer = None
        self._levels = None  # strides below the checkpoints, set at the first recompute
        self._cache = []  # per level: (block start, {step: snapshot})
        self._warned = False
        self.held_ = self.peak_held_ = 0
        self.nbytes_ = self.peak_nbytes_ = 0
        self.recomputed_steps_ = 0

    # -- recording -------------------------------------------------------------------
    def plan(self, n_steps):
        """Fix the spacing for a run of at most ``n_steps`` steps (``every="auto"``)."""
        self.planned_steps = int(n_steps)
        if self.stride is None:
            self.stride = best_spacing(n_steps)

    def wants(self, t):
        """Whether step ``t``'s state is a checkpoint (the recorder then captures it)."""
        if self.stride is None:
            raise RuntimeError("CheckpointedTrajectory.plan must be called before the "
                               "first step when every='auto'")
        return t % self.stride == 0

    def append(self, theta, indices, weight, hyper_row, rng_state=None, opt_state=None,
               state=None):
        """Record one step (as :meth:`Trajectory.append`); at a checkpoint step ``state``
        (:func:`capture_state` before the step) must be given. ``opt_state`` is not
        kept: it is recomputed."""
        t = len(self.indices)
        if self.wants(t):
            if state is None:
                raise ValueError(f"step {t} is a checkpoint: its state must be given")
            snap = (theta.detach().to("cpu", self.dtype, copy=True), state)
            self._ckpts[t] = snap
            self._hold(snap, 1)
        self.indices.append(np.asarray(indices, dtype=np.int64))
        self.weights.append(float(weight))
        self.hyper_rows.append(hyper_row)
        self.rng_states.append(rng_state)

    def finish(self, theta_final):
        """Close recording (the trained parameters are not kept: :meth:`bind` passes a
        way to read them)."""
        if not self.hyper_rows:
            raise RuntimeError("no optimizer step was recorded: was the net trained at all?")
        self.hyper = hyper_from_rows(self.hyper_rows)
        if all(s is None for s in self.rng_states):
            self.rng_states = [None] * len(self.indices)

    def begin_epoch(self):
        """Mark that the next recorded step is the first of a new training epoch."""
        self.epoch_starts.append(len(self.indices))

    def bind(self, factory, final=None):
        """Give the way to recompute steps: ``factory()`` returns a :class:`ModuleReplayer`
        (built at the first recomputation, dropped when pickling); ``final()`` the
        trained parameters, to check the last block against. Both are kept (pickle
        them with the owner)."""
        self._factory = factory
        self._final = final
        self._replayer = None
        self._drop_cache(0)

    # -- reading ---------------------------------------------------------------------
    def __len__(self):
        return len(self.indices)

    start_of_last_epochs = Trajectory.start_of_last_epochs
    used_rows = Trajectory.used_rows

    def theta(self, t, device=None):
        """Parameters before step ``t`` (recomputed from the nearest checkpoint)."""
        th = self._snapshot(t)[0]
        return th.to(device) if device is not None else th

    def opt_state(self, t, device=None):
        """Adam/AdamW: ``(exp_avg, exp_avg_sq)`` before step ``t``; None for SGD."""
        if not isinstance(self.hyper, AdamHyper):
            return None
        vecs = self._snapshot(t)[1]
        return tuple(v.to(device) if device is not None else v for v in vecs)

    def head(self, n):
        raise NotImplementedError("a checkpointed trajectory has no head(); record with "
                                  "trajectory='memory' or 'memmap'")

    def save(self, directory):
        raise ValueError("a checkpointed trajectory (trajectory='checkpoint') cannot be "
                         "saved to files, which hydrattr.distributed shares with its "
                         "workers; record with trajectory='memory' or 'memmap'")

    @property
    def nbytes(self):
        """Bytes held now by the snapshots (checkpoints and recomputed ones)."""
        return self.nbytes_

    # -- the recomputation -------------------------------------------------------------
    def _hold(self, snap, sign):
        self.held_ += sign
        self.nbytes_ += sign * _nbytes(snap)
        self.peak_held_ = max(self.peak_held_, self.held_)
        self.peak_nbytes_ = max(self.peak_nbytes_, self.nbytes_)

    def _drop_cache(self, level):
        """Drop the recomputed snapshots of levels ``>= level`` (0-based in the cache)."""
        for _, entries, owned in self._cache[level:]:
            for s in owned:
                self._hold(entries[s], -1)
        del self._cache[level:]

    def _strides(self):
        if self._levels is None:
            n = len(self)
            block = min(self.stride, n)
            if self.every == "auto":
                extra = snapshot_budget(n) - len(self._ckpts)
                self._levels = inner_strides(block, extra)
            else:
                self._levels = [1]
        return [self.stride] + self._levels

    def _get_replayer(self):
        if self._replayer is None:
            if self._factory is None:
                raise RuntimeError(
                    "this checkpointed trajectory has no way to recompute its steps (bind "
                    "was not called); its owner binds it after training")
            self._replayer = self._factory()
        return self._replayer

    def check_last_block(self):
        """Recompute the last block from its checkpoint and check it against the trained
        parameters (``final`` of :meth:`bind`); raises or warns as any block does."""
        self._drop_cache(0)
        self._snapshot(len(self) - 1, shortcut=False)

    def _snapshot(self, t, shortcut=True):
        """``(theta, opt vectors)`` before step ``t``."""
        n = len(self)
        if not 0 <= t < n:
            raise IndexError(f"step {t} out of range for {n} steps")
        if shortcut and t in self._ckpts and not isinstance(self.hyper, AdamHyper):
            return (self._ckpts[t][0], None)  # a checkpoint: nothing to recompute
        strides = self._strides()
        b = (t // strides[0]) * strides[0]  # the block of each level holding t: [b, end)
        end = min(b + strides[0], n)
        snap = self._ckpts[b]
        for lv in range(1, len(strides)):
            stride = strides[lv]
            if len(self._cache) < lv or self._cache[lv - 1][0] != b:
                self._drop_cache(lv - 1)
                self._fill(b, end, stride, snap, light=lv == len(strides) - 1,
                           check=lv == 1)
            entries = self._cache[lv - 1][1]
            b = b + ((t - b) // stride) * stride
            end = min(b + stride, end)
            snap = entries[b]
        return snap

    def _fill(self, b, end, stride, first, light, check):
        """Recompute steps ``b..end-1`` from the snapshot ``first`` at ``b``, keeping every
        ``stride``-th (``light``: ``(theta, opt vectors)``, else full states)."""
        rep = self._get_replayer()
        rep.load(*first)
        entries, owned = {}, []
        self._cache.append((b, entries, owned))
        last = b + ((end - 1 - b) // stride) * stride
        stop = end if check else last
        with torch.random.fork_rng(devices=[]):
            for s in range(b, stop + 1):
                if s <= last and (s - b) % stride == 0:
                    if s == b:
                        entries[s] = (first[0], rep.opt_vectors(self.dtype)) if light else first
                    else:
                        th = rep.theta(self.dtype)
                        entries[s] = (th, rep.opt_vectors(self.dtype)) if light else \
                            (th, rep.state())
                        owned.append(s)
                        self._hold(entries[s], 1)
                if s == stop:
                    break
                rep.step(self, s)
                self.recomputed_steps_ += 1
        if check and stop > b:
            self._check(b, end, rep.theta(self.dtype))

    def _check(self, b, end, got):
        """Compare the parameters recomputed from the checkpoint at ``b`` with the
        recorded ones at ``end`` (the next checkpoint, or the trained parameters)."""
        if end in self._ckpts:
            want = self._ckpts[end][0]
        elif end == len(self) and self._final is not None:
            want = self._final().detach().to("cpu", self.dtype)
        else:
            return
        if torch.equal(got, want):
            return
        diff = float((got.double() - want.double()).abs().max())
        scale = float(want.double().abs().max()) or 1.0
        rel = diff / scale
        where = (f"recomputing steps {b}..{end - 1} from the checkpoint at step {b} did not "
                 f"reproduce the recorded parameters after step {end - 1} (largest "
                 f"difference {diff:.3g}, {rel:.3g} of the largest parameter)")
        if rel > float(torch.finfo(self.dtype).eps) ** 0.5:
            raise NotReproducedError(
                f"trajectory='checkpoint': {where}. The training step is not determined by "
                f"what was recorded: randomness outside the recorded RNG stream (data "
                f"augmentation, random ops in a module without dropout layers), or a "
                f"callback or training step that changes the update. Record every step "
                f"instead: trajectory='memory' or 'memmap'.")
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"trajectory='checkpoint': {where}. The recomputation is not bit-for-bit "
                f"(nondeterministic kernels, e.g. on CUDA without "
                f"torch.use_deterministic_algorithms(True), or another number of torch "
                f"threads than in training), so C differs from the stored trajectory's by "
                f"rounding of that order. trajectory='memory' or 'memmap' reads the recorded "
                f"parameters themselves.", RuntimeWarning, stacklevel=4)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_replayer"] = None
        state["_cache"] = []
        state["held_"] = len(self._ckpts)
        state["nbytes_"] = sum(_nbytes(s) for s in self._ckpts.values())
        return state

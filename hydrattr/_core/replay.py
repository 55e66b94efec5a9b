"""Deterministic re-training along a recorded trajectory with per-sample loss weights.

Replays the recorded batches, hyperparameters and RNG states (dropout masks) with the
same :func:`~hydrattr._core.sgd.sgd_step` used by the HYDRA recurrences, but lets each
training row carry a multiplier on its loss: ``1 + N * eps_i`` for finite-difference
checks of HYDRA, ``0`` for leave-one-out with the same batch order.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.func import grad

from .functional import rng_context
from .steps import steps_for

__all__ = ["replay_training"]


def replay_training(traj, loss_fn, data_fn, multipliers=None, theta0=None, device=None,
                    n_steps=None, bn=None, running0=None, v0=None, counts0=None, start=0):
    """Re-run the recorded optimizer steps (SGD or Adam/AdamW); returns the final flat parameters.

    Parameters
    ----------
    traj : Trajectory
    loss_fn : callable
        ``loss_fn(theta, x, y) -> (batch,)``, evaluated in train mode by the caller.
    data_fn : callable
        ``data_fn(rows) -> (x, y)``.
    multipliers : array-like of shape (n_rows,) or None
        Per-row multiplier on the sample's loss (default all ones). A multiplier only
        scales the sample's loss: the sample still runs through the forward pass, so
        it still counts in BatchNorm batch statistics (which do not depend on the
        weights), and the batch loss is still divided by the recorded batch size.
    theta0 : torch.Tensor or None
        Starting parameters (default: those before the first recorded step).
    n_steps : int or None
        Replay only the first ``n_steps`` steps.
    bn : BatchNormStats or None
        When given (and it has layers), the BatchNorm running statistics are replayed
        too, from the batch statistics of every replayed forward pass, and the function
        returns ``(theta, R)`` with ``R`` the flat running statistics
        (:class:`~hydrattr._core.running_stats.BatchNormStats`).
    running0 : torch.Tensor or None
        Starting running statistics (default: the trajectory's recorded ``buffers0``,
        i.e. the module's buffers when training began).
    v0 : torch.Tensor or None
        Starting momentum buffer (flat; default: none, as when training began). Used to
        continue training from a trained model's optimizer state.
    counts0 : list of int or None
        BatchNorm ``num_batches_tracked`` before the first replayed step (matters only
        for ``momentum=None`` layers; default: from ``buffers0``).
    start : int, default=0
        The multipliers act only in steps ``t >= start`` (earlier steps use weight 1):
        the ground truth of a hypergradient truncated to the end of training.

    Returns
    -------
    theta : torch.Tensor
        Final parameters.
    R : torch.Tensor
        Only with ``bn``: final running statistics.
    """
    theta = (traj.theta(0, device) if theta0 is None else theta0.to(device)).clone()
    mult = None if multipliers is None else torch.as_tensor(np.asarray(multipliers),
                                                             dtype=theta.dtype)
    alg = steps_for(traj)  # SGD or Adam/AdamW: the one primal step
    v = None if v0 is None else v0.to(theta.device, theta.dtype).clone()
    steps = len(traj) if n_steps is None else int(n_steps)
    track = bn is not None and len(bn) > 0
    if track:
        buffers0 = traj.buffers0
        if running0 is None:
            if buffers0 is None:
                raise ValueError("replaying BatchNorm running statistics needs the buffers "
                                 "recorded when training began (trajectory.buffers0) or "
                                 "running0.")
            running0 = bn.flat(buffers0)
        R = running0.to(theta.device, theta.dtype).clone()
        if counts0 is None:
            counts0 = bn.counts(buffers0) if buffers0 is not None else \
                [c - len(traj) for c in bn.counts()]
        factors = bn.factors(len(traj), counts0)
        stats_fn = bn.loss_and_stats(loss_fn)
    for t in range(steps):
        idx = traj.indices[t]
        x, y = data_fn(idx)
        w = torch.full((len(idx),), traj.weights[t], dtype=theta.dtype)
        if mult is not None and t >= start:
            w = w * mult[torch.as_tensor(idx)]
        w = w.to(theta.device)
        with rng_context(traj.rng_states[t], theta.device if theta.is_cuda else None):
            if track:
                def obj(th):
                    lv, S = stats_fn(th, x, y)
                    return (w * lv).sum(), S

                g, S = grad(obj, has_aux=True)(theta)
                R = bn.update(R, S.detach(), factors[t])
            else:
                g = grad(lambda th: (w * loss_fn(th, x, y)).sum())(theta)
        theta, v = alg.primal(t, theta, v, g)
    if track:
        return theta, R
    return theta

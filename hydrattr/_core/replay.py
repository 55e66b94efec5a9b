"""Deterministic re-training along a recorded trajectory with per-sample loss weights.

Replays the recorded batches, hyperparameters and RNG states (dropout masks) with the
same :func:`~hydrattr._core.optim.sgd_step` used by the HYDRA recurrences, but lets each
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
                    n_steps=None):
    """Re-run the recorded optimizer steps (SGD or Adam/AdamW); returns the final flat parameters.

    Parameters
    ----------
    traj : Trajectory
    loss_fn : callable
        ``loss_fn(theta, x, y) -> (batch,)``, evaluated in train mode by the caller.
    data_fn : callable
        ``data_fn(rows) -> (x, y)``.
    multipliers : array-like of shape (n_rows,) or None
        Per-row multiplier on the sample's loss (default all ones).
    theta0 : torch.Tensor or None
        Starting parameters (default: those before the first recorded step).
    n_steps : int or None
        Replay only the first ``n_steps`` steps.
    """
    theta = (traj.theta(0, device) if theta0 is None else theta0.to(device)).clone()
    mult = None if multipliers is None else torch.as_tensor(np.asarray(multipliers),
                                                             dtype=theta.dtype)
    alg = steps_for(traj)  # SGD or Adam/AdamW: the one primal step
    v = None
    steps = len(traj) if n_steps is None else int(n_steps)
    for t in range(steps):
        idx = traj.indices[t]
        x, y = data_fn(idx)
        w = torch.full((len(idx),), traj.weights[t], dtype=theta.dtype)
        if mult is not None:
            w = w * mult[torch.as_tensor(idx)]
        w = w.to(theta.device)
        with rng_context(traj.rng_states[t], theta.device if theta.is_cuda else None):
            g = grad(lambda th: (w * loss_fn(th, x, y)).sum())(theta)
        theta, v = alg.primal(t, theta, v, g)
    return theta

"""Sweeps over a recorded trajectory that turn test gradients into contributions.

Every function returns ``D`` with ``D[k, m] = (1/N) d objective_m / d eps_{rows[k]}``,
so the contribution matrix is ``C = -D`` (N cancels: sample ``i`` enters step ``t``'s
batch loss with weight ``w_t * (1 + N eps_i)``).

* :func:`build_fast_store` and :func:`fast_replay`: fast mode (Hessian dropped). Its
  adjoint coefficients are per-group scalars known once training ends
  (:func:`~hydrattr._core.optim.fast_coefficients`), so each step only needs the batch's
  per-sample gradients: O(batch x params) work per step, never O(N x params).
* :func:`exact_adjoint`: exact mode, reverse mode through the whole run. One backward
  pass over the steps gives all N samples for a block of objectives, at the cost of one
  forward-over-reverse product per objective per step.
* :func:`exact_forward`: the paper's forward recurrence for a few tracked samples
  (one HVP per tracked sample per step); the reference the adjoint is tested against.
"""
from __future__ import annotations

import numpy as np
import torch

from .functional import per_sample_dots_and_hvp, per_sample_grads
from .optim import adjoint_step, fast_coefficients, tangent_step

__all__ = ["build_fast_store", "fast_replay", "exact_adjoint", "exact_forward"]


def _tracked(rows_map, idx):
    slots = rows_map[idx]
    sel = slots >= 0
    return sel, slots


def _bar(progress, total, desc):
    if progress is None:
        return None
    return progress(total=total, desc=desc)


def build_fast_store(traj, loss_fn, data_fn, store, rows_map, *, independent=True,
                     device=None, progress=None):
    """Accumulate ``S[slot(i)] = sum_t w_t * coef_t * g_{t,i}`` into ``store``.

    ``rows_map`` maps data rows to store slots (-1 = not tracked).
    """
    coef = fast_coefficients(traj.hyper)
    spec = traj.spec
    bar = _bar(progress, len(traj), "HYDRA fast: per-sample gradients")
    for t in range(len(traj)):
        idx = traj.indices[t]
        sel, slots = _tracked(rows_map, idx)
        if sel.any():
            x, y = data_fn(idx)
            theta = traj.theta(t, device)
            if independent and not sel.all():
                m = torch.as_tensor(sel, device=x.device)
                g = per_sample_grads(loss_fn, theta, x[m], y[m], independent=True)
            else:
                g = per_sample_grads(loss_fn, theta, x, y, independent=independent,
                                     rng_state=traj.rng_states[t])
                g = g[torch.as_tensor(sel, device=g.device)]
            scale = traj.weights[t] * spec.expand(coef[t]).to(g.device, g.dtype)
            store.add(slots[sel], g * scale)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return store


def fast_replay(traj, loss_fn, data_fn, test_grads, rows_map, n_tracked, *,
                independent=True, device=None, progress=None):
    """Fast mode without a store: ``D = S @ test_grads.T`` by replaying the trajectory."""
    coef = fast_coefficients(traj.hyper)
    spec = traj.spec
    G = test_grads.to(device)
    out = torch.zeros(n_tracked, G.shape[0], dtype=torch.float64)
    bar = _bar(progress, len(traj), "HYDRA fast: replay")
    for t in range(len(traj)):
        idx = traj.indices[t]
        sel, slots = _tracked(rows_map, idx)
        if sel.any():
            x, y = data_fn(idx)
            g = per_sample_grads(loss_fn, traj.theta(t, device), x, y, independent=independent,
                                 rng_state=traj.rng_states[t])
            g = g[torch.as_tensor(sel, device=g.device)]
            d_bar = spec.expand(coef[t]).to(G.device, G.dtype) * G
            out[torch.as_tensor(slots[sel])] += traj.weights[t] * (g @ d_bar.T).double().cpu()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out


def exact_adjoint(traj, loss_fn, data_fn, test_grads, rows_map, n_tracked, *,
                  hessian=True, device=None, progress=None, vectorize=True):
    """Reverse-mode sweep: ``D`` for a block of objectives ``test_grads`` (m, P).

    Runs the transposed optimizer step backward from ``theta_bar_T = test_grads``;
    at each step the batch's forward-over-reverse product gives the per-sample dots
    ``d_bar . g_{t,i}`` and, when ``hessian``, ``H_t d_bar`` for the next adjoint.
    """
    spec = traj.spec
    theta_bar = test_grads.to(device).clone()
    v_bar = torch.zeros_like(theta_bar)
    out = torch.zeros(n_tracked, theta_bar.shape[0], dtype=torch.float64)
    bar = _bar(progress, len(traj), "HYDRA exact: adjoint sweep")
    for t in range(len(traj) - 1, -1, -1):
        d_bar, theta_bar, v_bar = adjoint_step(theta_bar, v_bar, traj.hyper.at(t), spec.expand)
        idx = traj.indices[t]
        sel, slots = _tracked(rows_map, idx)
        if hessian or sel.any():
            x, y = data_fn(idx)
            w = torch.full((len(idx),), traj.weights[t], dtype=d_bar.dtype, device=d_bar.device)
            dots, hv = per_sample_dots_and_hvp(
                loss_fn, traj.theta(t, device), x, y, w, d_bar, hessian=hessian,
                rng_state=traj.rng_states[t], vectorize=vectorize)
            if hessian:
                theta_bar = theta_bar + hv
            if sel.any():
                contrib = traj.weights[t] * dots.T[torch.as_tensor(sel, device=dots.device)]
                out[torch.as_tensor(slots[sel])] += contrib.double().cpu()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out


def exact_forward(traj, loss_fn, data_fn, rows, *, hessian=True, device=None,
                  progress=None, vectorize=True):
    """The paper's forward recurrence for the data rows ``rows``.

    Returns the tangents ``(1/N) d theta_T / d eps_i`` stacked ``(len(rows), P)``;
    ``D = tangents @ test_grads.T``.
    """
    spec = traj.spec
    rows = np.asarray(rows, dtype=np.int64)
    theta0 = traj.theta(0, device)
    dtheta = torch.zeros(len(rows), spec.n_params, dtype=theta0.dtype, device=theta0.device)
    dv = torch.zeros_like(dtheta)
    pos = {int(r): k for k, r in enumerate(rows)}
    bar = _bar(progress, len(traj), "HYDRA forward recurrence")
    for t in range(len(traj)):
        idx = traj.indices[t]
        x, y = data_fn(idx)
        theta = traj.theta(t, device)
        dgrad = torch.zeros_like(dtheta)
        if hessian:
            w = torch.full((len(idx),), traj.weights[t], dtype=theta.dtype, device=theta.device)
            _, hv = per_sample_dots_and_hvp(loss_fn, theta, x, y, w, dtheta, hessian=True,
                                            rng_state=traj.rng_states[t], vectorize=vectorize)
            dgrad = dgrad + hv
        hit = [(b, pos[int(r)]) for b, r in enumerate(idx) if int(r) in pos]
        if hit:
            g = per_sample_grads(loss_fn, theta, x, y, independent=False,
                                 rng_state=traj.rng_states[t])
            for b, k in hit:
                dgrad[k] += traj.weights[t] * g[b]
        dtheta, dv = tangent_step(dtheta, dv, dgrad, traj.hyper.at(t), spec.expand)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return dtheta
